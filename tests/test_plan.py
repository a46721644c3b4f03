"""The job's plan (orchestrator/core/plan.py): the examples' plans written out by hand, and
`rlhf train --plan`, which prints one without starting Ray. No Ray cluster: the plan only reads the spec."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.core.plan import Bundle, make_plan
from orchestrator.core.spec import load_spec, parse_spec
from tests.conftest import ROOT, tiny_spec

NO_SYNC = ("none", "resources.rollout_in: the trainers are the rollouts")


def base(**overrides) -> dict:
    return tiny_spec(Path("m"), Path("d.jsonl"), Path("runs/t"), **overrides)


def summary(stage) -> dict:
    """A stage plan as the table below writes it."""
    return {
        "roles": [(r.role, r.replicas, r.num_cpus, r.also) for r in stage.roles],
        "phases": {p: w for p, w in stage.phases if w},
        "one_call_step": stage.one_call_step,
        "sync": stage.weight_sync and (stage.weight_sync.method, stage.weight_sync.reason),
        "bundles": [b.as_ray() for b in stage.bundles],
        "steps": (stage.first_step, stage.last_step),
    }


EXAMPLES = {
    # Function rewards on CPUs: a lone trainer samples, scores with the built-in rewards and updates in one call.
    "grpo.yaml": [{
        "roles": [("trainer", 1, 1.0, ("rollout", "reward"))],
        "phases": {"rollout": "trainer", "reward": "trainer", "update": "trainer"},
        "one_call_step": True, "sync": NO_SYNC, "bundles": [{"CPU": 1.0}], "steps": (1, 30)}],
    # kl_coef 0.05 on CPUs: the trainer keeps a copy of the weights as the reference; the critic is an actor.
    "ppo.yaml": [{
        "roles": [("trainer", 1, 1.5, ("rollout", "reference")), ("critic", 1, 0.5, ())],
        "phases": {"rollout": "trainer", "reference": "trainer", "reward": "driver", "update": "trainer", "critic": "critic"},
        "one_call_step": False, "sync": NO_SYNC, "bundles": [{"CPU": 1.5}, {"CPU": 0.5}], "steps": (1, 20)}],
    "arithmetic/pipeline.yaml": [
        {"roles": [("trainer", 1, 1.0, ("rollout",))],  # SFT that evaluates held-out prompts: its trainer writes their completions
         "phases": {"rollout": "trainer", "reward": "driver", "update": "trainer"},
         "one_call_step": False, "sync": NO_SYNC, "bundles": [{"CPU": 1.0}], "steps": (1, 3000)},
        {"roles": [("trainer", 1, 1.0, ("rollout", "reward"))],
         "phases": {"rollout": "trainer", "reward": "trainer", "update": "trainer"},
         "one_call_step": True, "sync": NO_SYNC, "bundles": [{"CPU": 1.0}], "steps": (3001, 3800)}],
    "tools/pipeline.yaml": [
        {"roles": [("trainer", 1, 0.5, ())], "phases": {"update": "trainer"},  # SFT on tool-call traces
         "one_call_step": False, "sync": None, "bundles": [{"CPU": 0.5}], "steps": (1, 400)},
        {"roles": [("trainer", 1, 1.0, ("rollout", "reward"))],  # multi-turn GRPO: the trainer runs the episodes
         "phases": {"rollout": "trainer", "reward": "trainer", "update": "trainer"},
         "one_call_step": True, "sync": NO_SYNC, "bundles": [{"CPU": 1.0}], "steps": (401, 424)}],
    "preference/dpo.yaml": [{
        "roles": [("trainer", 1, 0.5, ()), ("reference", 1, 0.5, ())],  # DPO scores its pairs against a reference actor
        "phases": {"reference": "reference", "update": "trainer"},
        "one_call_step": False, "sync": None, "bundles": [{"CPU": 0.5}, {"CPU": 0.5}], "steps": (1, 300)}],
    "preference/pipeline.yaml": [
        {"roles": [("trainer", 1, 0.5, ())], "phases": {"update": "trainer"},
         "one_call_step": False, "sync": None, "bundles": [{"CPU": 0.5}], "steps": (1, 500)},
        {"roles": [("trainer", 1, 0.5, ())], "phases": {"update": "trainer"},
         "one_call_step": False, "sync": None, "bundles": [{"CPU": 0.5}], "steps": (501, 700)},
        # A reward model (the rm stage's) runs on a reward actor.
        {"roles": [("trainer", 1, 1.5, ("rollout", "reference")), ("reward", 1, 0.5, ()), ("critic", 1, 0.5, ())],
         "phases": {"rollout": "trainer", "reference": "trainer", "reward": "reward", "update": "trainer", "critic": "critic"},
         "one_call_step": False, "sync": NO_SYNC, "bundles": [{"CPU": 1.5}, {"CPU": 0.5}, {"CPU": 0.5}], "steps": (701, 1000)}],
}


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_the_examples_plans(name):
    plan = make_plan(load_spec(ROOT / "examples" / name))
    assert [summary(s) for s in plan.stages] == EXAMPLES[name]
    assert plan.total_steps == EXAMPLES[name][-1]["steps"][1]


def test_a_multi_turn_rollout_and_its_sandbox_role():
    agent = {"environment": "python_calculator", "sandbox": {"num_cpus": 0.5}}
    stage = make_plan(parse_spec(base(rewards=[], rollout={"agent": agent}))).stages[0]
    assert stage.rollout_mode == "multi_turn" and stage.where("rollout") == "trainer"
    assert [(r.role, r.replicas, r.num_cpus, r.slots) for r in stage.roles] == [("trainer", 1, 1.0, (0,)), ("sandbox", 2, 0.5, (1, 2))]
    assert [b.as_ray() for b in stage.bundles] == [{"CPU": 1.0}, {"CPU": 0.5}, {"CPU": 0.5}]
    # An environment that runs no code starts no sandbox (unless asked); a plain job is single-turn.
    calc = make_plan(parse_spec(base(rollout={"agent": {"environment": "calculator"}}))).stages[0]
    assert [r.role for r in calc.roles] == ["trainer"] and calc.rollout_mode == "multi_turn"
    asked = make_plan(parse_spec(base(rollout={"agent": {"environment": "calculator", "sandbox": {"actors": 1}}}))).stages[0]
    assert [r.role for r in asked.roles] == ["trainer", "sandbox"]
    assert make_plan(parse_spec(base())).stages[0].rollout_mode == "single_turn"


def test_what_the_job_holds_at_once():
    grpo, ppo = (make_plan(load_spec(ROOT / "examples" / n)) for n in ("grpo.yaml", "ppo.yaml"))
    assert (grpo.driver_cpus, grpo.demand) == (0.5, (Bundle(1.0), Bundle(0.5)))  # the trainer, then the driver's rewards
    assert ppo.demand == (Bundle(1.5), Bundle(0.5), Bundle(0.5))
    pipeline = make_plan(load_spec(ROOT / "examples/preference/pipeline.yaml"))
    assert pipeline.demand == pipeline.stages[2].bundles and pipeline.driver_cpus == 0.0  # the ppo stage's, the largest


@pytest.mark.parametrize(("rollout", "resources", "sync", "phases"), [
    ({"backend": "vllm"}, {"trainer": {"num_gpus": 1}, "rollout": {"num_gpus": 1}},
     ("nccl", "vLLM engines on their own GPUs"), {"rollout": "rollout", "reward": "driver", "update": "trainer"}),
    ({"backend": "vllm"}, {"trainer": {"num_gpus": 1}, "rollout": {"num_gpus": 1}, "colocate": True},
     ("cuda_ipc", "each vLLM engine shares its GPU with a trainer rank"), {"rollout": "rollout", "reward": "driver", "update": "trainer"}),
    ({}, {"rollout_in": "actor", "reward_in": "actor"},
     ("shared_memory", "trainer and rollouts on the CPU"), {"rollout": "rollout", "reward": "reward", "update": "trainer"}),
])
def test_rollout_actors_get_a_weight_sync_path(rollout, resources, sync, phases):
    stage = make_plan(parse_spec(base(rollout={"n": 4, **rollout}, resources=resources))).stages[0]
    assert (stage.weight_sync.method, stage.weight_sync.reason, stage.weight_sync.when) == (*sync, "every step")
    assert {p: w for p, w in stage.phases if w} == phases and not stage.one_call_step


def test_a_lora_trainer_is_its_own_reference_without_a_copy():
    stage = make_plan(parse_spec(base(model={"path": "m", "lora": {"rank": 4}}, optim={"kl_coef": 0.1}))).stages[0]
    assert stage.where("reference") == "trainer" and not stage.reference_copy
    assert stage.role("trainer").num_cpus == 1.0 and stage.role("reference") is None  # the rollout's CPUs, no reference's


def test_an_epoch_budget_has_its_steps_once_the_data_is_counted():
    spec = parse_spec(base(optim={"steps": None, "epochs": 2, "prompts_per_step": 4},
                           stages=[{"name": "a"}, {"name": "b", "optim": {"steps": 5}}]))
    plan = make_plan(spec)
    assert [(s.steps, s.epochs, s.first_step, s.last_step) for s in plan.stages] == [(None, 2, None, None), (5, None, None, None)]
    assert plan.total_steps is None
    counted = plan.with_epoch_steps([3, 7])  # steps per epoch of each stage's data
    assert [(s.first_step, s.last_step) for s in counted.stages] == [(1, 6), (7, 11)]


def test_the_plan_is_frozen_and_built_once_per_spec():
    spec = parse_spec(base())
    plan = make_plan(spec)
    assert make_plan(spec) is plan
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.stages[0].one_call_step = False
    assert spec == parse_spec(base()) and "_plan" not in spec.model_dump()  # the spec itself is as it was
    copy = spec.model_copy(update={"resources": spec.resources.model_copy(update={"rollout_in": "actor"})})
    assert make_plan(copy).stages[0].where("rollout") == "rollout"  # a copy's own plan, not the original's


def test_the_spec_flags_are_the_plans_rules():
    spec = parse_spec(base(optim={"kl_coef": 0.1}))
    (stage,) = make_plan(spec).stages
    assert spec.roles == [r.role for r in stage.roles] == ["trainer"]
    assert (spec.rollouts_in_trainer, spec.reference_copy_in_trainer, spec.steps_in_trainer) == (True, True, stage.one_call_step)


PLAN_WITHOUT_RAY = """
import sys
from orchestrator.entrypoints.cli import main
code = main(sys.argv[1:])
loaded = sorted(m for m in ("ray", "torch", "transformers") if m in sys.modules)
assert not loaded, f"--plan loaded {loaded}"
sys.exit(code)
"""


def rlhf(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PLAN_WITHOUT_RAY, *args], check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_rlhf_train_plan_prints_it_without_starting_ray():
    out = rlhf("train", "--plan", "examples/arithmetic/pipeline.yaml")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[:2] == ["plan of job arith-pipeline: 2 stages, 3800 steps", "stage 0 sft (sft): steps 1..3000"]
    assert "  step: one call to the trainer" in out.stdout and "weight sync: none (resources.rollout_in" in out.stdout
    as_json = rlhf("train", "--plan", "--json", "examples/ppo.yaml")
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    assert data["stages"][0]["phases"]["reference"] == "trainer" and data["demand"] == [{"CPU": 1.5}, {"CPU": 0.5}, {"CPU": 0.5}]


def test_rlhf_train_plan_names_the_field_at_fault(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps(base(resources={"reward_in": "driver"}, rewards=[{"model": "rm"}])))
    out = rlhf("train", "--plan", str(bad))
    assert out.returncode == 2 and "resources.reward_in: rewards.0 is a reward model" in out.stderr


def test_an_async_job_plans_its_loop_and_a_rollout_actor(tmp_path):
    """rollout.max_staleness >= 1 is a plan entry: the loop is async, and the rollout runs in its own actor
    (on CPUs it would otherwise be the trainer's), synced by the path the placement gives."""
    stage = make_plan(parse_spec(base(rollout={"n": 4, "max_new_tokens": 4, "max_staleness": 2, "chunk_tokens": 3}))).stages[0]
    assert dataclasses.asdict(stage.loop) == {"kind": "async", "max_staleness": 2, "chunk_tokens": 3, "buffer_groups": 12}
    assert summary(stage)["roles"] == [("rollout", 1, 0.5, ()), ("trainer", 1, 0.5, ())]
    assert summary(stage)["phases"] == {"rollout": "rollout", "reward": "driver", "update": "trainer"}
    assert stage.one_call_step is False and stage.weight_sync.method == "object_store"
    assert make_plan(parse_spec(base())).stages[0].loop.kind == "sync"  # k = 0: today's loop
    spec = tmp_path / "async.yaml"
    spec.write_text(json.dumps(base(rollout={"max_staleness": 1})))
    out = rlhf("train", "--plan", str(spec))
    assert out.returncode == 0, out.stderr
    assert ("  loop: async, max_staleness 1: the rollout generates in chunks of 16 tokens while the trainer updates, "
            "weights loaded between chunks; buffer of 8 groups") in out.stdout.splitlines()


@pytest.mark.parametrize("overrides, message", [
    ({"rollout": {"max_staleness": 1, "dynamic_sampling": True, "n": 1}}, "rollout.dynamic_sampling: a group of one sample"),
    ({"optim": {"steps": 3, "prompts_per_step": 4, "mini_batch_size": 8}}, "one optimiser step per step"),
    ({"resources": {"rollout_in": "trainer"}}, "resources.rollout_in: the trainer cannot also be the rollout: rollout.max_staleness"),
    ({"rollout": {"max_staleness": 1, "off_policy": {"mask_band": [2, 5]}}}, "rollout.off_policy.mask_band"),
    ({"rollout": {"max_staleness": 1, "backend": "vllm"}, "resources": {"colocate": True}}, ("rollout.max_staleness: asynchronous "
     "training generates while the trainer updates: a vLLM engine colocated with the trainer sleeps")),
])
def test_what_async_training_refuses_names_the_field(overrides, message):
    from pydantic import ValidationError

    spec = base(rollout={"max_staleness": 1}, **{k: v for k, v in overrides.items() if k != "rollout"})
    spec["rollout"] = {**spec["rollout"], **overrides.get("rollout", {})}
    with pytest.raises((ValidationError, ValueError)) as err:
        parse_spec(spec)
    from orchestrator.core.spec import format_validation_error

    text = format_validation_error(err.value) if isinstance(err.value, ValidationError) else str(err.value)
    assert message in text


def test_dynamic_sampling_without_the_async_loop_names_the_field():
    with pytest.raises(ValueError, match="rollout.dynamic_sampling: dropping zero-spread groups"):
        parse_spec(base(rollout={"dynamic_sampling": True}))
    assert parse_spec(base(rollout={"dynamic_sampling": True, "max_staleness": 1})).rollout.dynamic_sampling
