"""GRPO and PPO end to end on a real local Ray with the tiny model."""

import math
import os
import uuid
from pathlib import Path

import pytest
import ray
import torch

from orchestrator.core.spec import parse_spec
from orchestrator.stages.driver import Orchestrator
from orchestrator.stages.pipeline import preflight
from orchestrator.reporting.reporters import FileReporter
from tests.conftest import read_jsonl, tiny_spec

pytestmark = pytest.mark.slow


def start(spec_dict) -> Orchestrator:
    spec = parse_spec(spec_dict)
    tokenizer, dataset = preflight(spec)
    orch = Orchestrator(spec, dataset, FileReporter(spec.run_dir), f"test-{uuid.uuid4().hex[:6]}", tokenizer.eos_token_id, tokenizer.pad_token_id)
    orch.start()
    return orch


def initial_weights(model_dir) -> dict:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).state_dict()


def pid(actor) -> int:
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))


def check_run(orch: Orchestrator, model_dir, roles: set[str]) -> list[dict]:
    orch.fit()
    trainer = ray.get(orch.groups["trainer"].actors[0].state_dict.remote())
    before = initial_weights(model_dir)
    assert any(not torch.equal(before[k], trainer[k]) for k in trainer), "policy parameters did not change"
    for rollout in orch.groups["rollout"].actors if "rollout" in orch.groups else []:
        synced = ray.get(rollout.state_dict.remote())
        assert all(torch.equal(synced[k], trainer[k]) for k in trainer), "rollout weights differ from the trainer's after sync"
    # Each role is its own named actor in its own process.
    assert set(orch.groups) == roles
    actors = [a for g in orch.groups.values() for a in g.actors]
    assert len({pid(a) for a in actors}) == len(actors)
    for role, group in orch.groups.items():
        for i in range(len(group)):
            assert ray.get_actor(f"{orch.job_id}/{role}-{i}") is not None
    metrics = read_jsonl(orch.spec.run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, orch.total_steps + 1))
    for m in metrics:
        bad = {k: v for k, v in m.items() if not (isinstance(v, (int, float)) and math.isfinite(v))}
        assert not bad, f"non-finite metrics at step {m['step']}: {bad}"
    return metrics


def untimed(metrics: list[dict]) -> list[dict]:
    """A run's metrics without the ones a clock gives."""
    return [{k: v for k, v in m.items() if k != "time" and not k.startswith(("timing/", "throughput/"))} for m in metrics]


def test_grpo_end_to_end(ray_session, tiny_model, arith_file, tmp_path):
    # Rollout actors that get the weights through shared memory, then (the CPU default) a trainer that
    # samples with its own weights and runs each step in one call (JobSpec.steps_in_trainer): the same
    # seed gives the same completions, losses and rewards.
    runs = {}
    for rollout_in, roles in (("actor", {"rollout", "trainer"}), ("auto", {"trainer"})):  # function rewards: in the driver
        orch = start(tiny_spec(tiny_model, arith_file, tmp_path / rollout_in, resources={"rollout_in": rollout_in}))
        try:
            runs[rollout_in] = check_run(orch, tiny_model, roles)
        finally:
            orch.shutdown()
        runs[rollout_in + "/sync"] = [e for e in read_jsonl(orch.spec.run_dir / "events.jsonl") if e["type"] == "weight_sync"]
        assert not list(Path("/dev/shm").glob(f"rlhf-weights-{orch.job_id}-*")), "the shared weights file was left behind"
    metrics = runs["actor"]
    for key in ("reward/mean", "reward/std", "rewards/accuracy/mean", "rewards/length_penalty/mean", "frac_reward_zero_std",
                "entropy", "clip_ratio", "policy_loss", "response_length/mean", "throughput/tokens_per_s",
                "timing/generate", "timing/update", "timing/weight_sync", "timing/step"):
        assert key in metrics[-1], key
    assert "kl" not in metrics[-1]  # kl_coef 0: no reference model, no KL
    assert [e["method"] for e in runs["actor/sync"]] == ["shared_memory"], "a CPU job on one node should sync through shared memory"
    assert [e["method"] for e in runs["auto/sync"]] == ["none"] and "timing/weight_sync" not in runs["auto"][-1]
    assert "timing/step_call" in runs["auto"][-1] and "timing/step_call" not in metrics[-1]
    assert untimed(runs["actor"]) == untimed(runs["auto"]) and len(untimed(runs["auto"])[0]) > 10


def test_grpo_through_the_object_store_with_a_reward_actor(ray_session, tiny_model, arith_file, tmp_path):
    orch = start(tiny_spec(tiny_model, arith_file, tmp_path / "os", optim={"steps": 2}, rollout={"weight_sync": "object_store"},
                           resources={"reward_in": "actor"}))
    try:
        check_run(orch, tiny_model, {"rollout", "trainer", "reward"})
    finally:
        orch.shutdown()
    sync = [e for e in read_jsonl(orch.spec.run_dir / "events.jsonl") if e["type"] == "weight_sync"]
    assert [(e["method"], e["reason"]) for e in sync] == [("object_store", "set in the spec")]


def test_ppo_end_to_end(ray_session, tiny_model, arith_file, tmp_path):
    spec = tiny_spec(tiny_model, arith_file, tmp_path / "ppo", algorithm={"name": "ppo"},
                     optim={"kl_coef": 0.05, "kl_in": "reward", "mini_batch_size": 8, "ppo_epochs": 2, "lr": 1e-3})
    orch = start(spec)
    try:
        metrics = check_run(orch, tiny_model, {"trainer", "critic"})  # on CPUs the trainer samples and keeps the reference
    finally:
        orch.shutdown()
    assert {"kl", "value_loss", "critic/values/mean", "timing/reference", "timing/critic"} <= set(metrics[-1])


def test_data_parallel_trainers_stay_identical(ray_session, tiny_model, arith_file, tmp_path):
    spec = tiny_spec(tiny_model, arith_file, tmp_path / "dp", optim={"steps": 2},
                     resources={"trainer": {"replicas": 2, "num_cpus": 0.25}, "rollout": {"replicas": 2, "num_cpus": 0.25}})
    orch = start(spec)
    try:
        check_run(orch, tiny_model, {"trainer"})  # each trainer replica samples its share of the prompts
        w0, w1 = ray.get(orch.groups["trainer"].call("state_dict"))
        assert all(torch.equal(w0[k], w1[k]) for k in w0), "gloo all-reduce left the replicas apart"
    finally:
        orch.shutdown()


def test_shared_memory_declines_a_trainer_whose_tensors_do_not_fit(ray_session, tiny_model, tmp_path):
    # A rollout of another shape: the trainer's tensors do not map onto its file, so the job would
    # fall back to the object store (with this reason in its weight_sync event) and leave no file behind.
    from orchestrator.runtime import waits
    from orchestrator.runtime.weight_sync import share_memory
    from orchestrator.entrypoints.tiny_model import init_model
    from workers.rollout import HFRollout
    from orchestrator.core.spec import OptimSpec, RolloutSpec
    from workers.trainer import PolicyTrainer

    other = init_model(tmp_path / "other", hidden_size=64, layers=2)
    trainer = ray.remote(PolicyTrainer).options(num_cpus=0).remote(str(tiny_model), OptimSpec(lr=1e-3), RolloutSpec())
    rollout = ray.remote(HFRollout).options(num_cpus=0).remote(str(other))
    try:
        reason = share_memory(trainer, [rollout], "mismatch-test", lambda refs, phase: waits.wait(refs, phase, 300))
    finally:
        ray.kill(trainer), ray.kill(rollout)
    assert reason.startswith("the trainer's tensors do not map onto the engine's") and "trainer has torch.float32 (260, 128)" in reason
    assert not list(Path("/dev/shm").glob("rlhf-weights-mismatch-test-*"))
