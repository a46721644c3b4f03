"""Shared fixtures: a real redis-server, a tiny model and data, API keys, and the API two ways:

- `api` (and the `alpha`, `beta` clients): the app of `create_app` in this process, through an ASGI
  transport, on the session's real Redis and artifact store, with no Ray (its Ray address answers
  nothing) and no reconciler: for every test that needs no Ray job. It starts in milliseconds.
- `served` (and `served_alpha`, `served_beta`): `rlhf serve` as a subprocess on a real Ray head
  (`ray start --head` on loopback, non-default ports), for the tests that run real jobs, and those
  that need a real HTTP server (a browser, live server-sent event streams, raw sockets).

Both are on the same Redis and artifact store: what one records, the other serves.
Everything listens on 127.0.0.1 only; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import anyio.from_thread
import httpx
import pytest
import yaml
from starlette.testclient import TestClient

from api.auth import add_key
from api.main import create_app
from api.settings import Settings
from tests.conftest import API_SERVERS, RAY_ENV, RayHead, free_port, stop_group, wait_until  # noqa: F401  (ray_head fixture comes from there)


@pytest.fixture(scope="session")
def workdir():
    # The actors of a driver killed from outside (test_e2e) outlive it for a moment and may still be
    # writing a checkpoint into the run directory while it is removed: that is no test failure.
    with tempfile.TemporaryDirectory(prefix="rlhf-api-", ignore_cleanup_errors=True) as d:
        yield Path(d)


@pytest.fixture(scope="session")
def redis_url(workdir):
    port = free_port()
    data = workdir / "redis"
    data.mkdir()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data), "--appendonly", "yes", "--save", ""],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    import redis

    client = redis.Redis(host="127.0.0.1", port=port)
    wait_until(client.ping, 15, f"redis-server on port {port}")
    yield f"redis://127.0.0.1:{port}/0"
    stop_group(proc)


@pytest.fixture(scope="session")
def operator(workdir, tiny_model) -> dict[str, str]:
    """What the operator configures: the artifact store and the registry (the session's tiny model
    for every tenant, and for alpha only and beta only, one registered reward function and one environment)."""
    registry = workdir / "registry.yaml"
    registry.write_text(yaml.safe_dump({
        "models": {"tiny": {"path": str(tiny_model), "description": "2-layer test model"},
                   "tiny-alpha": {"path": str(tiny_model), "tenants": ["alpha"]},
                   "tiny-beta": {"path": str(tiny_model), "tenants": ["beta"]},
                   "missing": {"path": str(workdir / "no-model"), "description": "registered, but nothing there: fails in preflight"}},
        "reward_functions": {"short-answers": "workers.rewards:length_penalty"},
        "environments": {"arith-tools": "orchestrator.core.environments:CalculatorEnv"},
    }))
    return {"RLHF_API_STORAGE_ROOT": str(workdir / "artifacts"), "RLHF_API_REGISTRY_FILE": str(registry)}


NO_RAY = "http://127.0.0.1:1"  # nothing listens there: every call to Ray fails at once (RayUnavailable), as with Ray down


ARITHMETIC = "".join(json.dumps({"prompt": f"{a}+{b}=", "answer": a + b}) + "\n" for a in range(4) for b in range(4))


def upload(client: httpx.Client, content: str | bytes, purpose: str = "train", filename: str = "train.jsonl") -> httpx.Response:
    return client.post("/v1/files", files={"file": (filename, content)}, data={"purpose": purpose})


@pytest.fixture(scope="session")
def tiny(api, keys):
    """The registry's tiny model, and 16 arithmetic prompts uploaded by tenant alpha (its file id)."""
    with api.client(keys["alpha"]) as c:
        r = upload(c, ARITHMETIC)
        assert r.status_code == 201, r.text
    return {"model": "tiny", "data": r.json()["id"]}


def job_body(tiny, workdir, name: str, steps: int, **extra) -> dict:
    """A tiny GRPO job as a tenant submits it: a registry model and an uploaded file, by name and id."""
    return {
        "api_version": "rlhf/v1",
        "name": name,
        "model": {"path": tiny["model"]},
        "data": {"train_file": tiny["data"], "max_prompt_length": 16},
        "rollout": {"backend": "hf", "n": 4, "max_new_tokens": 4},
        "rewards": [{"function": "accuracy"}],
        "optim": {"lr": 1e-4, "steps": steps, "prompts_per_step": 4},
        "resources": {"torch_threads": 1},
        "checkpoint": {"every": 2},
        **extra,
    }


@pytest.fixture(scope="session")
def keys(workdir):
    path = workdir / "keys.yaml"
    # Each limit test of tests/api/test_tenancy.py has a tenant of its own: rate counts are per tenant,
    # shared by every API process on the Redis.
    return {"path": path, **{t: add_key(path, t) for t in ("alpha", "beta", "pager", "bursty", "rater", "streamer", "watcher", "queuer")}}


class ApiServer:
    """`rlhf serve` as a subprocess, restartable on the same port."""

    started = API_SERVERS  # every one of the session: a failed test shows the tracebacks they logged meanwhile

    def __init__(self, env: dict[str, str], port: int, log: Path):
        self.env, self.port, self.log = env, port, log
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        ApiServer.started.append(self)

    def log_size(self) -> int:
        return self.log.stat().st_size if self.log.exists() else 0

    def unhandled_since(self, offset: int, most: int = 3) -> list[str]:
        """The first `most` tracebacks the server logged for requests it answered 500, from byte `offset` of its log."""
        if not self.log.exists():
            return []
        with open(self.log, errors="replace") as f:
            f.seek(offset)
            lines = f.read().splitlines()
        starts = [i for i, line in enumerate(lines) if "unhandled error in" in line][:most]
        return ["\n".join(lines[i : i + 60]) for i in starts]

    def start(self) -> None:
        out = open(self.log, "a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.entrypoints.cli", "serve"], env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )

        def up():
            if self.proc.poll() is not None:
                raise RuntimeError(f"`rlhf serve` exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200

        wait_until(up, 30, f"the API at {self.url}")

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        stop_group(self.proc)

    def client(self, key: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test's report carries the tracebacks behind any 500 that the session's API servers answered while it ran."""
    if call.when == "setup":
        item.stash[_LOG_OFFSETS] = {id(s): s.log_size() for s in ApiServer.started}
    report = yield
    if report.failed and call.when == "call":
        offsets = item.stash.get(_LOG_OFFSETS, {})
        for server in ApiServer.started:
            for trace in server.unhandled_since(offsets.get(id(server), 0)):
                report.sections.append((f"500 logged by the API at {server.url} ({server.log.name})", trace))
    return report


_LOG_OFFSETS = pytest.StashKey[dict]()


def api_env(redis_url: str, ray_head: RayHead | None, keys_path: Path, port: int, operator: dict[str, str], **extra: str) -> dict[str, str]:
    """The environment of `rlhf serve`; no `ray_head`: Ray answers nothing."""
    return {
        **os.environ, **RAY_ENV, **operator,
        "RLHF_API_REDIS_URL": redis_url, "RLHF_API_RAY_ADDRESS": ray_head.dashboard if ray_head else NO_RAY, "RLHF_API_API_KEYS_FILE": str(keys_path),
        "RLHF_API_PORT": str(port), "RLHF_API_RECONCILE_INTERVAL_S": "0.5", **extra,
    }


def api_settings(redis_url: str, keys_path: Path, operator: dict[str, str], ray: RayHead | None = None, reconcile: bool = False,
                 **extra: str) -> Settings:
    """What api_env gives `rlhf serve`, as Settings for an app in this process (`extra` by their
    RLHF_API_ names too). No `ray`: Ray answers nothing. `reconcile`: run the reconciler, as `rlhf
    serve` does; off, this app decides nothing about jobs (a served API on the same Redis may run them)."""
    env = {**operator, "RLHF_API_REDIS_URL": redis_url, "RLHF_API_RAY_ADDRESS": ray.dashboard if ray else NO_RAY,
           "RLHF_API_API_KEYS_FILE": str(keys_path), "RLHF_API_RECONCILE_INTERVAL_S": "0.5", "RLHF_API_RECONCILE": str(reconcile), **extra}
    return Settings(**{name.removeprefix("RLHF_API_").lower(): value for name, value in env.items()})


class InProcessApi:
    """The API's app (`create_app`) in this process: its lifespan (the Redis store, the reconciler if
    on) runs on an event loop of its own in a thread (an anyio portal), where every request of its
    clients runs too, through an ASGI transport: no port, no subprocess. `client` gives a synchronous
    httpx client, as ApiServer.client does; `run(fn)` runs an async function on the app's loop (with
    `async_client`, for concurrent requests). A response is read whole: a live SSE stream never ends
    here (an ended job's does)."""

    url = "http://testserver"

    def __init__(self, settings: Settings):
        self.app = create_app(settings)
        self._stack = contextlib.ExitStack()
        self.portal = self._stack.enter_context(anyio.from_thread.start_blocking_portal())
        try:
            self._stack.enter_context(self.portal.wrap_async_context_manager(self.app.router.lifespan_context(self.app)))
        except BaseException:
            self._stack.close()
            raise

    def client(self, key: str | None) -> httpx.Client:
        return _PortalClient(self, key)

    def async_client(self, key: str | None) -> httpx.AsyncClient:
        """For use inside `run` only: its requests run on the app's loop."""
        transport = httpx.ASGITransport(self.app, raise_app_exceptions=False)
        return httpx.AsyncClient(transport=transport, base_url=self.url, headers=_auth(key), timeout=60)

    def run(self, fn, *args):
        return self.portal.call(fn, *args)

    def close(self) -> None:
        self._stack.close()


def _auth(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


class _PortalClient(TestClient):
    """Starlette's TestClient on the InProcessApi's loop: entering it starts no lifespan of its own."""

    def __init__(self, api: InProcessApi, key: str | None):
        super().__init__(api.app, base_url=api.url, raise_server_exceptions=False, headers=_auth(key))
        self.portal = api.portal

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def in_process(settings: Settings):
    api = InProcessApi(settings)
    try:
        yield api
    finally:
        api.close()


def tenant_client(api_fixture: str, tenant: str):
    """A fixture: `tenant`'s client of the API that the fixture named `api_fixture` gives."""
    @pytest.fixture()
    def client(request, keys):
        with request.getfixturevalue(api_fixture).client(keys[tenant]) as c:
            yield c

    return client


@pytest.fixture(scope="session")
def api(redis_url, keys, operator):
    with in_process(api_settings(redis_url, keys["path"], operator)) as app:
        yield app


@pytest.fixture(scope="session")
def served(redis_url, ray_head, keys, workdir, operator):
    port = free_port()
    server = ApiServer(api_env(redis_url, ray_head, keys["path"], port, operator), port, workdir / "api.log")
    server.start()
    yield server
    server.stop()


alpha, beta = tenant_client("api", "alpha"), tenant_client("api", "beta")
served_alpha, served_beta = tenant_client("served", "alpha"), tenant_client("served", "beta")


def run_async(coro):
    return asyncio.run(coro)


def make_record(redis_url: str, tenant: str, name: str = "rec", status: str | None = None, spec: dict | None = None) -> str:
    """A job record written straight to the store (no Ray job): for listing and tenancy tests."""
    import uuid

    from api.store import JobStore

    async def go():
        store = JobStore(redis_url)
        try:
            job_id = "job-" + uuid.uuid4().hex[:24]
            await store.create(job_id, tenant, name, spec or {"name": name}, {"kind": "record"}, None)
            if status:
                await store.transition(job_id, status, status, **({"error": {"code": "x", "message": "boom"}} if status == "failed" else {}))
            return job_id
        finally:
            await store.close()

    return run_async(go())


def wait_admitted(client: httpx.Client, job_id: str, timeout: float = 60) -> dict:
    """The `admitted` event of a job: the admission queue has submitted it to Ray."""
    def check():
        events = client.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
        return next((e for e in events if e["type"] == "admitted"), None)

    return wait_until(check, timeout, f"job {job_id} to be admitted", interval=0.2)


def wait_status(client: httpx.Client, job_id: str, statuses: set[str], timeout: float) -> dict:
    def check():
        job = client.get(f"/v1/jobs/{job_id}").json()
        return job if job["status"] in statuses else None

    return wait_until(check, timeout, f"job {job_id} to reach {sorted(statuses)}", interval=0.5)
