"""Reward-model and DPO stages, and an `sft -> rm -> ppo` pipeline, end to end on real Ray with the
tiny model (a few steps each)."""

from __future__ import annotations

import json
import math
import uuid

import pytest
import torch

from orchestrator.core import checkpoint
from orchestrator.core.spec import parse_spec
from orchestrator.stages.pipeline import plan_stages, run_stage
from orchestrator.reporting.reporters import FileReporter
from tests.conftest import read_jsonl, run_entrypoint, tiny_spec, write_spec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Arithmetic as SFT examples, and preference pairs: the right sum chosen over one that is off by one."""
    d = tmp_path_factory.mktemp("prefs")
    problems = [(a, b) for a in range(8) for b in range(8)]
    sft = [{"prompt": f"{a}+{b}=", "completion": str(a + b), "answer": a + b} for a, b in problems]
    pairs = [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + (1 if (a + b) % 2 else -1)), "margin": 0.5}
             for a, b in problems]
    for name, rows in (("sft.jsonl", sft), ("train.jsonl", pairs[:48]), ("test.jsonl", pairs[48:])):
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def preference_spec(tiny_model, files, out, algorithm: dict, **overrides) -> dict:
    spec = tiny_spec(tiny_model, files / "train.jsonl", out, algorithm=algorithm, **overrides)
    spec["data"] = {**spec["data"], "eval_file": str(files / "test.jsonl")}
    del spec["rewards"]  # a preference stage scores nothing
    return spec


def run_alone(spec_dict: dict) -> list[dict]:
    """One stage, as the entrypoint runs it, with this process as the driver; its metric lines."""
    spec = parse_spec(spec_dict)
    tokenizer, [stage] = plan_stages(spec)
    run_stage(stage, spec.model.path, tokenizer, f"test-{uuid.uuid4().hex[:6]}", FileReporter(spec.run_dir))
    metrics = read_jsonl(spec.run_dir / "metrics.jsonl")
    for m in metrics:
        bad = {k: v for k, v in m.items() if not (isinstance(v, (int, float)) and math.isfinite(v))}
        assert not bad, f"non-finite metrics at step {m['step']}: {bad}"
    return metrics


def weights(path, auto_class: str = "AutoModelForCausalLM") -> dict[str, torch.Tensor]:
    import transformers

    return getattr(transformers, auto_class).from_pretrained(path, num_labels=1).state_dict()


def changed(before: dict, after: dict) -> bool:
    return any(not torch.equal(before[k], after[k]) for k in before.keys() & after.keys())


def test_reward_model_stage(ray_session, tiny_model, files, tmp_path):
    from workers.reward import RewardModel

    out = tmp_path / "rm"
    metrics = run_alone(preference_spec(tiny_model, files, out, {"name": "rm"}, optim={"steps": 4, "prompts_per_step": 8}))
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert {"loss", "accuracy", "margin", "rewards/chosen", "rewards/rejected", "grad_norm"} <= set(metrics[0])
    # Held-out pairwise accuracy at the end of the stage, on the 16 held-out pairs.
    assert 0.0 <= metrics[-1]["eval/accuracy"] <= 1.0 and "eval/loss" in metrics[-1] and "eval/accuracy" not in metrics[0]

    final = out / "checkpoints" / "step_000004"
    assert (final / "reward_model" / "tokenizer_config.json").exists() and not (final / "policy").exists()
    base = {k.removeprefix("model."): v for k, v in weights(tiny_model).items()}
    trained = {k.removeprefix("model."): v for k, v in weights(final / "reward_model", "AutoModelForSequenceClassification").items()}
    assert changed(base, trained), "the reward model's backbone did not change"
    # What `rewards: [{model: ...}]` loads: one finite score per completion.
    scores = RewardModel(str(final / "reward_model"), "float32", False, torch.device("cpu"))(["1+1=", "1+1="], ["2", "3"])
    assert len(scores) == 2 and all(math.isfinite(s) for s in scores)


def test_dpo_stage(ray_session, tiny_model, files, tmp_path):
    out = tmp_path / "dpo"
    spec = preference_spec(tiny_model, files, out, {"name": "dpo", "beta": 0.5, "label_smoothing": 0.1},
                           optim={"steps": 3, "prompts_per_step": 8}, eval={"every": 2})
    metrics = run_alone(spec)
    keys = {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected",
            "timing/reference"}
    assert keys <= set(metrics[0])
    # The policy starts as the reference: every implicit reward is 0 at the first step.
    assert abs(metrics[0]["rewards/margins"]) < 1e-5 and metrics[0]["rewards/accuracies"] == 0.0
    assert [m["step"] for m in metrics if "eval/rewards/accuracies" in m] == [2, 3]
    events = read_jsonl(out / "events.jsonl")
    assert [sorted(a.rsplit("/", 1)[1] for a in e["actors"]) for e in events if e["type"] == "actors_ready"] == [["reference-0", "trainer-0"]]
    assert changed(weights(tiny_model), weights(out / "checkpoints" / "step_000003" / "policy")), "DPO did not change the policy"


def test_sft_then_rm_then_ppo_scored_by_the_rm(ray_head, tiny_model, files, tmp_path):
    out = tmp_path / "run"
    spec = tiny_spec(tiny_model, files / "sft.jsonl", out, optim={"lr": 1e-3, "steps": 2, "prompts_per_step": 4, "seed": 0})
    del spec["rewards"]
    spec["checkpoint"] = {"keep_last": 1}  # the stages' final checkpoints are kept anyway
    spec["stages"] = [
        {"name": "sft", "algorithm": {"name": "sft"}},
        {"name": "rm", "algorithm": {"name": "rm"}, "data": {"train_file": str(files / "train.jsonl"), "eval_file": str(files / "test.jsonl")}},
        # (No KL, so no reference actor: on 2 cores each actor takes seconds to start, the steps a fraction of one.)
        {"name": "ppo", "algorithm": {"name": "ppo"}, "rewards": [{"model": "stage:rm"}]},
    ]
    result = run_entrypoint(write_spec(tmp_path / "job.yaml", spec), ray=ray_head)
    assert result.returncode == 0, result.stderr[-3000:]

    metrics = read_jsonl(out / "metrics.jsonl")
    assert [(m["step"], m["stage"]) for m in metrics] == [(1, "sft"), (2, "sft"), (3, "rm"), (4, "rm"), (5, "ppo"), (6, "ppo")]
    assert "eval/accuracy" in metrics[3] and all("rewards/rm/mean" in m and "value_loss" in m for m in metrics[4:])
    for m in metrics:
        assert all(math.isfinite(v) for v in m.values() if isinstance(v, float)), m

    ckpts = out / "checkpoints"
    stages = {e["stage"]: e for e in read_jsonl(out / "events.jsonl") if e["type"] == "stage"}
    # The rm stage started from the SFT policy; PPO too, the rm stage having produced no policy.
    assert stages["rm"]["model_path"] == stages["ppo"]["model_path"] == str(ckpts / "step_000002" / "policy")
    # keep_last 1, yet the earlier stages' final checkpoints stay: a resumed PPO stage needs both.
    assert [p.name for p in checkpoint.complete(ckpts)] == ["step_000002", "step_000004", "step_000006"]
    sft_policy = weights(ckpts / "step_000002" / "policy")
    assert changed(weights(tiny_model), sft_policy) and changed(sft_policy, weights(ckpts / "step_000006" / "policy"))
