"""The Tinker API's refusals and limits, fast: the in-process API on the session's Redis (no Ray, no pool
call is made), and the adapter pool's fair scheduler on threads. The SDK's own types read the answers.

The served-API tests of the same limits, with the SDK end to end, are in tests/api/test_tinker.py.
"""

from __future__ import annotations

import threading

import pytest
import torch

from api.tinker import LOSSES, Records

pytest.importorskip("tinker")
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto

from workers.tinker_pool import LOSSES as POOL_LOSSES
from workers.tinker_pool import FairScheduler


def failed(client, request_id: str) -> types.RequestFailedResponse:
    """The future's answer, read as the SDK reads a failed request."""
    r = client.post("/api/v1/retrieve_future", json={"request_id": request_id})
    assert r.status_code == 200, r.text
    return types.RequestFailedResponse.model_validate(r.json())


def add_run(api, tenant: str, session_id: str) -> str:
    """A training run held and recorded as create_model holds and records it (its pool call left out: no Ray here)."""
    from api.tinker import new_id

    records: Records = api.app.state.tinker.records
    model_id = new_id("tm")

    async def add():
        assert await records.hold_run(tenant, model_id, 10**6)
        await records.put("training_run", model_id, {"tenant": tenant, "base_model": "tiny", "path": "unused", "rank": 8,
                                                     "created": 0.0, "last_state": None, "session": session_id})

    api.run(add)
    return model_id


def test_the_api_and_the_pool_name_the_same_losses():
    assert set(LOSSES) == set(POOL_LOSSES)


def test_unsupported_parts_answer_in_the_sdks_error_shapes_naming_them(api, keys):
    # A tenant of its own: its held run must not count against the served API's tenants (same Redis).
    with api.client(keys["rater"]) as c:
        # A route this server does not serve: 404, naming it.
        for route in ("copy_weights", "create_custom_loss", "weights_info"):
            r = c.post(f"/api/v1/{route}", json={})
            assert r.status_code == 404 and f"/api/v1/{route} is not supported" in r.json()["error"], r.text
            assert types.RequestFailedResponse.model_validate(r.json()).category == types.RequestErrorCategory.User
        # A loss this server does not compute: the future fails (RequestFailedError in the SDK), naming it and what is.
        session = c.post("/api/v1/create_session", json={"sdk_version": "0.38.0"}).json()["session_id"]
        model_id = add_run(api, "rater", session)
        datum = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]),
                            loss_fn_inputs={"target_tokens": [2, 3, 4], "logprobs": [0.0] * 3, "advantages": [1.0] * 3})
        body = forward_backward_request_to_proto(types.ForwardBackwardRequest(
            forward_backward_input=types.ForwardBackwardInput(data=[datum], loss_fn="cispo"), model_id=model_id, seq_id=1)).SerializeToString()
        r = c.post("/api/v1/forward_backward", content=body, headers={"Content-Type": "application/x-protobuf"})
        assert r.status_code == 200, r.text
        answer = failed(c, r.json()["request_id"])
        assert "'cispo' is not supported" in answer.error and "importance_sampling" in answer.error
        assert answer.category == types.RequestErrorCategory.User
        # Sampling options this server does not have: 400 on the request, naming each.
        sampler = c.post("/api/v1/create_sampling_session", json={"base_model": "tiny", "session_id": session}).json()["sampling_session_id"]
        prompt = {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]}
        for extra, named in (({"prompt_logprobs": True}, "prompt_logprobs"), ({"topk_prompt_logprobs": 5}, "topk_prompt_logprobs"),
                             ({"sampling_params": {"stop": ["\n"]}}, "stop strings")):
            r = c.post("/api/v1/asample", json={"sampling_session_id": sampler, "prompt": prompt, "num_samples": 1, **extra})
            assert r.status_code == 400 and named in r.json()["error"], r.text
    api.run(api.app.state.tinker.records.redis.delete, "tinker:held:rater")


def test_a_tenant_past_its_training_runs_is_refused_naming_the_limit(api, keys):
    """create_model past RLHF_API_TINKER_MAX_RUNS_PER_TENANT fails its future with the limit's name; nothing is recorded
    for the refused run; another tenant is not affected."""
    with api.client(keys["streamer"]) as c, api.client(keys["watcher"]) as other:
        session = c.post("/api/v1/create_session", json={}).json()["session_id"]
        t = api.app.state.tinker
        limit = t.settings.max_runs_per_tenant
        for _ in range(limit):
            add_run(api, "streamer", session)
        body = {"session_id": session, "model_seq_id": 0, "base_model": "tiny", "lora_config": {"rank": 8}}
        r = c.post("/api/v1/create_model", json=body)
        assert r.status_code == 200, r.text
        answer = failed(c, r.json()["request_id"])
        assert f"you hold {limit} training runs" in answer.error and "RLHF_API_TINKER_MAX_RUNS_PER_TENANT" in answer.error
        assert c.post("/api/v1/get_info", json={"model_id": r.json()["model_id"]}).status_code == 404
        assert len(api.run(t.records.held_runs, "streamer")) == limit
        assert api.run(t.records.held_runs, "watcher") == []
        # A released run (its session ended) refuses further work, naming why.
        model_id = api.run(t.records.held_runs, "streamer")[0]
        api.run(t.records.release_run, "streamer", model_id, f"its session {session} ended")
        r = c.post("/api/v1/optim_step", json={"model_id": model_id, "adam_params": {"learning_rate": 1e-4}})
        assert r.status_code == 400 and "was released (its session" in r.json()["error"], r.text
        assert other.post("/api/v1/optim_step", json={"model_id": model_id, "adam_params": {}}).status_code == 404
        api.run(t.records.redis.delete, "tinker:held:streamer")


def run_scheduler(calls: list[str]) -> list[str]:
    """Queue `calls` (tenant names, in this order) on a FairScheduler behind a call that holds it; the order they are served in."""
    scheduler, served = FairScheduler(), []
    gate, holding = threading.Event(), threading.Event()
    first = threading.Thread(target=scheduler.run, args=("gate", lambda: (holding.set(), gate.wait(30))))
    first.start()
    holding.wait(30)
    threads = []
    for i, tenant in enumerate(calls):
        th = threading.Thread(target=scheduler.run, args=(tenant, lambda tenant=tenant, i=i: served.append(f"{tenant}{i}")))
        th.start()
        threads.append(th)
        # Each call joins the queue before the next is made (the queue's order is the order of arrival).
        while sum(len(q) for q in scheduler._queues.values()) < i + 1:
            threading.Event().wait(0.001)
    gate.set()
    for th in [first, *threads]:
        th.join(30)
    return served


def test_a_heavy_tenant_does_not_starve_another():
    """Tenant a queues 20 calls before b queues 4: b's calls are served every other turn, not after a's 20."""
    served = run_scheduler(["a"] * 20 + ["b"] * 4)
    assert len(served) == 24
    assert [s[0] for s in served[:8]] == ["a", "b"] * 4, served
    # Each tenant's own calls keep their order.
    for tenant in "ab":
        mine = [int(s[1:]) for s in served if s[0] == tenant]
        assert mine == sorted(mine)


def test_three_tenants_take_turns():
    served = run_scheduler(["a"] * 6 + ["b"] * 3 + ["c"] * 3)
    assert [s[0] for s in served] == ["a", "b", "c"] * 3 + ["a"] * 3, served


def test_the_pool_keeps_the_last_sampler_weights_loaded_and_reloads_older_ones(tiny_model, tmp_path):
    """An RL loop saves sampler weights every step: the pool keeps MAX_SAMPLER_ADAPTERS of them as adapters and
    loads an older one again from disk when it is sampled; its samples are those of its own weights."""
    from workers.tinker_pool import MAX_SAMPLER_ADAPTERS, AdapterPool

    pool = AdapterPool(str(tiny_model), threads=1)
    pool.create("run", rank=4, seed=0)
    paths = []
    for i in range(MAX_SAMPLER_ADAPTERS + 3):
        for p in pool._params("run"):
            p.data.add_(0.05)  # each saved state differs
        paths.append(pool.save_state("run", str(tmp_path / f"s{i}"), optimizer=False))
    first = pool.sample(paths[0], [1, 2, 3], 1, max_tokens=4, temperature=0.0, stop=[])
    for path in paths[1:]:
        pool.sample(path, [1, 2, 3], 1, max_tokens=4, temperature=0.0, stop=[])
    assert len(pool.model.peft_config) == 1 + MAX_SAMPLER_ADAPTERS and paths[0] not in pool.samplers
    again = pool.sample(paths[0], [1, 2, 3], 1, max_tokens=4, temperature=0.0, stop=[])
    assert again[0]["tokens"] == first[0]["tokens"] and abs(again[0]["logprobs"] - first[0]["logprobs"]).max() < 1e-5
    assert len(pool.model.peft_config) == 1 + MAX_SAMPLER_ADAPTERS and pool.has("run")


def test_the_pool_samples_the_base_model_after_its_last_adapter_is_dropped(tiny_model):
    """Runs are dropped when their sessions end; with none left the base model still samples, as before any run."""
    from workers.tinker_pool import AdapterPool

    pool = AdapterPool(str(tiny_model), threads=1)
    before = pool.sample(None, [1, 2, 3], 1, max_tokens=4, temperature=0.0, stop=[])
    pool.create("run", rank=4, seed=0)
    pool.drop("run")
    after = pool.sample(None, [1, 2, 3], 1, max_tokens=4, temperature=0.0, stop=[])
    assert after[0]["tokens"] == before[0]["tokens"] and abs(after[0]["logprobs"] - before[0]["logprobs"]).max() < 1e-5
    pool.create("next", rank=4, seed=0)
    assert pool.has("next") and not pool.has("run")


def test_a_token_outside_the_vocabulary_is_refused_naming_it(tiny_model):
    """An out-of-range id reached the embedding (on a GPU a device-side assert that poisons the pool for every tenant;
    on vLLM a refusal of the whole batch). The pool refuses it first, a user error naming where it is."""
    from workers.tinker_pool import AdapterPool, PoolError

    pool = AdapterPool(str(tiny_model), threads=1)
    pool.create("run", rank=4, seed=0)
    big = pool.vocab
    with pytest.raises(PoolError, match=f"datum 0's tokens: token id {big} is outside"):
        pool.forward_backward("run", [{"tokens": [1, big], "inputs": {"target_tokens": [2, 3], "weights": [1, 1]}}], "cross_entropy")
    with pytest.raises(PoolError, match=f"datum 0's target_tokens: token id {big + 5}"):
        pool.forward_backward("run", [{"tokens": [1, 2], "inputs": {"target_tokens": [2, big + 5], "weights": [1, 1]}}], "cross_entropy")
    with pytest.raises(PoolError, match="the prompt: token id -1"):
        pool.sample(None, [1, -1], 1, max_tokens=2)
    assert pool.forward_backward("run", [{"tokens": [1, big - 1], "inputs": {"target_tokens": [2, 3], "weights": [1, 1]}}],
                                 "cross_entropy")["tokens"] == 2


def test_sampler_weights_saved_again_under_a_name_are_sampled_anew(tiny_model, tmp_path):
    """The pool kept the adapter it made of a path: weights saved again under the same name (allowed) were not seen."""
    import os

    from workers.tinker_pool import AdapterPool

    pool = AdapterPool(str(tiny_model), threads=1)
    pool.create("run", rank=4, seed=0)
    path = pool.save_state("run", str(tmp_path / "named"), optimizer=False)
    first = pool.sample(path, [1, 2, 3], 1, max_tokens=4, temperature=0.0, stop=[])
    with torch.no_grad():
        for p in pool._params("run"):
            p.add_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    pool.save_state("run", path, optimizer=False)
    os.utime(os.path.join(path, "state.pt"), ns=(1, 2))  # (a stamp of its own, whatever the clock's resolution)
    again = pool.sample(path, [1, 2, 3], 1, max_tokens=4, temperature=0.0, stop=[])
    assert abs(again[0]["logprobs"] - first[0]["logprobs"]).max() > 1e-3
    assert len(pool.samplers) == 1  # the old adapter left


def test_a_sample_call_that_timed_out_in_the_batchers_queue_never_runs():
    """vLLM sampling: a call still waiting in the SampleBatcher's queue when its caller gives up leaves the queue (it
    used to stay, and the engine sampled it for no one); the other calls wait on. The engine's thread is not started
    here (it is taken as busy), so nothing leaves the queue but by the timeout."""
    from workers.tinker_pool import SampleBatcher

    batcher = SampleBatcher(pool=None)
    batcher._thread = threading.current_thread()  # "running": the queue is only filled
    answers = []
    waiting = threading.Thread(target=lambda: answers.append(batcher.run("b", ("w",), {}, timeout_s=30)))
    waiting.start()
    while "b" not in batcher._waiting:
        waiting.join(0.01)
    with pytest.raises(TimeoutError, match="waited 0 s for the pool's engine"):
        batcher.run("a", ("w",), {}, timeout_s=0.2)
    assert "a" not in batcher._waiting and len(batcher._waiting["b"]) == 1
    with batcher._cond:  # b's call: taken by the engine's thread now, as its loop does
        (slot,) = batcher._take()
    slot.update(result=[], compute_s=0.0)
    slot["done"].set()
    waiting.join(5)
    assert answers == [([], 0.0)]
