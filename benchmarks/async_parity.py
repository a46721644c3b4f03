"""Learning parity of asynchronous GRPO (issue 29): `rlhf demo`'s SFT -> GRPO with max_staleness 1 against the
synchronous loop, from the same SFT checkpoint, on this machine.

    python benchmarks/async_parity.py [--seeds 0 1] [--k 1] [--out runs/async-parity] [--quick] [--no-record]

Per seed: the demo's SFT stage once (orchestrator/entrypoints/demo.py: its model, data and pipeline,
`stages` cut to the SFT stage), then its run directory copied once per setting and the whole
two-stage pipeline resumed there (`run_job(resume=True)`): the resume starts at the SFT stage's final
step, so the GRPO stage starts from that checkpoint with the demo's step numbers, prompts order and
seed; the settings differ only in the GRPO stage's rollout.max_staleness (0: the synchronous loop).
Held-out greedy accuracy (the demo's `held_out`: all 400 test problems) of the SFT and each GRPO
final checkpoint. Times: the GRPO job's wall time (Ray's start, actors, the 800 steps, evals,
checkpoints; Ray shut down between jobs) and the GRPO stage's own (its `stage` event to its last
metrics line). The settings alternate which runs first per seed. A rerun reuses the finished runs under
--out (the SFT run, and each GRPO run's `parity_result.json`). Writes docs/benchmarks.md's
`async_parity` block (benchmarks/record.py) unless --no-record.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.record import markdown_table, record

RESULT = "parity_result.json"  # a finished GRPO run's numbers: a rerun reuses them (remove the run to measure again)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def sft_once(out: Path, seed: int, quick: bool) -> Path:
    """The demo's SFT stage alone in `out` (skipped if a finished one is there)."""
    import ray

    from orchestrator.entrypoints.demo import demo_spec, train_demo, write_problems

    if (out / "events.jsonl").exists() and any(e["message"] == "succeeded" for e in read_jsonl(out / "events.jsonl")):
        return out
    spec = demo_spec(out, seed, quick)
    spec["stages"] = spec["stages"][:1]
    code, _ = train_demo(out, spec, seed, lambda data: write_problems(data, seed))
    ray.shutdown()
    if code:
        raise SystemExit(f"the SFT stage of seed {seed} failed (exit {code}); see {out / 'events.jsonl'}")
    return out


def grpo_from(sft: Path, out: Path, seed: int, k: int, quick: bool) -> dict:
    """The demo's pipeline with the GRPO stage's max_staleness `k`, resumed in a copy of the SFT run `sft`
    (or the result a finished run left in `out`)."""
    import ray

    from orchestrator.entrypoints.demo import demo_spec, held_out, with_staleness
    from orchestrator.entrypoints.run import run_job

    if (out / RESULT).exists():
        return json.loads((out / RESULT).read_text())
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(sft, out, ignore=shutil.ignore_patterns(".lock", "*.png"))
    spec = with_staleness(demo_spec(sft, seed, quick), k)  # model and data stay the SFT run's (a resume keeps model.path)
    spec["output_dir"] = str(out)
    (out / "job.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    start = time.time()
    code = run_job(out / "job.yaml", resume=True)
    wall = time.time() - start
    ray.shutdown()
    if code:
        raise SystemExit(f"GRPO k={k} of seed {seed} failed (exit {code}); see {out / 'events.jsonl'}")
    events = read_jsonl(out / "events.jsonl")
    began = next(e["time"] for e in events if e["type"] == "stage" and e.get("stage") == "grpo")
    grpo = [m for m in read_jsonl(out / "metrics.jsonl") if m.get("stage") == "grpo"]
    _, acc = held_out(out, spec)
    stale = [m["staleness/mean"] for m in grpo if "staleness/mean" in m]
    result = {"sft": acc["sft"], "grpo": acc["grpo"], "wall": wall, "stage": grpo[-1]["time"] - began,
              "staleness": sum(stale) / len(stale) if stale else 0.0, "reward": sum(m["reward/mean"] for m in grpo[-50:]) / len(grpo[-50:])}
    (out / RESULT).write_text(json.dumps(result))
    return result


def update_seconds(run: Path) -> float:
    """The median `timing/update_compute` of the run's GRPO steps: the same 128 samples' update in either loop."""
    values = sorted(m["timing/update_compute"] for m in read_jsonl(run / "metrics.jsonl") if m.get("stage") == "grpo")
    return values[len(values) // 2]


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--k", type=int, default=1, help="the asynchronous run's max_staleness")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "async-parity")
    parser.add_argument("--quick", action="store_true", help="two steps a stage, 16 problems: checks the wiring")
    parser.add_argument("--no-record", action="store_true", help="print only; leave docs/benchmarks.md as it is")
    args = parser.parse_args()

    rows = []
    for i, seed in enumerate(args.seeds):
        sft = sft_once(args.out / f"seed{seed}" / "sft", seed, args.quick)
        settings = (0, args.k) if i % 2 == 0 else (args.k, 0)
        runs = {k: grpo_from(sft, args.out / f"seed{seed}" / f"grpo_k{k}", seed, k, args.quick) for k in settings}
        sync, stale = runs[0], runs[args.k]
        rows.append([seed, pct(sync["sft"]["all"]), pct(sync["grpo"]["all"]), pct(stale["grpo"]["all"]),
                     f"{100 * (stale['grpo']['all'] - sync['grpo']['all']):+.1f}",
                     f"{pct(sync['grpo']['carry'])} / {pct(stale['grpo']['carry'])}",
                     f"{sync['wall'] / 60:.1f} / {sync['stage'] / 60:.1f}", f"{stale['wall'] / 60:.1f} / {stale['stage'] / 60:.1f}",
                     f"{update_seconds(args.out / f'seed{seed}' / 'grpo_k0'):.2f} / {update_seconds(args.out / f'seed{seed}' / f'grpo_k{args.k}'):.2f}",
                     f"{stale['staleness']:.2f}", f"{sync['reward']:.3f} / {stale['reward']:.3f}"])
        print(json.dumps({"seed": seed, "runs": runs}), flush=True)
    k = args.k
    table = markdown_table(["seed", "held-out after SFT", "after GRPO sync", f"after GRPO k={k}", f"k={k} - sync (points)",
                            f"carry: sync / k={k}", "GRPO sync: job / stage min", f"GRPO k={k}: job / stage min", f"update s/step (median): sync / k={k}",
                            f"k={k} staleness mean", f"reward/mean, last 50 steps: sync / k={k}"], rows)
    problems = 16 if args.quick else 400
    text = (f"`rlhf demo`'s pipeline (examples/arithmetic/pipeline.yaml: SFT 3,000 steps x 64, then GRPO 800 steps x 16 prompts x 8), "
            f"per seed the SFT stage once, then the GRPO stage from its final checkpoint twice: rollout.max_staleness 0 (the synchronous loop) "
            f"and {k} (asynchronous; the demo's resources, each actor with every core). Held-out greedy accuracy on {problems} test problems "
            f"(none in training) of each final checkpoint. Times in minutes on 2 cores shared with other workers' jobs: the GRPO job "
            f"(Ray's start, actors, steps, evals, checkpoints) / its GRPO stage alone; the update of a step's 128 samples is the same work in both loops, so its median seconds show what "
            f"the machine's load (and the synchronous plan's spinning OpenMP threads, which lose most on busy shared cores) did to each run.\n\n{table}")
    print("\n" + text)
    if not args.no_record and not args.quick:
        record("async_parity", text, title="Learning parity: SFT -> GRPO, synchronous vs max_staleness 1 (async_parity)")


if __name__ == "__main__":
    main()
