"""The Tinker API served by several `rlhf serve` processes behind one Redis (a load balancer may send each request to
any of them): a future is answered by whichever process is asked, a tenant's unfinished futures are counted over all
of them, and a future whose process was SIGKILLed fails naming that instead of staying pending."""

from __future__ import annotations

import time

import pytest

from tests.api.conftest import ApiServer, api_env
from tests.api.test_tinker import _kill_pools
from tests.api.test_tinker_hostile import asample, sampler_of
from tests.conftest import free_port, wait_until

pytestmark = pytest.mark.slow

LIMIT = 2  # RLHF_API_TINKER_MAX_FUTURES_PER_TENANT here
LONG = {"num_samples": 1, "sampling_params": {"max_tokens": 2048, "temperature": 1.0, "stop": []}}  # seconds on the tiny model


@pytest.fixture
def two_servers(request, redis_url, ray_head, keys, workdir, operator):
    """Two `rlhf serve` processes on one Redis and Ray; futures per tenant: LIMIT, or the test's `limit` mark."""
    mark = request.node.get_closest_marker("limit")
    limit = mark.args[0] if mark else LIMIT
    servers = []
    for name in ("a", "b"):
        port = free_port()
        env = api_env(redis_url, ray_head, keys["path"], port, operator, RLHF_API_TINKER_RAY_ADDRESS=ray_head.address,
                      RLHF_API_REQUESTS_PER_MINUTE="100000", RLHF_API_TINKER_SWEEP_S="0",
                      RLHF_API_TINKER_MAX_FUTURES_PER_TENANT=str(limit))
        servers.append(ApiServer(env, port, workdir / f"api-tinker-{name}.log"))
        servers[-1].start()
    yield servers
    for server in servers:
        if server.proc.poll() is None:
            server.stop()
    _kill_pools(ray_head)


class RoundRobin:
    """A load balancer on a free loopback port that sends each HTTP request to the next of `urls` in turn (as a
    Kubernetes Service may spread one client's requests over the API's replicas)."""

    def __init__(self, urls: list[str]):
        import itertools
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        import httpx

        turn, lock = itertools.cycle(urls), threading.Lock()
        client = httpx.Client(timeout=120)

        class Forward(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self):
                with lock:
                    upstream = next(turn)
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length", "connection")}
                r = client.request(self.command, upstream + self.path, content=body, headers=headers)
                self.send_response(r.status_code)
                for k, v in r.headers.items():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                        self.send_header(k, v)
                self.send_header("content-length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)

            do_GET = do_POST = do_PUT = do_DELETE = _forward

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Forward)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def answer(client, request_id: str, timeout_s: float = 120.0):
    """retrieve_future until it is not try_again."""
    deadline = time.monotonic() + timeout_s
    while True:
        r = client.post("/api/v1/retrieve_future", json={"request_id": request_id})
        assert r.status_code == 200, r.text
        body = r.json() if r.headers["content-type"].startswith("application/json") else r.content
        if not (isinstance(body, dict) and body.get("type") == "try_again"):
            return body
        assert time.monotonic() < deadline, f"{request_id} still pending after {timeout_s:.0f} s"


def test_any_process_answers_a_future_and_the_count_spans_processes(two_servers, keys):
    a, b = two_servers
    with a.client(keys["alpha"]) as ca, b.client(keys["alpha"]) as cb, b.client(keys["beta"]) as other:
        sampler = sampler_of(ca)
        quick = asample(ca, sampler, num_samples=2, sampling_params={"max_tokens": 4, "seed": 1})
        assert quick.status_code == 200, quick.text
        rid = quick.json()["request_id"]
        from_b, from_a = answer(cb, rid), answer(ca, rid)
        assert isinstance(from_b, bytes) and from_b == from_a  # the same protobuf SampleResponse, from either process
        # Two long calls on A fill alpha's place; B, asked for a third, counts A's and refuses it (429, the setting named).
        held = [asample(ca, sampler, **LONG).json()["request_id"] for _ in range(LIMIT)]
        refused = asample(cb, sampler_of(cb), **LONG)
        assert refused.status_code == 429 and "RLHF_API_TINKER_MAX_FUTURES_PER_TENANT" in refused.text, refused.text
        assert asample(other, sampler_of(other), num_samples=1, sampling_params={"max_tokens": 2}).status_code == 200
        for request_id in held:  # from B: answered once done on A, and alpha's places free again
            assert isinstance(answer(cb, request_id, 300), bytes)
        assert asample(cb, sampler_of(cb), num_samples=1, sampling_params={"max_tokens": 2}).status_code == 200
        # Not another tenant's: 404 from either process.
        assert other.post("/api/v1/retrieve_future", json={"request_id": rid}).status_code == 404


def test_a_future_of_a_killed_process_fails_naming_it_and_frees_its_place(two_servers, keys):
    a, b = two_servers
    with a.client(keys["alpha"]) as ca, b.client(keys["alpha"]) as cb:
        sampler = sampler_of(ca)
        warm = asample(ca, sampler, num_samples=1, sampling_params={"max_tokens": 2})
        assert isinstance(answer(ca, warm.json()["request_id"]), bytes)  # (the pool is up)
        held = [asample(ca, sampler, **LONG).json()["request_id"] for _ in range(LIMIT)]
        a.kill()  # SIGKILL the API process that runs both calls
        # Within its heartbeat's lifetime (30 s) B sees the process gone: the futures fail, naming why.
        failed = answer(cb, held[0], timeout_s=90)
        assert failed["category"] == "server" and "API process that ran this call stopped" in failed["error"], failed
        # The dead process's places in alpha's count are given back: B takes new calls.
        wait_until(lambda: asample(cb, sampler_of(cb), num_samples=1, sampling_params={"max_tokens": 2}).status_code == 200, 60,
                   "alpha's places held by the killed process to be freed")


@pytest.mark.limit(64)
def test_a_clients_calls_run_in_turn_when_a_load_balancer_spreads_them_over_processes(two_servers, keys, tiny_model):
    """The SDK's recommended loop submits forward_backward and optim_step of several steps before waiting. Through a
    round-robin balancer over two processes, a step's optim_step (on one process) used to run before its
    forward_backward (on the other) had: the losses went their own way. Now each run's calls run in seq_id order:
    the losses are those of the same loop against one process (same seed, same data)."""
    import tinker
    from tinker import types

    from tests.api.test_tinker import SEQ, sft_datum, tokenizer

    def pipelined(url: str) -> list[float]:
        with tinker.ServiceClient(base_url=url, api_key=keys["alpha"]) as sc:
            tc = sc.create_lora_training_client(base_model="tiny", rank=8, seed=0).result()
            data = [sft_datum(tokenizer(tiny_model), SEQ)]
            steps = [(tc.forward_backward(data, "cross_entropy"), tc.optim_step(types.AdamParams(learning_rate=2e-3)))
                     for _ in range(8)]
            losses = [fb.result(timeout=180).metrics["loss:sum"] for fb, _ in steps]
            for _, opt in steps:
                opt.result(timeout=180)
            return losses

    a, b = two_servers
    balancer = RoundRobin([a.url, b.url])
    try:
        spread = pipelined(balancer.url)
    finally:
        balancer.close()
    alone = pipelined(a.url)
    print("losses, one process:", [round(x, 4) for x in alone], "spread over two:", [round(x, 4) for x in spread])
    assert spread == pytest.approx(alone, rel=1e-4), (spread, alone)
    assert alone[-1] < 0.8 * alone[0]
