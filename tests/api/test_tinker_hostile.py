"""The Tinker API against a hostile tenant with a valid key, fast: the in-process API on the session's Redis (no Ray: a
pool call, where one is needed, is a stand-in that waits). Every refusal is a 4xx naming what is wrong (and the setting
that bounds it), never a 500, and nothing one request sends can make the shared pool or the API hold unbounded work.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid

import pytest

from api.auth import add_key
from api.tinker import new_id
from tests.api.conftest import api_settings, in_process
from tests.api.test_tinker_limits import add_run

pytest.importorskip("tinker")


def sampler_of(c) -> str:
    """A sampling session of the base model, in a new session of the client's tenant (a sampler lives in its session)."""
    session = c.post("/api/v1/create_session", json={}).json()["session_id"]
    return c.post("/api/v1/create_sampling_session", json={"base_model": "tiny", "session_id": session}).json()["sampling_session_id"]


def asample(c, sampler: str, tokens=(1, 2), **fields):
    body = {"sampling_session_id": sampler, "prompt": {"chunks": [{"type": "encoded_text", "tokens": list(tokens)}]}, **fields}
    return c.post("/api/v1/asample", json=body)


def run_with_checkpoint(api, c, tenant: str) -> tuple[str, str, str]:
    """A session, a held run of `tenant` and a (dummy) saved state of it, `tinker://<run>/weights/ck`: (session, run, directory)."""
    session = c.post("/api/v1/create_session", json={}).json()["session_id"]
    model_id = add_run(api, tenant, session)
    state = f"{api.app.state.storage.tenant_root(tenant)}/tinker/{model_id}/weights/ck"
    os.makedirs(state, exist_ok=True)
    open(f"{state}/state.pt", "wb").close()
    return session, model_id, state


def test_one_sample_call_is_bounded_naming_the_setting(api, keys):
    """max_tokens, num_samples and prompt + max_tokens have limits (a call of max_tokens 10**9 went to the pool, which
    would have generated for hours while every other tenant waited); malformed values are 400, not 500."""
    with api.client(keys["alpha"]) as c:
        sampler = sampler_of(c)
        ts = api.app.state.tinker.settings
        cases = [
            ({"sampling_params": {"max_tokens": 10**9}}, "RLHF_API_TINKER_MAX_SAMPLE_TOKENS"),
            ({"sampling_params": {"max_tokens": -5}}, "max_tokens must be 1.."),
            ({"num_samples": 10**6}, "RLHF_API_TINKER_MAX_NUM_SAMPLES"),
            ({"tokens": [1] * ts.max_sequence_tokens, "sampling_params": {"max_tokens": 8}}, "RLHF_API_TINKER_MAX_SEQUENCE_TOKENS"),
            ({"sampling_params": {"max_tokens": "lots"}}, "max_tokens must be an integer"),
            ({"sampling_params": {"temperature": "hot"}}, "temperature must be a number"),
            ({"sampling_params": {"top_p": "nan"}}, "top_p must be a finite number"),
            ({"sampling_params": {"seed": "x"}}, "seed must be an integer"),
            ({"sampling_params": {"stop": 7}}, "stop must be a list"),
            ({"tokens": [1, -3]}, "prompt token id must be 0.."),
            ({"tokens": [1, "a"]}, "prompt token id must be an integer"),
        ]
        for fields, named in cases:
            tokens = fields.pop("tokens", (1, 2))
            r = asample(c, sampler, tokens, **fields)
            assert r.status_code == 400 and named in r.json()["error"], (fields, r.status_code, r.text[:300])


def test_malformed_training_calls_are_400_not_500(api, keys):
    from tinker import types
    from tinker.proto.request_conv import forward_backward_request_to_proto

    with api.client(keys["alpha"]) as c:
        session = c.post("/api/v1/create_session", json={}).json()["session_id"]
        model_id = add_run(api, "alpha", session)
        t = api.app.state.tinker
        settings = t.settings
        try:
            for path, body, named in [
                ("create_model", {"base_model": "tiny", "lora_config": {"rank": "big"}}, "lora_config.rank must be an integer"),
                ("create_model", {"base_model": "tiny", "lora_config": {"rank": 10**6}}, "RLHF_API_TINKER_MAX_RANK"),
                ("create_model", {"base_model": "tiny", "lora_config": {"rank": 8, "seed": "s"}}, "seed must be an integer"),
                ("optim_step", {"model_id": model_id, "adam_params": {"learning_rate": "fast"}}, "learning_rate must be a number"),
                ("optim_step", {"model_id": model_id, "adam_params": [1]}, "adam_params must be an object"),
                ("save_weights", {"model_id": model_id, "path": 123}, "checkpoint name must be a string"),
                ("save_weights", {"model_id": model_id, "path": ["a"]}, "checkpoint name must be a string"),
                ("save_weights_for_sampler", {"model_id": model_id, "path": {"a": 1}}, "checkpoint name must be a string"),
            ]:
                r = c.post(f"/api/v1/{path}", json=body)
                assert r.status_code == 400 and named in r.json()["error"], (path, body, r.status_code, r.text[:300])
            headers = {"Content-Type": "application/x-protobuf"}
            r = c.post("/api/v1/forward_backward", content=b"\xff\xff\xff\xff garbage", headers=headers)
            assert r.status_code == 400 and "not a ForwardBackwardRequest" in r.json()["error"], r.text
            # A sequence longer than RLHF_API_TINKER_MAX_SEQUENCE_TOKENS (here lowered: the body limit bounds it too).
            n = 300
            datum = types.Datum(model_input=types.ModelInput.from_ints(list(range(1, n + 1))),
                                loss_fn_inputs={"target_tokens": list(range(2, n + 2)), "weights": [1.0] * n})
            fb = forward_backward_request_to_proto(types.ForwardBackwardRequest(
                forward_backward_input=types.ForwardBackwardInput(data=[datum], loss_fn="cross_entropy"), model_id=model_id, seq_id=1))
            t.settings = settings.model_copy(update={"max_sequence_tokens": 100})
            r = c.post("/api/v1/forward_backward", content=fb.SerializeToString(), headers=headers)
            assert r.status_code == 400 and "RLHF_API_TINKER_MAX_SEQUENCE_TOKENS" in r.json()["error"], r.text
        finally:
            t.settings = settings
            api.run(t.records.redis.srem, "tinker:held:alpha", model_id)


def test_a_run_id_that_could_not_be_read_back_is_refused_and_cannot_stop_the_sweep(api, keys):
    """create_training_client_from_state with a model_seq_id of 13 digits made a held run whose id Records.get refuses: the
    tenant's place was never freed, and the sweep of every tenant's ended sessions (any heartbeat) failed 404 on it, naming
    it to whichever tenant's heartbeat ran the sweep, and stopped there. Now 400; an unreadable held id is dropped."""
    t = api.app.state.tinker
    with api.client(keys["beta"]) as c, api.client(keys["alpha"]) as other:
        session, model_id, _ = run_with_checkpoint(api, c, "beta")
        held = api.run(t.records.held_runs, "beta")
        for seq in (10**12, -1, "x"):
            r = c.post("/api/v1/load_weights", json={"session_id": session, "path": f"tinker://{model_id}/weights/ck", "model_seq_id": seq})
            assert r.status_code == 400 and "model_seq_id must be" in r.json()["error"], r.text
        assert api.run(t.records.held_runs, "beta") == held
        # A held id with no readable record (as such a request left one): the sweep drops it and goes on.
        bogus = f"{session}:train:1234567890123"
        api.run(t.records.redis.sadd, "tinker:held:beta", bogus)
        t.swept = float("-inf")
        other_session = other.post("/api/v1/create_session", json={}).json()["session_id"]
        r = other.post("/api/v1/session_heartbeat", json={"session_id": other_session})
        assert r.status_code == 200, r.text
        assert bogus not in api.run(t.records.held_runs, "beta")
        api.run(t.records.redis.srem, "tinker:held:beta", model_id)


def test_paths_name_only_the_tenants_own_checkpoints(api, keys):
    """`..`, absolute paths, other shapes and another tenant's run: 400 or 404, and no server path in any answer."""
    with api.client(keys["alpha"]) as c, api.client(keys["beta"]) as other:
        session, model_id, _ = run_with_checkpoint(api, c, "alpha")
        other_session = other.post("/api/v1/create_session", json={}).json()["session_id"]
        root = api.app.state.storage.root
        for path, status in [(f"tinker://{model_id}/weights/..", 400), (f"tinker://{model_id}/weights/../../x", 400),
                             ("tinker://../weights/ck", 404), ("/etc/passwd", 400), ("file:///etc/passwd", 400),
                             (f"tinker://{model_id}/weights/nope", 404), (f"tinker://{model_id}/weights/ck/..", 400)]:
            r = c.post("/api/v1/create_sampling_session", json={"model_path": path, "session_id": session})
            assert r.status_code == status and str(root) not in r.text, (path, r.status_code, r.text)
        # Another tenant's checkpoint, run, listing: 404, the same as one that does not exist.
        r = other.post("/api/v1/create_sampling_session", json={"model_path": f"tinker://{model_id}/weights/ck", "session_id": other_session})
        assert r.status_code == 404 and str(root) not in r.text, r.text
        assert other.get(f"/api/v1/training_runs/{model_id}/checkpoints").status_code == 404
        assert other.post("/api/v1/save_weights", json={"model_id": model_id, "path": "mine"}).status_code == 404
        # The owner's sampler answers the tinker:// path, not where it lies.
        assert c.post("/api/v1/create_sampling_session", json={"base_model": "tiny", "session_id": other_session}).status_code == 404
        r = c.post("/api/v1/create_sampling_session", json={"model_path": f"tinker://{model_id}/weights/ck", "session_id": session})
        assert r.status_code == 200, r.text
        got = c.get(f"/api/v1/samplers/{r.json()['sampling_session_id']}")
        assert got.status_code == 200 and str(root) not in got.text
        assert other.get(f"/api/v1/samplers/{r.json()['sampling_session_id']}").status_code == 404
        api.run(api.app.state.tinker.records.redis.srem, "tinker:held:alpha", model_id)


@pytest.fixture()
def own_api(redis_url, operator, tmp_path):
    """An in-process API with two tenants of this test's own: the suite's other tests spend alpha's and beta's
    requests_per_minute in the same clock minute (Tinker calls count in it), which made this test's calls 429."""
    keys_path = tmp_path / "keys.yaml"
    tenants = {name: f"{name}-{uuid.uuid4().hex[:8]}" for name in ("alpha", "beta")}
    keys = {name: add_key(keys_path, tenant) for name, tenant in tenants.items()}
    with in_process(api_settings(redis_url, keys_path, operator)) as api:
        yield api, keys, tenants


def test_a_tenants_unfinished_futures_are_bounded(own_api, monkeypatch):
    """Each call is a future held in the API (and a pool call queued): there was no limit, so one tenant could queue
    unbounded work and memory. Past RLHF_API_TINKER_MAX_FUTURES_PER_TENANT unfinished, 429 (the SDK retries 429) naming
    it; another tenant is unaffected; finished futures are kept up to the same number per tenant."""
    api, keys, tenants = own_api
    with api.client(keys["alpha"]) as c:
        sampler_of(c)  # (the app makes its Tinker state at the first Tinker request)
    t = api.app.state.tinker
    gate = {}

    async def waiting_call(*args, **kwargs):
        await gate["open"].wait()
        return {"result": [{"tokens": [3], "logprobs": [0.0], "stop": True}], "compute_s": 0.0}

    async def make_gate():
        gate["open"] = asyncio.Event()

    api.run(make_gate)
    monkeypatch.setattr(t.pools, "call", waiting_call)
    monkeypatch.setattr(t.futures, "per_tenant", 3, raising=False)
    with api.client(keys["alpha"]) as c, api.client(keys["beta"]) as other:
        sampler, other_sampler = sampler_of(c), sampler_of(other)
        ids = [asample(c, sampler).json()["request_id"] for _ in range(3)]
        r = asample(c, sampler)
        assert r.status_code == 429 and "RLHF_API_TINKER_MAX_FUTURES_PER_TENANT" in r.json()["error"], r.text
        assert asample(other, other_sampler).status_code == 200
        api.run(_set, gate["open"])
        for rid in ids:
            assert c.post("/api/v1/retrieve_future", json={"request_id": rid}).status_code == 200
        for _ in range(5):  # each retrieved, so finished, before the next (a call still running is not trimmed)
            r = asample(c, sampler)
            assert r.status_code == 200
            assert c.post("/api/v1/retrieve_future", json={"request_id": r.json()["request_id"]}).status_code == 200
        assert asample(c, sampler).status_code == 200  # trims the finished ones to the newest 2, then adds itself
        kept = [rid for rid, entry in t.futures._tasks.items() if entry[0] == tenants["alpha"]]
        assert len(kept) == 3, len(kept)


async def _set(event: asyncio.Event) -> None:
    event.set()


def test_tinker_calls_count_in_requests_per_minute_but_polling_does_not(redis_url, operator, tmp_path):
    """Tinker routes were not counted at all. Now each call counts in the tenant's requests_per_minute (the jobs API's
    count: one budget), except retrieve_future of one of the tenant's futures (the SDK polls each call's future)."""
    keys_path = tmp_path / "keys.yaml"
    tenant = "tk-" + uuid.uuid4().hex[:8]  # a count of its own in the session's Redis
    key = add_key(keys_path, tenant)
    settings = api_settings(redis_url, keys_path, operator, RLHF_API_REQUESTS_PER_MINUTE="6", RLHF_API_REFUSED_REQUEST_DELAY_S="0")
    if time.time() % 60 > 45:  # the count is per clock minute: start early in one
        time.sleep(61 - time.time() % 60)
    with in_process(settings) as api, api.client(key) as c:
        headers = {"X-API-Key": key}
        session = c.post("/api/v1/create_session", json={}, headers=headers)  # 1
        assert session.status_code == 200, session.text

        async def a_future():
            return await api.app.state.tinker.futures.fail(tenant, None, "refused")

        rid = api.run(a_future)
        for _ in range(15):  # polls of its own future: not counted
            assert c.post("/api/v1/retrieve_future", json={"request_id": rid}, headers=headers).status_code == 200
        # A poll naming no future of the tenant's is counted (2).
        assert c.post("/api/v1/retrieve_future", json={"request_id": new_id("req")}, headers=headers).status_code == 404
        for _ in range(4):  # 3..6
            assert c.get("/api/v1/get_server_capabilities", headers=headers).status_code == 200
        r = c.get("/api/v1/get_server_capabilities", headers=headers)
        assert r.status_code == 429 and "requests_per_minute" in r.text and r.headers.get("Retry-After"), r.text
        assert c.post("/api/v1/create_session", json={}, headers=headers).status_code == 429
        # The jobs API shares the count.
        assert c.get("/v1/jobs").status_code == 429
        # Polling still works past the limit.
        assert c.post("/api/v1/retrieve_future", json={"request_id": rid}, headers=headers).status_code == 200


class _Launcher:
    """Ray's side of admission, as the reconciler sees it: what was submitted."""

    def __init__(self):
        self.submitted: list[str] = []

    async def submit(self, job_id, tenant, name, launch_spec, redis_user=None):
        self.submitted.append(job_id)

    async def state(self, submission_id):
        from api.launcher import RayJobMissing

        raise RayJobMissing(submission_id)

    async def stop(self, job_id):
        return True


@pytest.fixture
def own_store(tmp_path):
    """A JobStore on a Redis of its own: admission counts every active job of the Redis it admits from."""
    from api.store import JobStore
    from tests.api.test_reporting_faults import RedisServer
    from tests.conftest import stop_group

    server = RedisServer(tmp_path)
    server.start()
    yield JobStore(server.url)
    stop_group(server.proc)


def test_the_jobs_admission_queue_counts_the_cpus_the_tinker_pools_hold(api, own_store):
    """The admission queue saw the cluster's whole capacity while the adapter pools held CPUs of it, so it admitted jobs
    whose placement groups then could not be placed. Now the pools' CPUs (counted with the capacity) are taken: on 4 CPUs
    with pools holding 2, a job of 3 CPUs waits for 1 more; with none held it is admitted."""
    from api.admission import Capacity
    from api.reconciler import Reconciler

    store, launcher = own_store, _Launcher()
    reconciler = Reconciler(store, launcher, api.app.state.settings)
    reconciler._capacity = (time.monotonic() + 1e6, Capacity({"CPU": 4.0, "GPU": 0.0}, {"CPU": 4.0, "GPU": 0.0}))
    job_id = "job-" + uuid.uuid4().hex[:24]

    async def go():
        await store.create(job_id, "tk-" + uuid.uuid4().hex[:8], "q", {"name": "q"}, {}, None, launch_spec={"name": "q"},
                           demand=[{"CPU": 3.0}])
        reconciler._pool_cpus = 2.0
        await reconciler.admit([job_id])
        waiting = (await store.get(job_id))["queue"]
        reconciler._pool_cpus = 0.0
        await reconciler.admit([job_id])
        await store.close()
        return waiting

    waiting = asyncio.run(go())
    assert "waiting for 1 more CPUs" in waiting["reason"] and "2 CPUs and 0 GPUs are free" in waiting["reason"], waiting
    assert launcher.submitted == [job_id]


def test_the_admission_queue_counts_the_gpus_the_tinker_pools_hold(api, own_store):
    """With RLHF_API_TINKER_POOL_GPUS a pool holds a GPU: on a cluster of one GPU that a pool holds, a job asking for a GPU
    waits for it; with none held it is admitted."""
    from api.admission import Capacity
    from api.reconciler import Reconciler

    store, launcher = own_store, _Launcher()
    reconciler = Reconciler(store, launcher, api.app.state.settings)
    reconciler._capacity = (time.monotonic() + 1e6, Capacity({"CPU": 4.0, "GPU": 1.0}, {"CPU": 4.0, "GPU": 1.0}))
    job_id = "job-" + uuid.uuid4().hex[:24]

    async def go():
        await store.create(job_id, "tk-" + uuid.uuid4().hex[:8], "q", {"name": "q"}, {}, None, launch_spec={"name": "q"},
                           demand=[{"CPU": 1.0, "GPU": 1.0}])
        reconciler._pool_cpus, reconciler._pool_gpus = 1.0, 1.0
        await reconciler.admit([job_id])
        waiting = (await store.get(job_id))["queue"]
        reconciler._pool_cpus, reconciler._pool_gpus = 0.0, 0.0
        await reconciler.admit([job_id])
        await store.close()
        return waiting

    waiting = asyncio.run(go())
    assert "GPU" in waiting["reason"] and "0 GPUs are free" in waiting["reason"], waiting
    assert launcher.submitted == [job_id]


@pytest.mark.slow
def test_the_pools_cpus_are_counted_from_ray(ray_head):
    """pool_cpus reads the `pool-*` actors of the Tinker namespace from Ray's state API: a detached one of 1 CPU adds 1."""
    import subprocess
    import sys

    from api.tinker import NAMESPACE, pool_cpus
    from tests.conftest import RAY_ENV, wait_until

    env = {**os.environ, **RAY_ENV, "RAY_ADDRESS": ray_head.address}
    before = pool_cpus(ray_head.dashboard)
    code = (f"import ray; ray.init(address={ray_head.address!r}, namespace={NAMESPACE!r}, log_to_driver=False)\n"
            "A = ray.remote(num_cpus=1)(type('Probe', (), {'ping': lambda self: 1}))\n"
            "a = A.options(name='pool-probe', lifetime='detached').remote(); ray.get(a.ping.remote())\n")
    subprocess.run([sys.executable, "-c", code], env=env, timeout=120, check=True)
    try:
        wait_until(lambda: pool_cpus(ray_head.dashboard) == before + 1, 30, "the probe pool to be counted")
    finally:
        kill = (f"import ray; ray.init(address={ray_head.address!r}, namespace={NAMESPACE!r}, log_to_driver=False)\n"
                "ray.kill(ray.get_actor('pool-probe'), no_restart=True)\n")
        subprocess.run([sys.executable, "-c", kill], env=env, timeout=120, check=True)
    wait_until(lambda: pool_cpus(ray_head.dashboard) == before, 30, "the killed probe pool to be uncounted")


def test_a_server_failure_names_no_server_path_or_address(api, keys):
    """A call that failed on the server (a dead pool actor, a torch error, a lost file) answered its exception's last line,
    which can carry the store's paths and the nodes' addresses; now its kind and the request id, the rest in the log."""
    t = api.app.state.tinker

    async def failing():
        async def make():
            raise RuntimeError("The actor died: node 10.1.2.3:6379 lost; No such file: /srv/rlhf/tenants/alpha/tinker/state.pt")

        return await t.futures.submit("alpha", None, make)

    rid = api.run(failing)
    with api.client(keys["alpha"]) as c:
        answer = c.post("/api/v1/retrieve_future", json={"request_id": rid}).json()
    assert answer["category"] == "server" and "RuntimeError" in answer["error"] and rid in answer["error"], answer
    assert "10.1.2.3" not in answer["error"] and "/srv/" not in answer["error"], answer


def test_a_checkpoint_of_another_lora_shape_is_refused_naming_both(tiny_model, tmp_path):
    """load_state of a rank-4 checkpoint into a rank-8 run failed in torch's copy_ (a size mismatch: a server error, its
    message the store's paths and all); now the pool refuses it (a user error) naming both shapes, and the run is intact."""
    from workers.tinker_pool import AdapterPool, PoolError

    pool = AdapterPool(str(tiny_model), threads=1)
    pool.create("small", rank=4, seed=0)
    saved = pool.save_state("small", str(tmp_path / "small"), optimizer=True)
    pool.create("big", rank=8, seed=0, train_mlp=False)
    before = {k: v.clone() for k, v in pool._named_params("big").items()}
    with pytest.raises(PoolError, match=r"rank 4, q_proj.*is not this run's \(rank 8, q_proj"):
        pool.load_state("big", saved, optimizer=True)
    assert all(torch_equal(v, pool._named_params("big")[k]) for k, v in before.items())


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))
