"""`rlhf demo`: post-training that visibly works, on this machine's CPU.

Builds the tiny char-level model, writes disjoint train/test arithmetic problems, runs
`examples/arithmetic/pipeline.yaml` (SFT, then GRPO with the `accuracy` reward) as one job, and
prints the held-out greedy accuracy after each stage, and the plot's path.
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
PROBLEMS = dict(max_operand=49, train=2000, test=200)


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


def run_demo(out: str | Path = "runs/arith-demo", seed: int = 0, quick: bool = False) -> int:
    from orchestrator.plot import plot_run
    from orchestrator.run import run_job
    from orchestrator.tiny_model import init_model

    out = Path(out)
    if (out / "metrics.jsonl").exists():
        raise SystemExit(f"{out} holds an earlier run; pass another --out or remove it")
    spec = demo_spec(out, seed, quick)
    init_model(out / "model", seed=seed, **MODEL)
    _make_data().write(out / "data", PROBLEMS["train"], PROBLEMS["test"], seed, PROBLEMS["max_operand"])
    (out / "job.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    start = time.time()
    code = run_job(out / "job.yaml", progress=True)
    elapsed = time.time() - start
    if code:
        return code
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    after = {}
    for r in rows:
        if "eval/accuracy/mean" in r:
            after[r["stage"]] = r["eval/accuracy/mean"]
    png = plot_run(out)
    shown = min(PROBLEMS["test"], spec["eval"].get("max_samples") or PROBLEMS["test"])
    print(f"\nheld-out accuracy ({shown} problems none of which is in training, greedy):")
    for stage, acc in after.items():
        print(f"  after {stage:5s} {100 * acc:5.1f}%")
    if "sft" in after and "grpo" in after:
        print(f"  GRPO gain    {100 * (after['grpo'] - after['sft']):+5.1f} points")
    print(f"wall time {elapsed / 60:.1f} min; metrics in {out / 'metrics.jsonl'}; plot {png}")
    return 0
