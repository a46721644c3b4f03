"""The `rlhf` command."""

from __future__ import annotations

import argparse
import sys


def _train(args: argparse.Namespace) -> int:
    if args.plan or args.json:
        return _print_plan(args.spec, args.json)
    from orchestrator.entrypoints.run import run_job

    code = run_job(args.spec, resume=args.resume, progress=not args.no_progress)
    if code == 0:
        _report_learning(args.spec)
    return code


def _print_plan(spec_path: str, as_json: bool) -> int:
    """The job's plan (core/plan.py: roles, where each phase runs, weight sync, bundles, step ranges),
    from the spec alone: no Ray, no model, no data read."""
    import json

    from orchestrator.core.plan import describe, make_plan
    from orchestrator.core.spec import SpecError, load_spec

    try:
        plan = make_plan(load_spec(spec_path))
    except SpecError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(plan.as_dict(), indent=2) if as_json else describe(plan))
    return 0


def _report_learning(spec_path: str) -> None:
    """What a finished job learned, in one line and a plot, so the first run shows it at once."""
    from orchestrator.core.spec import SpecError, load_spec
    from orchestrator.reporting.plot import plot_run, summary

    try:
        run_dir = load_spec(spec_path).run_dir
        line = summary(run_dir)
        plot = plot_run(run_dir)
    except (SpecError, FileNotFoundError, ValueError) as err:  # a run directory elsewhere (s3://) or no metrics
        print(f"(no summary: {err})")
        return
    if line:
        print(line)
    print(f"plot: {plot}")


def _init_model(args: argparse.Namespace) -> int:
    from orchestrator.entrypoints.tiny_model import init_model

    if args.heads is not None and (args.heads < 1 or args.hidden_size % args.heads):
        raise SystemExit(f"rlhf init-model: --heads {args.heads} must be a positive divisor of --hidden-size {args.hidden_size}")
    out = init_model(args.dir, hidden_size=args.hidden_size, layers=args.layers, seed=args.seed, heads=args.heads)
    print(f"wrote a tiny random-weight model and tokenizer to {out}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from orchestrator.reporting.plot import plot_run

    try:
        out = plot_run(args.run_dir, args.out)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from orchestrator.entrypoints.demo import (
        run_demo,
        run_preference_demo,
        run_tools_demo,
    )

    if args.which == "tools":
        return run_tools_demo(args.out or "runs/tools-demo", seed=args.seed, quick=args.quick)
    if args.which == "preference":
        return run_preference_demo(args.out or "runs/pref-demo", seed=args.seed, quick=args.quick)
    return run_demo(args.out or "runs/arith-demo", seed=args.seed, quick=args.quick, max_staleness=args.max_staleness)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf", description="Distributed RLHF post-training on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="Run a job spec on an embedded Ray on this machine (or RAY_ADDRESS's cluster).")
    p.add_argument("spec", help="Job spec, YAML or JSON.")
    p.add_argument("--resume", action="store_true", help="Continue from the last checkpoint.")
    p.add_argument("--no-progress", action="store_true", help="No progress bar.")
    p.add_argument("--plan", action="store_true", help="Print the job's plan (roles, where each phase runs, weight sync, "
                   "bundles, step ranges) and exit, without starting Ray.")
    p.add_argument("--json", action="store_true", help="With --plan: the plan as JSON.")
    p.set_defaults(func=_train)

    p = sub.add_parser("init-model", help="Write a tiny random-weight causal LM and its tokenizer (no hub needed).")
    p.add_argument("dir", help="Output directory.")
    p.add_argument("--hidden-size", type=int, default=128, help="Hidden size (a multiple of 64).")
    p.add_argument("--layers", type=int, default=2, help="Transformer layers.")
    p.add_argument("--heads", type=int, default=None, help="Attention heads (default hidden size / 64: head_dim 64, which vLLM's "
                   "CPU build needs; more heads of a smaller head_dim learn copying faster, for HF rollouts).")
    p.add_argument("--seed", type=int, default=0, help="Initialisation seed.")
    p.set_defaults(func=_init_model)

    p = sub.add_parser("plot", help="Plot reward, KL, eval accuracy and response length against step (finished or running job).")
    p.add_argument("run_dir", help="The job's run directory (holds metrics.jsonl).")
    p.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/metrics.png).")
    p.set_defaults(func=_plot)

    p = sub.add_parser("demo", help="Demos on a tiny model: `arithmetic` (SFT then GRPO, held-out accuracy after each) or "
                                    "`preference` (SFT, a reward model from preference pairs, PPO against it, and DPO; a hidden rater's score after each) "
                                    "or `tools` (SFT on calculator-call traces, then multi-turn GRPO; held-out accuracy with and without the tool).")
    p.add_argument("which", nargs="?", choices=["arithmetic", "preference", "tools"], default="arithmetic", help="Which demo (default: arithmetic).")
    p.add_argument("--out", default=None, help="Run directory (model, data, metrics, checkpoints, plots); default runs/arith-demo, runs/pref-demo or runs/tools-demo.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the model, the data and training.")
    p.add_argument("--quick", action="store_true", help="A few steps per stage: checks the wiring, shows no learning.")
    p.add_argument("--max-staleness", type=int, default=0, metavar="K", help="arithmetic: the GRPO stage's rollout.max_staleness "
                   "(0: the synchronous loop; K >= 1: asynchronous, samples up to K policy versions old; docs/async.md).")
    p.set_defaults(func=_demo)

    try:  # the control plane's commands (`serve`, `jobs ...`) need the api extra
        from api.cli import register
    except ImportError:
        register = None
    if register is not None:
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
