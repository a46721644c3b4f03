"""One tenant's burst of concurrent requests against the real API and Redis: another tenant's
requests never fail for it, the burst's rate count is exact, and one tenant's requests in flight
are capped per API process (then 429 naming `max_concurrent_requests_per_tenant`).

Each test runs an API of its own with the limits it needs (in this process, or as `rlhf serve` where
it needs a real server: raw sockets, live streams; no Ray either way); the tenants are this file's
own, since rate counts live in the shared Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter

import httpx
import pytest
import redis

from api.auth import add_key
from orchestrator.core.records import PREFIX
from tests.api.conftest import (
    ApiServer,
    InProcessApi,
    api_env,
    api_settings,
    free_port,
    make_record,
)
from tests.api.test_auth import assert_envelope

TENANTS = ("burst-flood", "burst-calm", "burst-count", "burst-stall", "burst-sse")
CAP_SETTING = "max_concurrent_requests_per_tenant"


@pytest.fixture(scope="module")
def burst_keys(workdir):
    path = workdir / "burst-keys.yaml"
    return {"path": path, **{t: add_key(path, t) for t in TENANTS}}


@pytest.fixture(scope="module")
def app(redis_url, burst_keys, workdir):
    """start(**settings): an API of its own in this process, on the session's Redis, closed after the module."""
    apps: list[InProcessApi] = []
    operator = {"RLHF_API_STORAGE_ROOT": str(workdir / "burst-artifacts")}

    def start(**settings) -> InProcessApi:
        apps.append(InProcessApi(api_settings(redis_url, burst_keys["path"], operator, **settings)))
        return apps[-1]

    yield start
    for api in apps:
        api.close()


@pytest.fixture(scope="module")
def serve(redis_url, burst_keys, workdir):
    """start(name, **settings): `rlhf serve` of its own on the session's Redis, stopped after the module."""
    servers: list[ApiServer] = []
    operator = {"RLHF_API_STORAGE_ROOT": str(workdir / "burst-artifacts")}

    def start(name: str, **settings: str) -> ApiServer:
        port = free_port()
        env = api_env(redis_url, None, burst_keys["path"], port, operator,
                      **{f"RLHF_API_{k.upper()}": str(v) for k, v in settings.items()})
        server = ApiServer(env, port, workdir / f"api-{name}.log")
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def _client(server: ApiServer, key: str, connections: int = 250) -> httpx.AsyncClient:
    # One connection per concurrent request: httpx's default pool (100) would queue the burst client-side.
    return httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=60,
                             limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections))


async def _burst_beside(api: InProcessApi, keys: dict, flood: list[str], calm: list[str], lanes: int) -> tuple[list, list]:
    """The flood tenant's requests all at once, and at the same moment the calm tenant's, `lanes` at a time."""
    async with api.async_client(keys["burst-flood"]) as f, api.async_client(keys["burst-calm"]) as c:
        async def lane(paths):
            return [await c.get(p) for p in paths]

        flooded, *calmed = await asyncio.gather(asyncio.gather(*(f.get(p) for p in flood)), *(lane(calm[i::lanes]) for i in range(lanes)))
    return list(flooded), [r for rs in calmed for r in rs]


def _calm_paths(redis_url: str) -> list[str]:
    """Every read endpoint of the calm tenant: its jobs, one job with its events, metrics and
    checkpoints, its files, the catalog."""
    job = make_record(redis_url, "burst-calm", "calm", status="failed")
    paths = ["/v1/jobs", f"/v1/jobs/{job}", f"/v1/jobs/{job}/events", f"/v1/jobs/{job}/metrics", f"/v1/jobs/{job}/checkpoints",
             "/v1/files", "/v1/models", "/v1/reward_functions"]
    return paths * 4


def test_a_burst_waits_for_redis_instead_of_failing_anyone(app, burst_keys, redis_url):
    """200 concurrent requests from one tenant on an API whose Redis pool is 8 connections (and whose
    concurrency cap is out of the way): every request of both tenants is answered 200; none gets
    503 "Too many connections" (they wait for a connection instead)."""
    api = app(redis_max_connections=8, max_concurrent_requests_per_tenant=1000, requests_per_minute=100_000)
    for i in range(20):
        make_record(redis_url, "burst-flood", f"flood-{i}", status="succeeded")
    flood, calm = api.run(_burst_beside, api, burst_keys, ["/v1/jobs?limit=100"] * 200, _calm_paths(redis_url), 32)
    assert Counter(r.status_code for r in calm) == {200: len(calm)}, [r.text for r in calm if r.status_code != 200][:3]
    assert Counter(r.status_code for r in flood) == {200: len(flood)}, [r.text for r in flood if r.status_code != 200][:3]


def test_a_burst_is_capped_per_tenant_and_others_pass(app, burst_keys, redis_url):
    """The same burst with a cap of 4 requests in flight per tenant: the flood gets 200s and 429s
    naming the setting, never a 5xx; the calm tenant's requests at the same moment, 4 at a time
    (within the cap), all pass."""
    api = app(max_concurrent_requests_per_tenant=4, requests_per_minute=100_000)
    flood, calm = api.run(_burst_beside, api, burst_keys, ["/v1/jobs?limit=100"] * 200, _calm_paths(redis_url), 4)
    assert Counter(r.status_code for r in calm) == {200: len(calm)}, [r.text for r in calm if r.status_code != 200][:3]
    codes = Counter(r.status_code for r in flood)
    assert set(codes) == {200, 429}, codes
    refused = next(r for r in flood if r.status_code == 429)
    err = assert_envelope(refused, 429, "too_many_requests_in_flight")
    assert CAP_SETTING in err["message"] and err["type"] == "rate_limit_error" and refused.headers["retry-after"]


async def _stalled_upload(port: int, key: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A POST /v1/files whose body never finishes arriving: a request held in flight for as long as
    the connection stays open."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write((f"POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
                  "Content-Type: multipart/form-data; boundary=x\r\nContent-Length: 100000\r\n\r\n--x\r\n").encode())
    await writer.drain()
    return reader, writer


def test_requests_in_flight_are_capped_and_given_back(serve, burst_keys):
    """Three uploads held open fill a cap of 3: the next request is 429 naming the setting, another
    tenant's passes; once the uploads' connections close, the tenant's requests pass again."""
    server = serve("stall", max_concurrent_requests_per_tenant=3)
    key = burst_keys["burst-stall"]

    async def scenario():
        held = [await _stalled_upload(server.port, key) for _ in range(3)]
        async with _client(server, key, 4) as c, _client(server, burst_keys["burst-calm"], 4) as other:
            refused = None
            for _ in range(100):  # the three uploads' requests reach the app in their own time
                r = await c.get("/v1/models")
                if r.status_code == 429:
                    refused = r
                    break
                await asyncio.sleep(0.1)
            other_code = (await other.get("/v1/models")).status_code
            for _, writer in held:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()
            for _ in range(100):
                after = await c.get("/v1/models")
                if after.status_code == 200:
                    break
                await asyncio.sleep(0.1)
            return refused, other_code, after.status_code

    refused, other_code, after = asyncio.run(scenario())
    assert refused is not None, "three uploads in flight never filled a cap of 3"
    err = assert_envelope(refused, 429, "too_many_requests_in_flight")
    assert CAP_SETTING in err["message"] and "3" in err["message"]
    assert other_code == 200
    assert after == 200, "the closed uploads' slots did not come back"


def test_live_streams_do_not_hold_request_slots(serve, burst_keys, redis_url):
    """Live SSE streams have slots of their own (`max_streams_per_tenant`): 5 open streams of a
    tenant whose cap of requests in flight is 2 all open, and its requests still pass beside them."""
    server = serve("sse", max_concurrent_requests_per_tenant=2, max_streams_per_tenant=8)
    job = make_record(redis_url, "burst-sse", "streamed")  # queued, no Ray job: its streams stay open
    sse = {"Accept": "text/event-stream"}

    async def scenario():
        async with _client(server, burst_keys["burst-sse"], 10) as c, contextlib.AsyncExitStack() as stack:
            codes = []
            for _ in range(5):
                s = await stack.enter_async_context(c.stream("GET", f"/v1/jobs/{job}/events", headers=sse))
                codes.append(s.status_code)
            return codes, (await c.get("/v1/jobs")).status_code

    codes, beside = asyncio.run(scenario())
    assert codes == [200] * 5 and beside == 200


def _wait_for_a_fresh_window(margin: float = 5.0) -> None:
    """The limit counts per clock minute: a burst that straddled two minutes would count in both."""
    left = 60 - time.time() % 60
    if left < margin:
        time.sleep(left + 0.1)


def test_the_rate_count_is_exact_under_a_burst(app, burst_keys, redis_url):
    """requests_per_minute=120 (the process counts in batches of 2) and 200 concurrent requests:
    exactly 120 pass, the other 80 are 429 naming the setting, and later requests stay refused. The
    shared count in Redis is 120 too: a refused request made no Redis call."""
    api = app(requests_per_minute=120, max_concurrent_requests_per_tenant=1000)
    _wait_for_a_fresh_window()
    minute = int(time.time() // 60)

    async def burst():
        async with api.async_client(burst_keys["burst-count"]) as c:
            results = await asyncio.gather(*(c.get("/v1/models") for _ in range(200)))
            return results, await c.get("/v1/models")

    results, after = api.run(burst)
    codes = Counter(r.status_code for r in results)
    assert codes == {200: 120, 429: 80}, codes
    err = assert_envelope(next(r for r in results if r.status_code == 429), 429, "rate_limited")
    assert "requests_per_minute" in err["message"]
    assert after.status_code == 429
    assert redis.Redis.from_url(redis_url).get(f"{PREFIX}rate:burst-count:{minute}") == b"120"
