"""`rlhf demo tools` (issue 30) for several seeds at once on this machine: held-out accuracy without the
calculator, after SFT and after GRPO, calls per episode, the valid call rate, and the wall times.

    python benchmarks/tools_demo.py [--seeds 0 1] [--out runs/tools-bench] [--quick] [--no-record]

Each seed is its own `rlhf demo tools --seed S` process (an embedded Ray each), all started together, so on
2 cores each demo has about one (its actors ask for 0.5-1 CPU, one torch thread). Wall times: the demo's own
training time (its job) and the whole command (model, data, job, the three held-out evaluations). Writes
docs/benchmarks.md's `tools_demo` block (benchmarks/record.py) unless --no-record or --quick.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.record import markdown_table, record


def stage_minutes(run: Path) -> dict[str, float]:
    """Minutes from each stage's first metrics line to its last."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    spans: dict[str, list[float]] = {}
    for r in rows:
        spans.setdefault(r["stage"], []).append(r["time"])
    return {stage: (max(t) - min(t)) / 60 for stage, t in spans.items()}


def grpo_reward(run: Path) -> tuple[float, float]:
    """The GRPO stage's reward/mean over its first 5 and its last 5 steps (sampled episodes, temperature 1)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    g = [r["reward/mean"] for r in rows if r["stage"] == "grpo"]
    return sum(g[:5]) / len(g[:5]), sum(g[-5:]) / len(g[-5:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "tools-bench")
    parser.add_argument("--quick", action="store_true", help="the demo's --quick: checks the wiring")
    parser.add_argument("--timeout-min", type=float, default=60, help="stop the demos past this many minutes (default 60)")
    parser.add_argument("--no-record", action="store_true", help="print only; leave docs/benchmarks.md as it is")
    args = parser.parse_args()

    for seed in args.seeds:
        if (args.out / f"seed{seed}").exists():
            raise SystemExit(f"{args.out / f'seed{seed}'} holds an earlier run; pass another --out or remove it")
    args.out.mkdir(parents=True, exist_ok=True)
    procs, logs, whole = {}, {}, {}
    start = time.time()
    for seed in args.seeds:
        logs[seed] = open(args.out / f"seed{seed}.log", "w")
        cmd = [sys.executable, "-m", "orchestrator.entrypoints.cli", "demo", "tools", "--seed", str(seed), "--out", str(args.out / f"seed{seed}"),
               *(["--quick"] if args.quick else [])]
        procs[seed] = subprocess.Popen(cmd, cwd=ROOT, stdout=logs[seed], stderr=subprocess.STDOUT, env=os.environ.copy())
    try:
        while len(whole) < len(procs):  # each seed's whole-command time is taken when it ends, whichever ends first
            if time.time() - start > args.timeout_min * 60:
                raise SystemExit(f"the demos of seeds {sorted(set(procs) - set(whole))} ran past --timeout-min {args.timeout_min}: "
                                 f"see their logs in {args.out}")
            for seed, proc in procs.items():
                if seed not in whole and proc.poll() is not None:
                    if proc.returncode != 0:
                        raise SystemExit(f"seed {seed}'s demo failed (exit {proc.returncode}): see {args.out / f'seed{seed}.log'}")
                    whole[seed] = time.time() - start
                    print(f"seed {seed} done in {whole[seed] / 60:.1f} min", flush=True)
            time.sleep(1)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
        for log in logs.values():
            log.close()

    rows = []
    for seed in args.seeds:
        run = args.out / f"seed{seed}"
        result = json.loads((run / "demo_result.json").read_text())
        runs, stages = result["runs"], stage_minutes(run)
        first, last = grpo_reward(run)
        pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"  # noqa: E731  (valid calls: None when no call was made)
        rows.append([seed, f"{result['training_s'] / 60:.1f} / {whole[seed] / 60:.1f}", f"{stages.get('sft', 0):.1f} / {stages.get('grpo', 0):.1f}",
                     pct(runs["without tools (after SFT)"]["accuracy"]), pct(runs["after SFT"]["accuracy"]), pct(runs["after GRPO"]["accuracy"]),
                     f"{runs['after GRPO']['calls']:.2f}", pct(runs["after GRPO"]["valid"]), f"{first:.3f} / {last:.3f}"])
        print(json.dumps({"seed": seed, **result}), flush=True)
    table = markdown_table(["seed", "wall min: training / whole command", "SFT / GRPO stage min", "held-out without tools",
                            "after SFT", "after GRPO", "calls / episode (after GRPO)", "valid calls", "GRPO reward/mean: first 5 / last 5 steps"], rows)
    problems = json.loads((args.out / f"seed{args.seeds[0]}" / "demo_result.json").read_text())["problems"]
    text = (f"`rlhf demo tools` (examples/tools/pipeline.yaml: the tiny model with 4 heads of 32, SFT on calculator-call traces, then "
            f"multi-turn GRPO with the calculator, rewarded for the right final number), {len(args.seeds)} seeds at once. Held-out greedy "
            f"episodes on {problems} problems a*b (3 digits by 2, none in training): with every calculator call refused (the model's own "
            f"arithmetic), after SFT and after GRPO.\n\n{table}")
    print("\n" + text)
    if not args.no_record and not args.quick:
        record("tools_demo", text, title="Multi-turn tool use: rlhf demo tools (tools_demo)")


if __name__ == "__main__":
    main()
