"""`rlhf demo [arithmetic]` and `rlhf demo preference`: post-training that visibly works, on this machine's CPU.

Builds the tiny char-level model, writes disjoint train/test arithmetic problems whose SFT
demonstrations come from a teacher that often forgets the carry (the `answer` the reward checks
is always right), runs `examples/arithmetic/pipeline.yaml` (SFT, then GRPO with the `accuracy`
reward) as one job, and prints the held-out greedy accuracy after each stage, on all problems and
on those with and without a carry, and the plot's path.
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from orchestrator.core.environments import CalculatorEnv

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "arithmetic"
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
    tok = rollout.sampler.tokenizer
    prompts = [tok(r["prompt"], add_special_tokens=False).input_ids for r in rows]
    batch, _ = rollout.generate(prompts, [{}] * len(rows), step=0, greedy=True)
    texts = [tok.decode(r[m.bool()], skip_special_tokens=True) for r, m in zip(batch.responses, batch.response_mask)]
    right = accuracy([r["prompt"] for r in rows], texts, answer=[r["answer"] for r in rows])
    kinds = [make.needs_carry(*make.operands(r["prompt"])) for r in rows]
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return {"all": mean(right), "carry": mean([x for x, k in zip(right, kinds) if k]), "no carry": mean([x for x, k in zip(right, kinds) if not k])}


def train_demo(out: Path, spec: dict, seed: int, write_data: Callable[[Path], object], model: dict = MODEL) -> tuple[int, float]:
    """A demo's job in a fresh run directory `out`: the tiny model (initialised with `seed`), the data
    (`write_data(out / "data")`), `job.yaml` from `spec`, then the job. Returns (exit code, wall seconds)."""
    from orchestrator.entrypoints.run import run_job
    from orchestrator.entrypoints.tiny_model import init_model

    if (out / "metrics.jsonl").exists():
        raise SystemExit(f"{out} holds an earlier run; pass another --out or remove it")
    init_model(out / "model", seed=seed, **model)
    write_data(out / "data")
    (out / "job.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    start = time.time()
    code = run_job(out / "job.yaml", progress=True)
    return code, time.time() - start


def with_staleness(spec: dict, max_staleness: int) -> dict:
    """The demo spec with `rollout.max_staleness` set on its GRPO stage (0: the synchronous loop)."""
    for stage in spec["stages"]:
        if stage["algorithm"]["name"] == "grpo":
            stage["rollout"] = {**stage.get("rollout", {}), "max_staleness": max_staleness}
    return spec


def write_problems(data: Path, seed: int) -> None:
    _make_data().write(data, PROBLEMS["train"], PROBLEMS["test"], seed, PROBLEMS["max_operand"], PROBLEMS["teacher_slip"])


def held_out(out: Path, spec: dict) -> tuple[int, dict[str, dict[str, float]]]:
    """(problems, {stage: accuracy_by_kind}) of each stage's final checkpoint in run `out` (the SFT one is where GRPO started)."""
    rows = [json.loads(line) for line in (out / "data" / "test.jsonl").read_text().splitlines()]
    rows = rows[: spec["eval"].get("max_samples") or len(rows)]
    finals = [e for e in map(json.loads, (out / "events.jsonl").read_text().splitlines()) if e["type"] == "checkpoint"]
    return len(rows), {e["stage"]: accuracy_by_kind(Path(e["path"]) / "policy", rows) for e in finals}


def run_demo(out: str | Path = "runs/arith-demo", seed: int = 0, quick: bool = False, max_staleness: int = 0) -> int:
    from orchestrator.reporting.plot import plot_run

    out = Path(out)
    spec = with_staleness(demo_spec(out, seed, quick), max_staleness)
    code, elapsed = train_demo(out, spec, seed, lambda data: write_problems(data, seed))
    if code:
        return code
    problems, after = held_out(out, spec)
    png = plot_run(out)
    print(f"\nheld-out greedy accuracy ({problems} problems, none in training; carry: the ones digits carry or borrow):")
    print(f"  {'':12s} {'all':>6s} {'carry':>6s} {'no carry':>9s}")
    for stage, acc in after.items():
        print(f"  after {stage:6s} {100 * acc['all']:5.1f}% {100 * acc['carry']:5.1f}% {100 * acc['no carry']:8.1f}%")
    if "sft" in after and "grpo" in after:
        print(f"  GRPO gain    {100 * (after['grpo']['all'] - after['sft']['all']):+5.1f} points")
    loop = f"; GRPO asynchronous, max_staleness {max_staleness}" if max_staleness else ""
    print(f"wall time {elapsed / 60:.1f} min{loop}; metrics in {out / 'metrics.jsonl'}; plot {png}")
    return 0


# ------------------------------------------------------------ `rlhf demo preference`
# RLHF from preferences on this machine's CPU: examples/preference/pipeline.yaml (SFT on a writer's
# replies, a reward model from a rater's pairs, PPO against it), then examples/preference/dpo.yaml
# (DPO on the same pairs from the same SFT policy). The rater's rule, `hidden_score` in
# examples/preference/make_data.py, reaches the trainer only through which reply of a pair was chosen;
# the demo alone applies it, to replies sampled for held-out prompts.

PREFERENCE = Path(__file__).resolve().parents[2] / "examples" / "preference"
QUICK_PROMPTS = 16  # held-out prompts a `--quick` run scores each policy on


def _preference_data():
    spec = importlib.util.spec_from_file_location("pref_make_data", PREFERENCE / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def preference_specs(out: Path, seed: int, quick: bool) -> tuple[dict, dict]:
    """(pipeline, dpo): the example specs with this run's model, data, seed and output directories."""
    pipeline = yaml.safe_load((PREFERENCE / "pipeline.yaml").read_text())
    dpo = yaml.safe_load((PREFERENCE / "dpo.yaml").read_text())
    data = out / "data"
    pipeline["model"]["path"] = str(out / "model")
    pipeline["data"]["train_file"] = str(data / "sft.jsonl")
    rm, ppo = pipeline["stages"][1], pipeline["stages"][2]
    rm["data"].update(train_file=str(data / "prefs.jsonl"), eval_file=str(data / "prefs_test.jsonl"))
    ppo["data"]["train_file"] = str(data / "prompts.jsonl")
    dpo["data"].update(train_file=str(data / "prefs.jsonl"), eval_file=str(data / "prefs_test.jsonl"))
    if quick:
        for stage in pipeline["stages"]:
            stage["optim"]["steps"] = 2
        rm["eval"]["every"] = 0
        dpo["optim"]["steps"], dpo["eval"]["every"] = 2, 0
    pipeline["optim"]["seed"] = dpo["optim"]["seed"] = seed
    sft_steps = pipeline["stages"][0]["optim"]["steps"]
    dpo["model"]["path"] = str(out / "checkpoints" / f"step_{sft_steps:06d}" / "policy")  # the SFT stage's final policy
    pipeline["output_dir"], dpo["output_dir"] = str(out), str(out / "dpo")
    return pipeline, dpo


def hidden_scores(model_dir: Path, prompts: list[str], seed: int, samples: int = 4) -> dict[str, float]:
    """The rater's mean score of a policy's replies to `prompts`: `samples` sampled at temperature 1
    (what RL raises: the expected score) and the greedy one."""
    from workers.rollout import HFRollout

    score = _preference_data().hidden_score
    rollout = HFRollout(str(model_dir), n=samples, max_new_tokens=10, temperature=1.0, seed=seed)
    tok = rollout.sampler.tokenizer
    ids = [tok(p, add_special_tokens=False).input_ids for p in prompts]
    out = {}
    for kind, greedy in (("sampled", False), ("greedy", True)):
        batch, _ = rollout.generate(ids, [{}] * len(prompts), step=0, greedy=greedy, with_logprobs=False)
        texts = [tok.decode(r[m.bool()], skip_special_tokens=True) for r, m in zip(batch.responses, batch.response_mask)]
        per_prompt = len(texts) // len(prompts)
        out[kind] = sum(score(prompts[i // per_prompt], t) for i, t in enumerate(texts)) / len(texts)
    return out


def _final_metric(run_dir: Path, key: str) -> float | None:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    values = [r[key] for r in rows if key in r]
    return values[-1] if values else None


def _plot_hidden(scores: dict[str, dict[str, float]], rm_accuracy: float | None, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = list(scores)
    for offset, kind in ((-0.2, "sampled"), (0.2, "greedy")):
        values = [scores[n][kind] for n in names]
        bars = ax.bar([i + offset for i in range(len(names))], values, width=0.4, label=f"{kind} replies")
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylim(0, 1)
    ax.set_ylabel("hidden score (held-out prompts)")
    accuracy = f"; reward model's held-out pairwise accuracy {100 * rm_accuracy:.1f}%" if rm_accuracy is not None else ""
    ax.set_title(f"vowel fraction of replies{accuracy}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "hidden_score.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_preference_demo(out: str | Path = "runs/pref-demo", seed: int = 0, quick: bool = False) -> int:
    from orchestrator.entrypoints.run import run_job
    from orchestrator.entrypoints.tiny_model import init_model
    from orchestrator.reporting.plot import plot_run

    out = Path(out)
    if (out / "metrics.jsonl").exists():
        raise SystemExit(f"{out} holds an earlier run; pass another --out or remove it")
    pipeline, dpo = preference_specs(out, seed, quick)
    init_model(out / "model", seed=seed, **MODEL)
    _preference_data().write(out / "data", train=2000, test=200, seed=seed)
    (out / "job.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    (out / "dpo.yaml").write_text(yaml.safe_dump(dpo, sort_keys=False))
    start = time.time()
    for spec in ("job.yaml", "dpo.yaml"):
        code = run_job(out / spec, progress=True)
        if code:
            return code
    elapsed = time.time() - start
    prompts = [json.loads(line)["prompt"] for line in (out / "data" / "test.jsonl").read_text().splitlines()]
    prompts = prompts[:QUICK_PROMPTS] if quick else prompts
    finals = {e["stage"]: Path(e["path"]) for e in map(json.loads, (out / "events.jsonl").read_text().splitlines()) if e["type"] == "checkpoint"}
    dpo_final = [json.loads(line) for line in (out / "dpo" / "events.jsonl").read_text().splitlines() if '"checkpoint"' in line][-1]
    policies = {"initial": out / "model", "after SFT": finals["sft"] / "policy", "after PPO": finals["ppo"] / "policy",
                f"after DPO ({dpo['algorithm']['loss_type']})": Path(dpo_final["path"]) / "policy"}
    scores = {name: hidden_scores(path, prompts, seed) for name, path in policies.items()}
    rm_accuracy = _final_metric(out, "eval/accuracy")
    png = _plot_hidden(scores, rm_accuracy, out)
    plot_run(out), plot_run(out / "dpo")
    if rm_accuracy is not None:
        print(f"\nreward model: held-out pairwise accuracy {100 * rm_accuracy:.1f}% (rater's choice ranked higher)")
    print(f"hidden score on {len(prompts)} held-out prompts (fraction of a reply's eight letters that are vowels; the writer's is 0.19):")
    print(f"  {'':16s} {'sampled':>8s} {'greedy':>7s}")
    for name, s in scores.items():
        print(f"  {name:16s} {s['sampled']:8.3f} {s['greedy']:7.3f}")
    print(f"wall time {elapsed / 60:.1f} min (training); plots {png}, {out / 'metrics.png'}, {out / 'dpo' / 'metrics.png'}")
    return 0


# ------------------------------------------------------------ `rlhf demo tools`
# Multi-digit multiplication with a calculator tool (issue 30): examples/tools/pipeline.yaml, SFT on a
# teacher's tool-call traces (every trace a calculator call), then
# multi-turn GRPO rewarded only for the right final number. Held-out greedy episodes after each stage,
# with the calculator and with every call refused (the model's own arithmetic).

TOOLS = Path(__file__).resolve().parents[2] / "examples" / "tools"
TOOL_PROBLEMS = {"sft": 12800, "prompts": 2000, "test": 200, "teacher_guess": 0.0}
TOOL_MODEL = dict(hidden_size=128, layers=2, heads=4)  # head_dim 32: see examples/tools/pipeline.yaml


class NoCalculatorEnv(CalculatorEnv):
    """The calculator task with the tool refused: each call's answer is an error, so the final number is the
    model's own (`rlhf demo tools`' "without tools" row)."""

    def call(self, name: str, arguments: dict) -> tuple[str, dict]:
        raise RuntimeError("the calculator is unavailable: answer yourself")


def tool_episodes(model_dir: Path, rows: list[dict], agent: dict, environment: str = "calculator") -> dict[str, float]:
    """Greedy episodes of a checkpoint on held-out `rows`: accuracy, tool calls per episode, and the valid
    call rate (calls that ran / calls attempted, invalid JSON included)."""
    from orchestrator.core.spec import AgentSpec
    from workers.agent_rollout import episodes_of_rows
    from workers.rollout import HFRollout

    fields = {k: v for k, v in agent.items() if k != "max_new_tokens"}
    spec = AgentSpec(**{**fields, "environment": environment})
    rollout = HFRollout(str(model_dir), n=1, max_new_tokens=agent["max_new_tokens"], agent=spec)
    batch, _ = rollout.generate([[0]] * len(rows), [{"prompt_text": r["prompt"], "answer": r["answer"]} for r in rows], step=0, greedy=True)
    eps = episodes_of_rows(batch)
    attempted = sum(e["tool_calls"] + e["invalid_calls"] for e in eps)
    ran = sum(e["tool_calls"] - e["tool_errors"] for e in eps)
    return {"accuracy": sum(e["reward"] for e in eps) / len(eps), "calls": attempted / len(eps),
            "valid": ran / attempted if attempted else float("nan")}


def tools_spec(out: Path, seed: int, quick: bool) -> dict:
    spec = yaml.safe_load((TOOLS / "pipeline.yaml").read_text())
    spec["model"]["path"] = str(out / "model")
    spec["data"]["train_file"] = str(out / "data" / "sft.jsonl")
    spec["stages"][1]["data"]["train_file"] = str(out / "data" / "prompts.jsonl")
    spec["optim"]["seed"] = seed
    spec["output_dir"] = str(out)
    if quick:
        for stage in spec["stages"]:
            stage["optim"]["steps"] = 2
    return spec


def run_tools_demo(out: str | Path = "runs/tools-demo", seed: int = 0, quick: bool = False) -> int:
    from orchestrator.reporting.plot import plot_run

    out = Path(out)
    make = importlib.util.spec_from_file_location("tools_make_data", TOOLS / "make_data.py")
    module = importlib.util.module_from_spec(make)
    make.loader.exec_module(module)
    spec = tools_spec(out, seed, quick)
    problems = {**TOOL_PROBLEMS, "sft": 256, "prompts": 64} if quick else TOOL_PROBLEMS  # (--quick: 2 steps a stage)
    code, elapsed = train_demo(out, spec, seed, lambda data: module.write(data, **problems, seed=seed), TOOL_MODEL)
    if code:
        return code
    rows = [json.loads(line) for line in (out / "data" / "test.jsonl").read_text().splitlines()]
    rows = rows[:QUICK_PROMPTS] if quick else rows
    finals = {e["stage"]: Path(e["path"]) / "policy" for e in map(json.loads, (out / "events.jsonl").read_text().splitlines())
              if e["type"] == "checkpoint"}
    agent = {**spec["rollout"]["agent"], "max_new_tokens": spec["rollout"]["max_new_tokens"]}
    runs = {"without tools (after SFT)": tool_episodes(finals["sft"], rows, agent, "orchestrator.entrypoints.demo:NoCalculatorEnv"),
            "after SFT": tool_episodes(finals["sft"], rows, agent),
            "after GRPO": tool_episodes(finals["grpo"], rows, agent)}
    png = plot_run(out)
    print(f"\nheld-out greedy episodes ({len(rows)} problems a*b: 3 digits by 2, none in training):")
    print(f"  {'':24s} {'accuracy':>8s} {'calls/episode':>13s} {'valid calls':>11s}")
    for name, r in runs.items():
        print(f"  {name:24s} {100 * r['accuracy']:7.1f}% {r['calls']:13.2f} {100 * r['valid']:10.1f}%")
    print(f"wall time {elapsed / 60:.1f} min (training); trajectories in {out / 'trajectories.jsonl'}; plot {png}")
    strict = {name: {k: (None if math.isnan(v) else v) for k, v in r.items()} for name, r in runs.items()}  # (no calls: valid is NaN)
    (out / "demo_result.json").write_text(json.dumps({"problems": len(rows), "training_s": elapsed, "runs": strict}, indent=1))
    return 0
