"""`rlhf demo`: post-training that visibly works, on this machine's CPU.

Builds the tiny char-level model, writes disjoint train/test arithmetic problems whose SFT
demonstrations come from a teacher that often forgets the carry (the `answer` the reward checks
is always right), runs `examples/arithmetic/pipeline.yaml` (SFT, then GRPO with the `accuracy`
reward) as one job, and prints the held-out greedy accuracy after each stage, on all problems and
on those with and without a carry, and the plot's path.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import yaml

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "arithmetic"
# The model and problem set that examples/arithmetic/pipeline.yaml is tuned for.
MODEL = dict(hidden_size=128, layers=2)
PROBLEMS = dict(max_operand=49, train=2000, test=400, teacher_slip=0.6)


def _make_data():
    spec = importlib.util.spec_from_file_location("arith_make_data", EXAMPLE / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def demo_spec(out: Path, seed: int, quick: bool) -> dict:
    """The example pipeline with this run's model, data, seed and output directory."""
    spec = yaml.safe_load((EXAMPLE / "pipeline.yaml").read_text())
    spec["model"]["path"] = str(out / "model")
    spec["data"].update(train_file=str(out / "data" / "train.jsonl"), eval_file=str(out / "data" / "test.jsonl"))
    spec["optim"]["seed"] = seed
    spec["output_dir"] = str(out)
    if quick:
        for stage in spec["stages"]:
            stage["optim"]["steps"] = 2
        spec["eval"]["max_samples"] = 16
    return spec


def accuracy_by_kind(model_dir: Path, rows: list[dict]) -> dict[str, float]:
    """Greedy accuracy of a checkpoint on `rows`: all of them, those that need a carry (or borrow), the rest."""
    from workers.rewards import accuracy
    from workers.rollout import HFRollout

    make = _make_data()
    rollout = HFRollout(str(model_dir), n=1, max_new_tokens=6)
    tok = rollout.tokenizer
    prompts = [tok(r["prompt"], add_special_tokens=False).input_ids for r in rows]
    batch, _ = rollout.generate(prompts, [{}] * len(rows), step=0, greedy=True)
    texts = [tok.decode(r[m.bool()], skip_special_tokens=True) for r, m in zip(batch.responses, batch.response_mask)]
    right = accuracy([r["prompt"] for r in rows], texts, answer=[r["answer"] for r in rows])
    kinds = [make.needs_carry(*make.operands(r["prompt"])) for r in rows]
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return {"all": mean(right), "carry": mean([x for x, k in zip(right, kinds) if k]), "no carry": mean([x for x, k in zip(right, kinds) if not k])}


def run_demo(out: str | Path = "runs/arith-demo", seed: int = 0, quick: bool = False) -> int:
    from orchestrator.plot import plot_run
    from orchestrator.run import run_job
    from orchestrator.tiny_model import init_model

    out = Path(out)
    if (out / "metrics.jsonl").exists():
        raise SystemExit(f"{out} holds an earlier run; pass another --out or remove it")
    spec = demo_spec(out, seed, quick)
    init_model(out / "model", seed=seed, **MODEL)
    _make_data().write(out / "data", PROBLEMS["train"], PROBLEMS["test"], seed, PROBLEMS["max_operand"], PROBLEMS["teacher_slip"])
    (out / "job.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    start = time.time()
    code = run_job(out / "job.yaml", progress=True)
    elapsed = time.time() - start
    if code:
        return code
    rows = [json.loads(line) for line in (out / "data" / "test.jsonl").read_text().splitlines()]
    rows = rows[: spec["eval"].get("max_samples") or len(rows)]
    # Each stage's final checkpoint (the SFT one is where GRPO started).
    finals = [e for e in map(json.loads, (out / "events.jsonl").read_text().splitlines()) if e["type"] == "checkpoint"]
    after = {e["stage"]: accuracy_by_kind(Path(e["path"]) / "policy", rows) for e in finals}
    png = plot_run(out)
    print(f"\nheld-out greedy accuracy ({len(rows)} problems, none in training; carry: the ones digits carry or borrow):")
    print(f"  {'':12s} {'all':>6s} {'carry':>6s} {'no carry':>9s}")
    for stage, acc in after.items():
        print(f"  after {stage:6s} {100 * acc['all']:5.1f}% {100 * acc['carry']:5.1f}% {100 * acc['no carry']:8.1f}%")
    if "sft" in after and "grpo" in after:
        print(f"  GRPO gain    {100 * (after['grpo']['all'] - after['sft']['all']):+5.1f} points")
    print(f"wall time {elapsed / 60:.1f} min; metrics in {out / 'metrics.jsonl'}; plot {png}")
    return 0
