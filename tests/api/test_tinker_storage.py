"""What a Tinker tenant leaves behind: saved checkpoints within a per-tenant quota (count and bytes), their deletion,
and session records that expire when the heartbeats stop (their runs' adapters leave the pool, their checkpoints stay).

Fast: the in-process API on the session's Redis and artifact store, with a stand-in for the pool's calls (its
save_state writes a file of a known size, as the pool writes state.pt). Slow: the real SDK against `rlhf serve` with
the adapter pool on the session's Ray head.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from api.auth import add_key
from api.storage import tenant_dirname
from tests.api.conftest import ApiServer, api_env, api_settings, in_process
from tests.api.test_tinker import (
    SEQ,
    _driver_env,
    _kill_pools,
    service,
    sft_datum,
    sft_steps,
    tokenizer,
)
from tests.api.test_tinker_limits import add_run, failed
from tests.conftest import free_port, wait_until

pytest.importorskip("tinker")
import tinker
from tinker import types

SAVE_BYTES = 1000  # what the stand-in pool writes per checkpoint


@pytest.fixture()
def own_api(redis_url, operator, tmp_path, monkeypatch):
    """`start(**env)`: an in-process API with tenants of this test's own, its Tinker settings from `RLHF_API_TINKER_<name>`
    set to `env` before its first Tinker request, and its pool calls answered by a stand-in (recorded in `calls`)."""
    keys_path = tmp_path / "keys.yaml"
    tenants = {name: f"{name}-{uuid.uuid4().hex[:8]}" for name in ("alpha", "beta")}
    keys = {name: add_key(keys_path, tenant) for name, tenant in tenants.items()}
    calls: list[tuple[str, str, tuple]] = []

    async def pool_call(base_model, path, tenant, method, *args, **kwargs):
        calls.append((tenant, method, args))
        if method == "save_state":
            os.makedirs(args[1], exist_ok=True)
            Path(args[1], "state.pt").write_bytes(b"x" * SAVE_BYTES)
        return {"result": {}, "compute_s": 0.0}

    with contextlib.ExitStack() as stack:
        def start(**env: str):
            for name, value in env.items():
                monkeypatch.setenv(f"RLHF_API_TINKER_{name}", value)
            api = stack.enter_context(in_process(api_settings(redis_url, keys_path, operator)))
            with api.client(keys["alpha"]) as c:
                c.get("/api/v1/usage")  # the app makes its Tinker state (settings from the env) now
            monkeypatch.setattr(api.app.state.tinker.pools, "call", pool_call)
            return api

        yield start, keys, tenants, calls
        # Held runs left with a live session would be released by the session-wide in-process API's sweep once the
        # session expires, which would then join Ray from this process to drop them.
        import redis

        redis.Redis.from_url(redis_url).delete(*(f"tinker:held:{tenant}" for tenant in tenants.values()))


def result(c, r: httpx.Response) -> dict:
    assert r.status_code == 200, r.text
    while True:  # the server long-polls for up to RLHF_API_TINKER_WAIT_S, then answers try_again
        answer = c.post("/api/v1/retrieve_future", json={"request_id": r.json()["request_id"]})
        assert answer.status_code == 200, answer.text
        if answer.json().get("type") != "try_again":
            return answer.json()


def listed(c, model_id: str) -> list[str]:
    r = c.get(f"/api/v1/training_runs/{model_id}/checkpoints")
    assert r.status_code == 200, r.text
    return [x["checkpoint_id"] for x in r.json()["checkpoints"]]


def test_past_the_count_limit_unnamed_sampler_weights_are_evicted_then_saves_fail_naming_it(own_api):
    """A loop that saves every step cannot fill the disk: at 4 checkpoints (the limit here), a save first evicts the
    tenant's oldest sampler weights saved without a name; when only named ones are left it fails naming the setting
    and how to free space. Overwriting a name takes no new place. Another tenant is not affected."""
    start, keys, tenants, _ = own_api
    api = start(MAX_CHECKPOINTS_PER_TENANT="4")
    root = f"{api.app.state.storage.tenant_root(tenants['alpha'])}/tinker"
    with api.client(keys["alpha"]) as c, api.client(keys["beta"]) as other:
        run = add_run(api, tenants["alpha"], c.post("/api/v1/create_session", json={}).json()["session_id"])
        samplers = [result(c, c.post("/api/v1/save_weights_for_sampler", json={"model_id": run}))["sampling_session_id"]
                    for _ in range(3)]
        for name in ("n1", "n2", "n3", "n4"):
            assert result(c, c.post("/api/v1/save_weights", json={"model_id": run, "path": name}))["path"].endswith(name)
        assert sorted(listed(c, run)) == ["weights/n1", "weights/n2", "weights/n3", "weights/n4"]
        # The evicted weights' sampling client says so (before: a server error from the pool's failed load).
        prompt = {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]}
        r = c.post("/api/v1/asample", json={"sampling_session_id": samplers[0], "prompt": prompt})
        assert r.status_code == 404 and "evicted past the checkpoint quota" in r.json()["error"], r.text
        r = c.post("/api/v1/save_weights", json={"model_id": run, "path": "n5"})
        answer = types.RequestFailedResponse.model_validate(result(c, r))
        assert "you have 4 checkpoints" in answer.error and "RLHF_API_TINKER_MAX_CHECKPOINTS_PER_TENANT = 4" in answer.error
        assert "delete_checkpoint_from_tinker_path" in answer.error and root not in answer.error
        assert not os.path.exists(f"{root}/{run}/weights/n5")
        r = c.post("/api/v1/save_weights_for_sampler", json={"model_id": run})  # an unnamed save is refused the same way
        assert "MAX_CHECKPOINTS_PER_TENANT" in failed(c, r.json()["request_id"]).error
        assert "path" in result(c, c.post("/api/v1/save_weights", json={"model_id": run, "path": "n2"}))  # overwrite: no new place
        # Another tenant has a quota of its own.
        other_run = add_run(api, tenants["beta"], other.post("/api/v1/create_session", json={}).json()["session_id"])
        assert "path" in result(other, other.post("/api/v1/save_weights", json={"model_id": other_run, "path": "b1"}))


def test_past_the_byte_limit_a_save_fails_naming_it(own_api):
    start, keys, tenants, _ = own_api
    api = start(MAX_CHECKPOINT_BYTES_PER_TENANT=str(2 * SAVE_BYTES + 500))
    with api.client(keys["alpha"]) as c:
        run = add_run(api, tenants["alpha"], c.post("/api/v1/create_session", json={}).json()["session_id"])
        for name in ("a", "b", "c"):  # a save starts while under the limit: the third takes the tenant past it
            assert "path" in result(c, c.post("/api/v1/save_weights_for_sampler", json={"model_id": run, "path": name}))
        error = failed(c, c.post("/api/v1/save_weights", json={"model_id": run, "path": "d"}).json()["request_id"]).error
        assert "2.9 KiB of checkpoints" in error and "RLHF_API_TINKER_MAX_CHECKPOINT_BYTES_PER_TENANT = 2.4 KiB" in error, error


def test_deleting_a_checkpoint_frees_its_bytes_and_quota_and_is_the_tenants_own(own_api):
    """The SDK's delete_checkpoint route (DELETE training_runs/<run>/checkpoints/<kind>/<name>): 204, the files gone, a
    save refused at the limit goes through after; another tenant's checkpoint, a missing one: 404; other shapes: 400."""
    start, keys, tenants, _ = own_api
    api = start(MAX_CHECKPOINTS_PER_TENANT="2")
    root = f"{api.app.state.storage.tenant_root(tenants['alpha'])}/tinker"
    records = api.app.state.tinker.records
    with api.client(keys["alpha"]) as c, api.client(keys["beta"]) as other:
        run = add_run(api, tenants["alpha"], c.post("/api/v1/create_session", json={}).json()["session_id"])
        result(c, c.post("/api/v1/save_weights_for_sampler", json={"model_id": run, "path": "w"}))
        result(c, c.post("/api/v1/save_weights", json={"model_id": run, "path": "s"}))
        assert api.run(records.get, "training_run", run, tenants["alpha"])["last_state"] == f"{root}/{run}/weights/s"
        assert "MAX_CHECKPOINTS" in failed(c, c.post("/api/v1/save_weights", json={"model_id": run, "path": "t"}).json()["request_id"]).error
        for path, status in [(f"training_runs/{run}/checkpoints/weights/nope", 404),
                             (f"training_runs/{run}/checkpoints/external_weights/s", 400),
                             (f"training_runs/{run}/checkpoints/weights/a%20b", 400),
                             (f"training_runs/tm-{uuid.uuid4().hex[:24]}/checkpoints/weights/s", 404)]:
            r = c.delete(f"/api/v1/{path}")
            assert r.status_code == status and root not in r.text, (path, r.status_code, r.text)
        r = other.delete(f"/api/v1/training_runs/{run}/checkpoints/weights/s")
        assert r.status_code == 404, r.text
        assert os.path.isfile(f"{root}/{run}/weights/s/state.pt")
        r = c.delete(f"/api/v1/training_runs/{run}/checkpoints/weights/s")
        assert r.status_code == 204, r.text
        assert not os.path.exists(f"{root}/{run}/weights")  # the checkpoint's directory, and its kind's left empty
        assert listed(c, run) == ["sampler_weights/w"]
        # A lost pool actor's recovery would load the run's last saved state: it is gone, so it is forgotten.
        assert api.run(records.get, "training_run", run, tenants["alpha"])["last_state"] is None
        assert "path" in result(c, c.post("/api/v1/save_weights", json={"model_id": run, "path": "t"}))
        assert c.delete(f"/api/v1/training_runs/{run}/checkpoints/weights/s").status_code == 404


def test_a_session_record_expires_without_heartbeats_and_its_runs_leave_the_pool(own_api, redis_url):
    """Session records have a TTL (RLHF_API_TINKER_SESSION_TIMEOUT_S, here 1 s) that each heartbeat renews. One that
    stops beating expires; the API's background sweep (no request needed) releases its runs and drops their adapters
    from the pool; its checkpoints stay. A session that beats outlives the TTL many times over."""
    import redis

    start, keys, tenants, calls = own_api
    api = start(SESSION_TIMEOUT_S="1", SWEEP_S="0")
    store = redis.Redis.from_url(redis_url)
    t = api.app.state.tinker
    with api.client(keys["alpha"]) as c:
        dead = c.post("/api/v1/create_session", json={}).json()["session_id"]
        assert 0 < store.pttl(f"tinker:session:{dead}") <= 1000
        run = add_run(api, tenants["alpha"], dead)
        result(c, c.post("/api/v1/save_weights", json={"model_id": run, "path": "kept"}))
        # Its sampling sessions live in one hash that expires with it (one per step of an RL loop: not one key each).
        sampler = c.post("/api/v1/create_sampling_session", json={"base_model": "tiny", "session_id": dead}).json()["sampling_session_id"]
        assert 0 < store.pttl(f"tinker:samplers:{dead}") <= 1000
        # No request from here on: the background sweep alone releases the run.
        wait_until(lambda: (tenants["alpha"], "drop", (run,)) in calls, 10, "the pool to drop the expired session's adapter")
        assert not store.exists(f"tinker:session:{dead}") and not store.exists(f"tinker:samplers:{dead}")
        assert c.get(f"/api/v1/samplers/{sampler}").status_code == 404
        assert api.run(t.records.held_runs, tenants["alpha"]) == []
        state = f"{api.app.state.storage.tenant_root(tenants['alpha'])}/tinker/{run}/weights/kept/state.pt"
        assert os.path.isfile(state)
        r = c.post("/api/v1/optim_step", json={"model_id": run, "adam_params": {"learning_rate": 1e-4}})
        assert r.status_code == 400 and f"its session {dead} timed out" in r.json()["error"], r.text
        r = c.post("/api/v1/session_heartbeat", json={"session_id": dead})
        assert r.status_code == 410 and "RLHF_API_TINKER_SESSION_TIMEOUT_S" in r.json()["error"], r.text  # the SDK stops beating on 410
        assert c.post(f"/api/v1/sessions/{dead}/finish", json={}).status_code == 200  # ServiceClient.close() after expiry
        r = c.post("/api/v1/create_model", json={"session_id": dead, "base_model": "tiny", "lora_config": {"rank": 4}})
        assert r.status_code == 404, r.text  # no new run in an expired session
        # A session that beats (every 0.3 s, for 3 TTLs) stays, with its run.
        live = c.post("/api/v1/create_session", json={}).json()["session_id"]
        live_run = add_run(api, tenants["alpha"], live)
        live_sampler = c.post("/api/v1/create_sampling_session", json={"base_model": "tiny", "session_id": live}).json()["sampling_session_id"]
        for _ in range(10):
            time.sleep(0.3)
            assert c.post("/api/v1/session_heartbeat", json={"session_id": live}).status_code == 200
        assert store.exists(f"tinker:session:{live}") and api.run(t.records.held_runs, tenants["alpha"]) == [live_run]
        assert c.get(f"/api/v1/samplers/{live_sampler}").status_code == 200
        api.run(t.records.release_run, tenants["alpha"], live_run, "test over")


# -- with the SDK, against `rlhf serve` and the adapter pool on Ray (slow) ------------------------------------------

MAX_SAVED, TTL_S = 3, 15  # the SDK beats every 10 s (a constant of its own): the TTL leaves it 5 s


@pytest.fixture(scope="module")
def storage_api(redis_url, ray_head, workdir, operator, tmp_path_factory):
    """`rlhf serve` with a quota of 3 checkpoints and a 15 s session TTL, and tenants of its own (the quota is per
    tenant, over the artifact store the session's other Tinker tests write to too)."""
    keys_path = tmp_path_factory.mktemp("storage-keys") / "keys.yaml"
    tenants = {name: f"{name}-{uuid.uuid4().hex[:8]}" for name in ("alpha", "beta", "gamma")}
    keys = {name: add_key(keys_path, tenant) for name, tenant in tenants.items()}
    port = free_port()
    env = api_env(redis_url, ray_head, keys_path, port, operator, RLHF_API_TINKER_RAY_ADDRESS=ray_head.address,
                  RLHF_API_REQUESTS_PER_MINUTE="100000", RLHF_API_TINKER_MAX_CHECKPOINTS_PER_TENANT=str(MAX_SAVED),
                  RLHF_API_TINKER_SESSION_TIMEOUT_S=str(TTL_S), RLHF_API_TINKER_SWEEP_S="1")
    server = ApiServer(env, port, workdir / "api-tinker-storage.log")
    server.start()
    yield server, keys, tenants
    server.stop()
    _kill_pools(ray_head)  # detached: the pool of this module's server would hold its CPU for the rest of the session


def _pool_has(ray_head, tenant: str, adapter: str) -> bool:
    """Whether the base model's pool holds `adapter` in memory, asked from a driver of its own."""
    import subprocess

    code = (f"import ray; ray.init(address={ray_head.address!r}, namespace='rlhf-tinker', log_to_driver=False)\n"
            f"print(ray.get(ray.get_actor('pool-tiny').call.remote({tenant!r}, 'has', {adapter!r}))['result'])\n")
    out = subprocess.run([sys.executable, "-c", code], env=_driver_env(ray_head), timeout=60, check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1] == "True"


@pytest.mark.slow
def test_with_the_sdk_saves_stop_at_the_quota_and_delete_checkpoint_frees_a_place(storage_api, operator, tiny_model):
    api, keys, tenants = storage_api
    tok = tokenizer(tiny_model)
    prompt = types.ModelInput.from_ints(tok.encode("hello there"))
    params = types.SamplingParams(max_tokens=4, temperature=1.0, seed=0)
    root = Path(operator["RLHF_API_STORAGE_ROOT"]) / "tenants" / tenant_dirname(tenants["alpha"]) / "tinker"
    with service(api, keys["alpha"]) as sc:
        tc = sc.create_lora_training_client(base_model="tiny", rank=4, seed=0).result(timeout=120)
        rest = tinker.RestClient(base_url=api.url, api_key=keys["alpha"])
        s1 = tc.save_state("s1").result(timeout=120).path
        tc.save_state("s2").result(timeout=120)
        tc.save_weights_for_sampler("w1").result(timeout=120)
        with pytest.raises(tinker.RequestFailedError, match=f"you have {MAX_SAVED} checkpoints.*MAX_CHECKPOINTS_PER_TENANT = {MAX_SAVED}"):
            tc.save_state("s3").result(timeout=120)
        with pytest.raises(tinker.NotFoundError):  # another tenant's checkpoint: as if there were none
            tinker.RestClient(base_url=api.url, api_key=keys["beta"]).delete_checkpoint_from_tinker_path(s1).result(timeout=60)
        assert (root / tc.model_id / "weights" / "s1" / "state.pt").is_file()
        rest.delete_checkpoint_from_tinker_path(s1).result(timeout=60)
        assert not (root / tc.model_id / "weights" / "s1").exists()
        ids = {c.checkpoint_id for c in rest.list_checkpoints(tc.model_id).result(timeout=60).checkpoints}
        assert ids == {"weights/s2", "sampler_weights/w1"}
        # An RL loop's sampling client of every step: at the quota, each save evicts the oldest unnamed one.
        first = tc.save_weights_and_get_sampling_client().result(timeout=120)
        second = tc.save_weights_and_get_sampling_client().result(timeout=120)
        assert len(second.sample(prompt, num_samples=1, sampling_params=params).result(timeout=120).sequences) == 1
        with pytest.raises(tinker.NotFoundError, match="evicted past the checkpoint quota"):
            first.sample(prompt, num_samples=1, sampling_params=params).result(timeout=120)
        ids = {c.checkpoint_id for c in rest.list_checkpoints(tc.model_id).result(timeout=60).checkpoints}
        assert len(ids) == MAX_SAVED and {"weights/s2", "sampler_weights/w1"} < ids, ids


@pytest.mark.slow
def test_with_the_sdk_a_beating_session_outlives_its_ttl_and_a_silent_ones_adapter_leaves_the_pool(storage_api, ray_head, redis_url,
                                                                                                     tiny_model):
    """A client that stops beating (plain HTTP here, as a killed process leaves it): its session record expires after
    the TTL and the API's sweep drops its run's adapter from the pool, with no other request; its saved state stays and
    loads into a new run. The SDK's client, beating every 10 s, keeps its session and run over the same time."""
    import redis

    api, keys, tenants = storage_api
    store = redis.Redis.from_url(redis_url)
    with service(api, keys["gamma"]) as sc, httpx.Client(base_url=api.url, headers={"X-API-Key": keys["gamma"]}, timeout=60) as dead:
        tc = sc.create_lora_training_client(base_model="tiny", rank=4, seed=0).result(timeout=120)
        born = time.monotonic()  # the SDK's session was made before this
        sdk_session = json.loads(store.get(f"tinker:training_run:{tc.model_id}"))["session"]
        session = dead.post("/api/v1/create_session", json={}).json()["session_id"]
        r = dead.post("/api/v1/create_model", json={"session_id": session, "model_seq_id": 0, "base_model": "tiny", "lora_config": {"rank": 4}})
        run = result(dead, r)["model_id"]
        assert result(dead, dead.post("/api/v1/save_weights", json={"model_id": run, "path": "kept"}))["path"] == f"tinker://{run}/weights/kept"
        assert _pool_has(ray_head, tenants["gamma"], run)
        start = time.monotonic()
        wait_until(lambda: not store.sismember(f"tinker:held:{tenants['gamma']}", run), TTL_S + 30, "the silent session's run to be released",
                   interval=0.5)
        print(f"released {time.monotonic() - start:.1f} s after its last request (TTL {TTL_S} s, sweep every 1 s)")
        assert not store.exists(f"tinker:session:{session}")
        wait_until(lambda: not _pool_has(ray_head, tenants["gamma"], run), 30, "the pool to drop the released run's adapter")
        # The SDK's session, older than the silent one, lives on its heartbeats past the TTL (here by 10 s): its run trains.
        time.sleep(max(0.0, born + TTL_S + 10 - time.monotonic()))
        assert store.exists(f"tinker:session:{sdk_session}") and store.sismember(f"tinker:held:{tenants['gamma']}", tc.model_id)
        assert _pool_has(ray_head, tenants["gamma"], tc.model_id)
        assert sft_steps(tc, [sft_datum(tokenizer(tiny_model), SEQ)], 1)[0] > 0
        # The released run's saved state stays: a new run starts from it.
        tc2 = sc.create_training_client_from_state(f"tinker://{run}/weights/kept").result(timeout=120)
        assert tc2.get_info().lora_rank == 4
