"""SFT, stage pipelines, held-out evaluation and plots: spec validation here; one real SFT -> GRPO
job on a local Ray (a few steps per stage) in the slow test."""

from __future__ import annotations

import json
import math

import pytest
import torch

from orchestrator.core.spec import SpecError, parse_spec
from tests.conftest import read_jsonl, run_entrypoint, tiny_spec, write_spec


def pipeline_spec(model, train, test, out, **overrides) -> dict:
    spec = tiny_spec(model, train, out, **overrides)
    spec["data"] = {**spec["data"], "eval_file": str(test)}
    spec["eval"] = {"every": 2, "max_samples": 8}
    spec["stages"] = [
        {"name": "sft", "algorithm": {"name": "sft"}, "optim": {"lr": 3e-3, "steps": 3}},
        {"name": "grpo", "algorithm": {"name": "grpo"}, "optim": {"lr": 1e-3, "steps": 2}},
    ]
    return spec


@pytest.fixture(scope="module")
def sft_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft")
    rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b), "answer": a + b} for a in range(8) for b in range(8)]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:48]))
    (d / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[48:]))
    return d / "train.jsonl", d / "test.jsonl"


def test_a_plain_spec_is_one_unnamed_stage(tiny_model, arith_file, tmp_path):
    spec = parse_spec(tiny_spec(tiny_model, arith_file, tmp_path / "run"))
    assert spec.stages is None and spec.stage_specs() == [(None, spec)]


def test_stages_override_the_top_level_sections(tiny_model, sft_files, tmp_path):
    spec = parse_spec(pipeline_spec(tiny_model, *sft_files, tmp_path / "run"))
    (n1, sft), (n2, grpo) = spec.stage_specs()
    assert (n1, sft.algorithm.name, sft.optim.lr, sft.optim.steps) == ("sft", "sft", 3e-3, 3)
    assert (n2, grpo.algorithm.name, grpo.optim.lr, grpo.optim.steps) == ("grpo", "grpo", 1e-3, 2)
    assert grpo.rollout.n == 4 and grpo.data.eval_file == str(sft_files[1])  # inherited
    assert sft.run_dir == grpo.run_dir == spec.run_dir


@pytest.mark.parametrize("stage, where", [
    ({"name": "b", "optim": {"lr": -1}}, "stages.1.optim.lr"),
    ({"name": "b", "optim": {"learning_rate": 1}}, "stages.1.optim.learning_rate: unknown field"),
    ({"name": "b", "algorithm": {"name": "kto"}}, "stages.1.algorithm.name"),
    ({"name": "b", "rollout": {"n": 1}}, "stages.1 (b): advantage_estimator 'grpo'"),
    ({"name": "a"}, "distinct names"),
])
def test_a_bad_stage_names_its_field(tiny_model, sft_files, tmp_path, stage, where):
    spec = pipeline_spec(tiny_model, *sft_files, tmp_path / "run")
    spec["stages"] = [{"name": "a", "algorithm": {"name": "sft"}}, stage]
    with pytest.raises(SpecError, match=where.replace(".", r"\.").replace("(", r"\(").replace(")", r"\)")):
        parse_spec(spec)


def test_sft_loss_is_on_completion_tokens_only(tiny_model, tmp_path):
    from orchestrator.core.data import load_sft, sft_batch
    from workers.common import load_tokenizer

    data = tmp_path / "sft.jsonl"
    chat = [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"},
            {"role": "user", "content": "3+3="}, {"role": "assistant", "content": "6"}]
    data.write_text(json.dumps({"prompt": "1+2=", "completion": "3"}) + "\n" + json.dumps({"messages": chat}) + "\n")
    tok = load_tokenizer(str(tiny_model))
    spec = parse_spec({"model": {"path": str(tiny_model)}, "data": {"train_file": str(data)}, "rewards": [{"function": "accuracy"}]})
    ds = load_sft(data, tok, spec.data)
    batch = sft_batch(ds, [0, 1], tok.pad_token_id)
    trained = [tok.decode(r[m.bool()]) for r, m in zip(batch.responses, batch.response_mask)]
    assert trained[0] == "3<|endoftext|>"
    assert trained[1] == "4<|im_end|>\n6<|im_end|>\n<|endoftext|>"  # both assistant turns, no user turn
    assert tok.decode(batch.input_ids[1][batch.attention_mask[1].bool()]).startswith("<|im_start|>user\n2+2=")


@pytest.mark.slow
def test_sft_then_grpo_pipeline(ray_head, tiny_model, sft_files, tmp_path):
    from orchestrator.reporting.plot import plot_run

    out = tmp_path / "run"
    spec_path = write_spec(tmp_path / "job.yaml", pipeline_spec(tiny_model, *sft_files, out))
    result = run_entrypoint(spec_path, ray=ray_head)
    assert result.returncode == 0, result.stderr[-3000:]

    # One history: global steps 1..5, each line tagged with its stage.
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [(m["step"], m["stage"]) for m in metrics] == [(1, "sft"), (2, "sft"), (3, "sft"), (4, "grpo"), (5, "grpo")]
    assert all(math.isfinite(m["loss"]) for m in metrics[:3]) and all("reward/mean" in m for m in metrics[3:])
    # Eval every 2 steps of a stage and at each stage's end, under the job's verifiable reward.
    evaluated = [m["step"] for m in metrics if "eval/accuracy/mean" in m]
    assert evaluated == [2, 3, 5]
    assert all(0.0 <= m["eval/accuracy/mean"] <= 1.0 for m in metrics if m["step"] in evaluated)

    # Hand-off: the GRPO stage starts from the SFT stage's final checkpoint, a complete HF model.
    events = read_jsonl(out / "events.jsonl")
    stage_events = [e for e in events if e["type"] == "stage"]
    assert [e["stage"] for e in stage_events] == ["sft", "grpo"]
    handoff = out / "checkpoints" / "step_000003" / "policy"
    assert stage_events[1]["model_path"] == str(handoff)
    # checkpoint.every is 0: one checkpoint at the end of each stage, tagged with that stage.
    assert [(e["step"], e["stage"]) for e in events if e["type"] == "checkpoint"] == [(3, "sft"), (5, "grpo")]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoTokenizer.from_pretrained(handoff)
    sft_weights = AutoModelForCausalLM.from_pretrained(handoff).state_dict()
    first = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    final = AutoModelForCausalLM.from_pretrained(out / "checkpoints" / "step_000005" / "policy").state_dict()
    assert any(not torch.equal(first[k], sft_weights[k]) for k in first), "SFT did not change the policy"
    assert any(not torch.equal(sft_weights[k], final[k]) for k in first), "GRPO did not change the policy"
    assert [e["status"] for e in events if e["type"] == "status"] == ["starting", "running", "succeeded"]
    # On CPUs each stage's trainer also writes the completions, the held-out ones too: one actor a stage.
    assert [len(e["actors"]) for e in events if e["type"] == "actors_ready"] == [1, 1]
    assert [e["method"] for e in events if e["type"] == "weight_sync"] == ["none", "none"]

    png = plot_run(out)
    assert png == out / "metrics.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_arithmetic_teacher_slips_only_on_carries():
    from orchestrator.entrypoints.demo import _make_data

    make = _make_data()
    # By hand: 49+24 carries (9+4=13); forgetting it gives 63. 33-29 borrows (3<9); forgetting it gives 14.
    assert make.needs_carry(49, "+", 24) and make.slipped(49, "+", 24) == 63
    assert make.needs_carry(33, "-", 29) and make.slipped(33, "-", 29) == 14
    assert not make.needs_carry(21, "+", 13) and not make.needs_carry(27, "-", 15)
    clean, sloppy = make.problems(0, 49), make.problems(0, 49, teacher_slip=0.6)
    # Same problems in the same order (so the same train/test split); answers always right.
    assert [r["prompt"] for r in clean] == [r["prompt"] for r in sloppy]
    assert all(r["completion"] == str(r["answer"]) for r in clean)
    assert all(a["answer"] == b["answer"] for a, b in zip(clean, sloppy))
    wrong = [r for r in sloppy if r["completion"] != str(r["answer"])]
    carries = [r for r in sloppy if make.needs_carry(*make.operands(r["prompt"]))]
    assert all(make.needs_carry(*make.operands(r["prompt"])) for r in wrong)
    assert 0.5 < len(wrong) / len(carries) < 0.7



def test_progress_bar_shows_the_stage_its_loss_and_the_last_eval():
    from orchestrator.reporting.reporters import ProgressReporter

    bar = ProgressReporter(total=10)
    bar.event("stage", "stage sft (sft) runs steps 1..5", stage="sft")
    bar.metrics(1, {"loss": 0.5, "eval/reward/mean": 0.25})
    bar.metrics(2, {"loss": 0.4})
    assert bar.bar.desc.startswith("sft") and bar.bar.n == 2
    assert "loss=0.400" in bar.bar.postfix and "eval=0.250" in bar.bar.postfix  # the eval stays until the next one
    bar.close()


@pytest.mark.slow
def test_sft_alone_without_eval_runs_on_the_trainer_only(ray_head, tiny_model, sft_files, tmp_path):
    # No eval file: no rollout or reward actors, and so no weights to sync.
    out = tmp_path / "sft-only"
    spec = tiny_spec(tiny_model, sft_files[0], out, algorithm={"name": "sft"}, optim={"lr": 3e-3, "steps": 2})
    result = run_entrypoint(write_spec(tmp_path / "job.yaml", spec), ray=ray_head)
    assert result.returncode == 0, result.stderr[-3000:]
    events = read_jsonl(out / "events.jsonl")
    assert [e["status"] for e in events if e["type"] == "status"] == ["starting", "running", "succeeded"]
    assert [len(e["actors"]) for e in events if e["type"] == "actors_ready"] == [1]
    assert not [e for e in events if e["type"] == "weight_sync"]
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == [1, 2]


def test_each_stage_carries_its_part_of_the_plan(tiny_model, sft_files, tmp_path):
    """The pipeline counts the steps once (the plan's step ranges) and the driver's evaluation
    schedule and role factories read the stage's plan, not the spec's placement."""
    from orchestrator.stages.evaluation import Evaluator
    from orchestrator.stages.pipeline import plan_stages

    spec = parse_spec(pipeline_spec(tiny_model, *sft_files, tmp_path / "run"))
    _, stages = plan_stages(spec)
    assert [(s.plan.name, s.plan.algorithm, s.first_step, s.last_step) for s in stages] == [("sft", "sft", 1, 3), ("grpo", "grpo", 4, 5)]
    assert [(s.plan.first_step, s.plan.last_step) for s in stages] == [(1, 3), (4, 5)]
    due = [[step for step in range(s.first_step, s.last_step + 1) if Evaluator(s.eval_set, 2, s.plan).due(step)] for s in stages]
    assert due == [[2, 3], [5]]  # every 2 steps of each stage, and at its last


@pytest.mark.parametrize("resources, optim, model, expect", [
    ({}, {}, {}, ["Sampling", "OneCallStep"]),  # a lone CPU trainer samples and runs whole steps
    ({"rollout_in": "actor"}, {}, {}, []),  # rollout actors sample: the trainer only trains
    ({}, {"kl_coef": 0.1}, {}, ["Sampling", "KeptReference"]),  # it keeps the reference: no whole steps
    ({"rollout_in": "actor"}, {"kl_coef": 0.1}, {"lora": {"rank": 4}}, ["FrozenBase"]),  # a LoRA policy's base is the reference
])
def test_the_trainer_factory_adds_the_parts_the_plan_gives_it(tiny_model, arith_file, tmp_path, resources, optim, model, expect):
    from orchestrator.core.plan import make_plan
    from orchestrator.stages.roles import FACTORIES, driver_rewards

    spec = parse_spec(tiny_spec(tiny_model, arith_file, tmp_path / "run", resources=resources, optim=optim, model=model))
    stage = make_plan(spec).stages[0]
    parts = FACTORIES["trainer"](spec, stage).kwargs(0)["parts"]
    assert [type(p).__name__ for p in parts] == expect
    assert [p.phase for p in parts] == list(stage.role("trainer").also)
    assert all(p.seed == spec.optim.seed for p in parts if type(p).__name__ == "Sampling")  # replica 0: the rollout seed
    assert ("rollout" in [r.role for r in stage.roles]) == ("Sampling" not in expect)
    assert driver_rewards(spec, stage) is not None  # function rewards: scored in the driver (also the held-out set)
