"""The Tinker-compatible API with the real `tinker` SDK (0.38) against the real server: `rlhf serve` on a
real Redis, the adapter pool a real Ray actor on the session's Ray head, the session's tiny Qwen2.

The keys are the jobs API's keys (tests/api/conftest.py `keys`), used unchanged as the SDK's api_key.
"""

from __future__ import annotations

import os
import sys
import threading
import time

import httpx
import pytest

from api.auth import KEY_PREFIX
from tests.api.conftest import ApiServer, api_env
from tests.conftest import free_port

pytest.importorskip("tinker")
import tinker
from tinker import types

SEQ = "the quick brown fox jumps over the lazy dog. " * 2
MAX_RUNS = 4  # training runs a tenant may hold at once here; each test closes its ServiceClients, which releases theirs


@pytest.fixture(scope="module")
def tinker_api(redis_url, ray_head, keys, workdir, operator):
    port = free_port()
    env = api_env(redis_url, ray_head, keys["path"], port, operator, RLHF_API_TINKER_RAY_ADDRESS=ray_head.address,
                  RLHF_API_REQUESTS_PER_MINUTE="100000",
                  RLHF_API_TINKER_MAX_RUNS_PER_TENANT=str(MAX_RUNS), RLHF_API_TINKER_SWEEP_S="0")
    server = ApiServer(env, port, workdir / "api-tinker.log")
    server.start()
    yield server
    server.stop()
    _kill_pools(ray_head)


def _kill_pools(ray_head, restart: bool = False) -> None:
    """Kill the pool actors (detached, named) from a driver of its own: for good at the end, or (restart) as a crash Ray restarts."""
    import subprocess

    code = (f"import ray; ray.init(address={ray_head.address!r}, namespace='rlhf-tinker', log_to_driver=False)\n"
            "from ray.util.state import list_actors\n"
            "for a in list_actors(filters=[('state', '=', 'ALIVE')]):\n"
            "    if a.name and a.name.startswith('pool-'):\n"
            f"        ray.kill(ray.get_actor(a.name), no_restart={not restart})\n")
    subprocess.run([sys.executable, "-c", code], env=_driver_env(ray_head), timeout=60, check=True)


def service(api: ApiServer, key: str) -> tinker.ServiceClient:
    """A session of the SDK; use it in `with`: closing it releases its training runs."""
    return tinker.ServiceClient(base_url=api.url, api_key=key)


def _driver_env(ray_head) -> dict[str, str]:
    # RAY_ADDRESS: the state API finds the cluster by it (another Ray instance on the machine makes `auto` ambiguous).
    return {**os.environ, "RAY_AUTH_MODE": "token", "RAY_ADDRESS": ray_head.address}


def _pool_log(ray_head) -> list[tuple[str, str]]:
    """The pool's log of served calls, (tenant, method), read from a driver of its own."""
    import json
    import subprocess

    code = (f"import json, ray; ray.init(address={ray_head.address!r}, namespace='rlhf-tinker', log_to_driver=False)\n"
            "print(json.dumps(ray.get(ray.get_actor('pool-tiny').served_log.remote())))\n")
    out = subprocess.run([sys.executable, "-c", code], env=_driver_env(ray_head), timeout=60, check=True,
                         capture_output=True, text=True).stdout
    return [tuple(x) for x in json.loads(out.strip().splitlines()[-1])]


def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def sft_datum(tok, text: str) -> types.Datum:
    ids = tok.encode(text)
    return types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                       loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)})


def sft_steps(tc, data, steps: int, lr: float = 2e-3) -> list[float]:
    losses = []
    for _ in range(steps):
        fb = tc.forward_backward(data, "cross_entropy")
        opt = tc.optim_step(types.AdamParams(learning_rate=lr))
        losses.append(fb.result(timeout=120).metrics["loss:sum"])
        opt.result(timeout=120)
    return losses


def test_new_keys_carry_the_sdk_prefix_and_old_keys_still_work(keys, tmp_path):
    """A key `rlhf keys create` prints passes the SDK's own check unchanged; a key made before (`rlhf-...`) still maps to its tenant."""
    from tinker.lib._auth_token_provider import ApiKeyAuthProvider

    from api.auth import KeyRing, hash_key

    assert keys["alpha"].startswith(KEY_PREFIX) and KEY_PREFIX == "tml-"
    assert ApiKeyAuthProvider(keys["alpha"]).api_key == keys["alpha"]
    old = "rlhf-" + "x" * 43
    (tmp_path / "keys.yaml").write_text(f"keys:\n  - tenant: old\n    sha256: {hash_key(old)}\n")
    assert KeyRing(tmp_path / "keys.yaml").tenant_for(old) == "old"
    with pytest.raises(tinker.TinkerError, match="tml-"):
        ApiKeyAuthProvider(old)


@pytest.mark.slow
def test_supervised_loop_loss_falls(tinker_api, keys, tiny_model):
    with service(tinker_api, keys["alpha"]) as sc:
        caps = sc.create_rest_client().get_server_capabilities().result()
        assert "tiny-alpha" in {m.model_name for m in caps.supported_models}
        assert "tiny-beta" not in {m.model_name for m in caps.supported_models}
        tc = sc.create_lora_training_client(base_model="tiny", rank=8, seed=0).result()
        tok = tokenizer(tiny_model)
        losses = sft_steps(tc, [sft_datum(tok, SEQ)], 10)
        print("supervised loss over 10 steps:", [round(x, 2) for x in losses])
        assert losses[-1] < 0.8 * losses[0], losses
        with httpx.Client(base_url=tinker_api.url, headers={"X-API-Key": keys["alpha"]}) as c:
            usage = c.get("/api/v1/usage").json()
        assert usage["tokens"] >= 10 * len(tok.encode(SEQ)) - 10 and usage["compute_s"] > 0


@pytest.mark.slow
def test_rl_loop_with_importance_sampling_and_sampled_logprobs(tinker_api, keys, tiny_model):
    """Sample with log-probs from the current weights, then an importance-sampling step on those samples:
    the sampler's log-probs equal the trainer's on the same tokens (ratio 1 before the update)."""
    with service(tinker_api, keys["alpha"]) as sc:
        tc = sc.create_lora_training_client(base_model="tiny", rank=8, seed=0).result()
        tok = tokenizer(tiny_model)
        prompt = tok.encode("2+2=")
        sampler = tc.save_weights_and_get_sampling_client()
        res = sampler.sample(types.ModelInput.from_ints(prompt), num_samples=4,
                             sampling_params=types.SamplingParams(max_tokens=6, temperature=1.0, seed=1)).result(timeout=120)
        assert len(res.sequences) == 4
        data = []
        for i, seq in enumerate(res.sequences):
            assert seq.logprobs is not None and len(seq.logprobs) == len(seq.tokens) > 0
            full = prompt + list(seq.tokens)
            n = len(full) - 1
            # Advantages: the first two samples good, the others bad; only completion tokens count.
            adv = [0.0] * (len(prompt) - 1) + [1.0 if i < 2 else -1.0] * len(seq.tokens)
            old = [0.0] * (len(prompt) - 1) + list(seq.logprobs)
            data.append(types.Datum(model_input=types.ModelInput.from_ints(full[:-1]),
                                    loss_fn_inputs={"target_tokens": full[1:], "logprobs": old, "advantages": adv}))
            assert len(adv) == n
        fwd = tc.forward(data, "importance_sampling").result(timeout=120)
        for datum, out, seq in zip(data, fwd.loss_fn_outputs, res.sequences):
            trained = out["logprobs"].to_numpy()[len(prompt) - 1:]
            assert abs(trained - seq.logprobs).max() < 1e-3
        before = tc.forward_backward(data, "importance_sampling").result(timeout=120).metrics["loss:sum"]
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result(timeout=120)
        after = tc.forward(data, "importance_sampling").result(timeout=120).metrics["loss:sum"]
        assert after < before
        # What this server does not do is named in the SDK's failed-future shape.
        with pytest.raises(tinker.RequestFailedError, match="cispo"):
            tc.forward_backward(data, "cispo").result(timeout=120)


@pytest.mark.slow
def test_save_and_load_state_resume_exactly(tinker_api, keys, tiny_model):
    with service(tinker_api, keys["alpha"]) as sc:
        tok = tokenizer(tiny_model)
        data = [sft_datum(tok, SEQ)]
        tc = sc.create_lora_training_client(base_model="tiny", rank=8, seed=0).result()
        sft_steps(tc, data, 3)
        path = tc.save_state("after-3").result(timeout=120).path
        assert path == f"tinker://{tc.model_id}/weights/after-3"
        reference = sft_steps(tc, data, 3)
        # A second run loads the state with its optimizer and takes the same 3 steps: the same losses.
        tc2 = sc.create_lora_training_client(base_model="tiny", rank=8, seed=5).result()
        tc2.load_state_with_optimizer(path).result(timeout=120)
        resumed = sft_steps(tc2, data, 3)
        assert resumed == pytest.approx(reference, rel=1e-5, abs=1e-4)
        # Without the optimizer: the same first loss (same weights), a different trajectory after.
        tc3 = sc.create_lora_training_client(base_model="tiny", rank=8, seed=5).result()
        tc3.load_state(path).result(timeout=120)
        fresh = sft_steps(tc3, data, 2)
        assert fresh[0] == pytest.approx(reference[0], rel=1e-5)
        assert fresh[1] != pytest.approx(reference[1], rel=1e-6)
        ids = {c.checkpoint_id for c in sc.create_rest_client().list_checkpoints(tc.model_id).result().checkpoints}
        assert "weights/after-3" in ids
    # A new run made from the state (create_training_client_from_state_with_optimizer) takes the same 3 steps too.
    with service(tinker_api, keys["alpha"]) as sc:
        tc4 = sc.create_training_client_from_state_with_optimizer(path).result(timeout=120)
        assert tc4.get_info().lora_rank == 8
        assert sft_steps(tc4, data, 3) == pytest.approx(reference, rel=1e-5, abs=1e-4)
        with httpx.Client(base_url=tinker_api.url, headers={"X-API-Key": keys["beta"]}) as c:
            assert c.post("/api/v1/get_info", json={"model_id": tc4.model_id}).status_code == 404


@pytest.mark.slow
def test_two_tenants_isolated_and_both_progress(tinker_api, keys, tiny_model):
    tok = tokenizer(tiny_model)
    with service(tinker_api, keys["alpha"]) as a, service(tinker_api, keys["beta"]) as b:
        ta = a.create_lora_training_client(base_model="tiny", rank=8, seed=0).result()
        tb = b.create_lora_training_client(base_model="tiny", rank=8, seed=0).result()
        path_a = ta.save_state("a0").result(timeout=120).path
        # Another tenant's run and checkpoint are 404, as if they did not exist.
        with pytest.raises(Exception, match="404|not found|No training run|no training run"):
            tb.load_state(path_a).result(timeout=120)
        with httpx.Client(base_url=tinker_api.url, headers={"X-API-Key": keys["beta"]}) as c:
            r = c.post("/api/v1/get_info", json={"model_id": ta.model_id})
            assert r.status_code == 404
            assert c.get(f"/api/v1/training_runs/{ta.model_id}/checkpoints").status_code == 404
            assert c.post("/api/v1/no_such_route", json={}).status_code == 404
        # Both train at once on the one pool of the base model; both losses fall.
        results: dict[str, list[float]] = {}
        threads = [threading.Thread(target=lambda n, tc, t: results.__setitem__(n, sft_steps(tc, [sft_datum(tok, t)], 6)),
                                    args=(n, tc, t)) for n, tc, t in (("a", ta, SEQ), ("b", tb, "hello world, " * 6))]
        start = time.monotonic()
        for th in threads:
            th.start()
        for th in threads:
            th.join(300)
        print(f"two tenants, 6 steps each, at once: {time.monotonic() - start:.1f} s", results)
        assert results["a"][-1] < results["a"][0] and results["b"][-1] < results["b"][0], results


@pytest.mark.slow
def test_a_lost_pool_actor_resumes_from_the_last_saved_state(tinker_api, keys, ray_head, tiny_model):
    """Ray restarts a killed pool actor without its adapters: a run with a saved state goes on from it, one without fails saying so."""
    with service(tinker_api, keys["alpha"]) as sc:
        tok = tokenizer(tiny_model)
        data = [sft_datum(tok, SEQ)]
        saved = sc.create_lora_training_client(base_model="tiny", rank=8, seed=0).result()
        unsaved = sc.create_lora_training_client(base_model="tiny", rank=8, seed=0).result()
        sft_steps(saved, data, 2)
        saved.save_state("s2").result(timeout=120)
        at_save = saved.forward(data, "cross_entropy").result(timeout=120).metrics["loss:sum"]
        sft_steps(saved, data, 2)  # progress after the save is lost with the actor
        _kill_pools(ray_head, restart=True)
        after = saved.forward(data, "cross_entropy").result(timeout=180).metrics["loss:sum"]
        assert after == pytest.approx(at_save, rel=1e-5)
        with pytest.raises(tinker.RequestFailedError, match="no saved state"):
            unsaved.forward(data, "cross_entropy").result(timeout=180)


@pytest.mark.slow
def test_a_tenants_training_runs_are_bounded_and_released_when_its_session_closes(tinker_api, keys, tiny_model):
    """Past RLHF_API_TINKER_MAX_RUNS_PER_TENANT, create_lora_training_client fails naming the limit, in any session of the
    tenant; closing a ServiceClient releases its runs (their calls are refused, naming why) and frees their places."""
    first = service(tinker_api, keys["pager"])
    runs = [first.create_lora_training_client(base_model="tiny", rank=4, seed=0).result() for _ in range(MAX_RUNS)]
    with service(tinker_api, keys["pager"]) as second:
        with pytest.raises(tinker.RequestFailedError, match=f"you hold {MAX_RUNS} training runs.*MAX_RUNS_PER_TENANT"):
            second.create_lora_training_client(base_model="tiny", rank=4).result(timeout=120)
        # Another tenant is not held back by this one's runs.
        with service(tinker_api, keys["beta"]) as other:
            other.create_lora_training_client(base_model="tiny", rank=4).result(timeout=120)
        first.close("success").result(timeout=60)
        with httpx.Client(base_url=tinker_api.url, headers={"X-API-Key": keys["pager"]}) as c:
            r = c.post("/api/v1/optim_step", json={"model_id": runs[0].model_id, "adam_params": {"learning_rate": 1e-4}})
            assert r.status_code == 400 and "was released (its session" in r.json()["error"], r.text
        tc = second.create_lora_training_client(base_model="tiny", rank=4, seed=0).result(timeout=120)
        tok = tokenizer(tiny_model)
        assert sft_steps(tc, [sft_datum(tok, SEQ)], 1)[0] > 0


@pytest.mark.slow
def test_a_heavy_tenants_loop_does_not_starve_another(tinker_api, keys, ray_head, tiny_model):
    """Tenant bursty sends 40 sampling calls, then queuer sends 8, to the one pool of the base model. Counted in the
    pool's log of served calls: while queuer has calls waiting, they are served every other turn (bursty's backlog
    does not go first: bursty still has calls left when queuer's are done). queuer's usage counts exactly its calls."""
    tok = tokenizer(tiny_model)
    prompt = types.ModelInput.from_ints(tok.encode("hello there"))
    params = types.SamplingParams(max_tokens=12, temperature=1.0, seed=3)
    with service(tinker_api, keys["bursty"]) as heavy, service(tinker_api, keys["queuer"]) as light:
        hs, ls = (c.create_sampling_client(base_model="tiny").result(timeout=120) for c in (heavy, light))
        heavy_calls = [hs.sample(prompt, num_samples=1, sampling_params=params) for _ in range(40)]
        light_calls = [ls.sample(prompt, num_samples=1, sampling_params=params) for _ in range(8)]
        light_out = [f.result(timeout=300) for f in light_calls]
        for f in heavy_calls:
            f.result(timeout=300)
    log = [tenant for tenant, method in _pool_log(ray_head) if tenant in ("bursty", "queuer") and method == "sample"]
    assert log.count("bursty") == 40 and log.count("queuer") == 8, log
    first, last = log.index("queuer"), len(log) - 1 - log[::-1].index("queuer")
    print("served, from queuer's first call to its last:", "".join(t[0] for t in log[first:last + 1]),
          f"| bursty before: {log[:first].count('bursty')}, after: {log[last + 1:].count('bursty')}")
    assert log[first:last + 1].count("bursty") <= 2 * 8, log
    assert log[last + 1:].count("bursty") > 0, log
    with httpx.Client(base_url=tinker_api.url, headers={"X-API-Key": keys["queuer"]}) as c:
        usage = c.get("/api/v1/usage").json()
    generated = sum(len(out.sequences[0].tokens) for out in light_out)
    assert usage["requests"] == 8 and usage["tokens"] == 8 * prompt.length + generated, usage


@pytest.mark.slow
def test_a_client_that_stops_beating_has_its_runs_released_by_any_tenants_heartbeat(tinker_api, keys, redis_url):
    """A client that dies without closing (here: plain HTTP, no heartbeats, its session made old) holds its runs only
    until the API's next sweep, which another tenant's heartbeat drives: its calls are then refused naming the timeout."""
    import json

    import redis

    with httpx.Client(base_url=tinker_api.url, headers={"X-API-Key": keys["rater"]}, timeout=60) as dead, \
            httpx.Client(base_url=tinker_api.url, headers={"X-API-Key": keys["beta"]}, timeout=60) as live:
        session = dead.post("/api/v1/create_session", json={}).json()["session_id"]
        created = dead.post("/api/v1/create_model", json={"session_id": session, "model_seq_id": 0, "base_model": "tiny",
                                                            "lora_config": {"rank": 4}}).json()
        assert dead.post("/api/v1/retrieve_future", json={"request_id": created["request_id"]}).json()["model_id"] == created["model_id"]
        store = redis.Redis.from_url(redis_url)
        record = json.loads(store.get(f"tinker:session:{session}"))
        store.set(f"tinker:session:{session}", json.dumps({**record, "created": record["created"] - 3600}))
        other = live.post("/api/v1/create_session", json={}).json()["session_id"]
        assert live.post("/api/v1/session_heartbeat", json={"session_id": other}).status_code == 200
        r = dead.post("/api/v1/optim_step", json={"model_id": created["model_id"], "adam_params": {"learning_rate": 1e-4}})
        assert r.status_code == 400 and f"its session {session} timed out" in r.json()["error"], r.text
        assert store.scard("tinker:held:rater") == 0


@pytest.mark.slow
def test_a_batch_over_the_body_limit_is_sent_in_pieces_and_trains_as_one(tinker_api, keys, tiny_model):
    """10 sequences of 500 tokens (80 KB of protobuf) against a 64 KiB request body limit: the SDK splits the batch as the
    server's client config says; the pieces' losses add up to the batch's, and a step on it trains."""
    tok = tokenizer(tiny_model)
    ids = tok.encode(SEQ * 60)
    assert len(ids) >= 511
    data = [types.Datum(model_input=types.ModelInput.from_ints(ids[i:i + 500]),
                        loss_fn_inputs={"target_tokens": ids[i + 1:i + 501], "weights": [1.0] * 500}) for i in range(10)]
    with service(tinker_api, keys["alpha"]) as sc:
        tc = sc.create_lora_training_client(base_model="tiny", rank=4, seed=0).result()
        whole = tc.forward(data, "cross_entropy").result(timeout=300)
        assert len(whole.loss_fn_outputs) == 10
        alone = [tc.forward([d], "cross_entropy").result(timeout=120).metrics["loss:sum"] for d in data]
        assert whole.metrics["loss:sum"] == pytest.approx(sum(alone), rel=1e-4)
        losses = sft_steps(tc, data, 2, lr=1e-2)
        assert losses[1] < losses[0]
