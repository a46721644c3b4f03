"""Where a GRPO step's time goes in our Orchestrator, and our samples/s next to TRL's GRPOTrainer.

    python benchmarks/step_breakdown.py [--spec examples/grpo.yaml] [--warmup 3] [--steps 20] [--skip-trl] [--rounds 1]
    python benchmarks/step_breakdown.py --packing    # tokens/s with and without optim.micro_batch_tokens

1. Runs the spec through the real `Orchestrator` on a local Ray (the same actors, placement and
   `train_step` as `rlhf train`, minus checkpoints and reporters), drops --warmup steps, and prints
   the median of each phase from the driver's `timing/*` metrics, as seconds and % of the median step.
2. Runs TRL's `GRPOTrainer` (benchmarks/_trl_grpo.py, in a subprocess, after our Ray is shut down)
   on the same model files, data file, sampling, optimiser and reward functions, for the same steps,
   timed per optimiser step with a TrainerCallback, and prints its median step and phases.
3. Prints ours / TRL in samples/s, where samples/s = samples per step / median step time (and, as a
   check against other load on the machine, / the fastest step's time).

With --rounds N the two sides run N times each, alternating (ours, TRL, TRL, ours, ...: each side
first as often as the other, so a machine that drifts slower or faster favours neither), and the
ratio is printed per round and over all rounds' measured steps pooled. On a shared 2-core machine
one side's median moves by 10-15% from run to run; the pooled ratio moves less.

If the spec's model path is missing, a tiny model (`rlhf init-model`) is built in a temp dir.
Both sides use the same torch intra-op thread count (the spec's resources.torch_threads, else all cores).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator.core.spec import JobSpec, parse_spec, read_spec_file  # noqa: E402

# (row label, metric keys summed): the compute phases, in the order a step runs them.
PHASES = [
    ("generate", ["generate_compute"]),
    ("reference", ["reference"]),
    ("reward", ["reward"]),
    ("critic", ["critic", "critic_update_compute"]),
    ("advantages (driver)", ["advantages"]),
    ("update", ["update_compute"]),
    ("weight sync", ["weight_sync"]),
    ("overhead", ["overhead"]),
]


def bench_spec(path: str, model_dir: Path, run_dir: Path, steps: int) -> tuple[JobSpec, bool]:
    """The spec with our run's length, a scratch run dir, no checkpoints, and a built model if its path is missing."""
    raw = read_spec_file(path)
    built = False
    if not Path(raw["model"]["path"]).exists():
        from orchestrator.entrypoints.tiny_model import init_model

        init_model(model_dir)
        raw["model"]["path"] = str(model_dir)
        built = True
    raw["model"]["path"] = str(Path(raw["model"]["path"]).resolve())
    raw["output_dir"] = str(run_dir)
    raw.setdefault("optim", {}).update(steps=steps, epochs=None)
    raw["checkpoint"] = {"every": 0}
    raw["data"]["train_file"] = str(Path(raw["data"]["train_file"]).resolve())
    return parse_spec(raw, source=path), built


def threads_for(spec: JobSpec) -> int:
    # What workers.common.configure_threads gives our actors.
    return spec.resources.torch_threads or len(os.sched_getaffinity(0))


# ------------------------------------------------------------ ours
class _NullReporter:
    def event(self, type: str, message: str = "", **data: Any) -> None:
        pass

    def metrics(self, step: int, values: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


def run_ours(spec: JobSpec, warmup: int) -> list[dict[str, float]]:
    """Per-step metrics of the measured steps (after `warmup`), from `Orchestrator.train_step`."""
    import ray

    from orchestrator.stages.driver import Orchestrator
    from orchestrator.stages.pipeline import connect_ray, preflight

    tokenizer, dataset = preflight(spec)
    connect_ray(spec)
    orch = Orchestrator(spec, dataset, _NullReporter(), f"bench-{os.getpid()}", tokenizer.eos_token_id, tokenizer.pad_token_id)
    out = []
    try:
        orch.start()
        for step in range(1, orch.total_steps + 1):
            t0 = time.perf_counter()
            metrics = orch.train_step(step)
            metrics["wall"] = time.perf_counter() - t0
            if step > warmup:
                out.append(metrics)
    finally:
        orch.shutdown()
        ray.shutdown()
    return out


def phase_seconds(metrics: dict[str, float], keys: list[str]) -> float | None:
    found = [metrics[f"timing/{k}"] for k in keys if f"timing/{k}" in metrics]
    return sum(found) if found else None


def print_ours(rows: list[dict[str, float]], samples: int) -> float:
    step = statistics.median(r["timing/step"] for r in rows)
    print(f"\nOURS: Orchestrator.train_step, median of {len(rows)} steps")
    print(f"  {'phase':<22}{'median s':>10}{'% of step':>11}{'min s':>10}")
    for label, keys in PHASES:
        values = [v for r in rows if (v := phase_seconds(r, keys)) is not None]
        if not values:
            print(f"  {label:<22}{'-':>10}{'-':>11}{'-':>10}   (not in this job)")
            continue
        med = statistics.median(values)
        print(f"  {label:<22}{med:>10.4f}{100 * med / step:>10.1f}%{min(values):>10.4f}")
    best = min(r["timing/step"] for r in rows)
    print(f"  {'step':<22}{step:>10.4f}{100.0:>10.1f}%{best:>10.4f}   (phase medians need not add up to it exactly)")
    print("  reward, reference and critic values run concurrently: overhead subtracts only the longest of them.")
    # Where the overhead goes: each call's driver-side time minus its actor-side compute.
    if "timing/step_call" in rows[0]:  # one call per step (JobSpec.steps_in_trainer)
        inside = ("generate_compute", "reward", "advantages", "update_compute")
        split = {
            "step call (Ray + transfer)": [r["timing/step_call"] - sum(r[f"timing/{k}"] for k in inside) for r in rows],
            "driver around the call": [r["timing/step"] - r["timing/step_call"] for r in rows],
        }
    else:
        split = {
            "generate call (Ray + transfer)": [r["timing/generate"] - r["timing/generate_compute"] for r in rows],
            "score call (put + Ray + get)": [r["timing/score"] - max(r.get(f"timing/{k}", 0.0) for k in ("reward", "reference", "critic")) for r in rows],
            "update call (Ray + transfer)": [r["timing/update"] - r["timing/update_compute"] for r in rows],
            "driver between phases": [r["timing/step"] - sum(r.get(f"timing/{k}", 0.0) for k in ("generate", "score", "advantages", "update", "weight_sync")) for r in rows],
        }
    print("  overhead by where it goes (medians):")
    for label, values in split.items():
        med = statistics.median(values)
        print(f"    {label:<32}{med:>8.4f} s{100 * med / step:>7.1f}%")
    rate = samples / step
    mean_rate = samples * len(rows) / sum(r["timing/step"] for r in rows)
    print(f"  samples/s: {rate:.1f} (median step), {mean_rate:.1f} (total over the measured steps), {samples / best:.1f} (fastest step)")
    print(f"  reward/mean over measured steps: {statistics.mean(r['reward/mean'] for r in rows):.3f}")
    return rate, samples / best


# ------------------------------------------------------------ TRL
def trl_config(spec: JobSpec, warmup: int, steps: int) -> dict[str, Any]:
    """Everything the TRL runner needs, read from the same spec our run used."""
    if any(s.model for s in spec.rewards):
        raise SystemExit("the TRL comparison supports function rewards only; this spec has a reward model")
    opt, ro = spec.optim, spec.rollout
    return dict(
        model_path=spec.model.path, dtype=spec.model.dtype, train_file=spec.data.train_file, prompt_key=spec.data.prompt_key,
        prompts_per_step=opt.prompts_per_step, n=ro.n, max_new_tokens=ro.max_new_tokens, temperature=ro.temperature, top_p=ro.top_p,
        lr=opt.lr, weight_decay=opt.weight_decay, grad_clip=opt.grad_clip, kl_coef=opt.kl_coef, clip_eps_low=opt.clip_eps_low,
        clip_eps_high=opt.clip_eps_high, norm_adv_by_std=spec.algorithm.norm_adv_by_std, seed=opt.seed,
        rewards=[dict(function=s.function, label=s.label, weight=s.weight, kwargs=s.kwargs) for s in spec.rewards],
        threads=threads_for(spec), use_cpu=spec.resources.trainer.num_gpus == 0, warmup=warmup, steps=steps,
    )


def run_trl(cfg: dict[str, Any], scratch: Path) -> dict[str, Any]:
    cfg_path, out_path = scratch / "trl_config.json", scratch / "trl_result.json"
    cfg_path.write_text(json.dumps(cfg))
    # TRL as its users run it: libgomp's own waiting policy (no OMP_WAIT_POLICY, no GOMP_SPINCOUNT).
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(TOKENIZERS_PARALLELISM="false", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "_trl_grpo.py"), str(cfg_path), str(out_path)], check=True, env=env, cwd=ROOT)
    return json.loads(out_path.read_text())


def check_trl_shape(result: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    """Problems with what TRL's steps really did, against one generation of prompts x n and one backward."""
    samples, problems = cfg["prompts_per_step"] * cfg["n"], []
    for i, s in enumerate(result["shapes"]):
        want = dict(completions=samples, generated=samples, prompts=cfg["prompts_per_step"], backward_calls=1, train_batch=samples,
                    groups_whole=True, threads=cfg["threads"])
        bad = {k: s.get(k) for k, v in want.items() if s.get(k) != v}
        if bad:
            problems.append(f"measured step {i}: {bad} (wanted {want})")
    return problems


def print_trl(result: dict[str, Any], samples: int) -> float:
    steps = result["step_times"]
    step = statistics.median(steps)
    print(f"\nTRL: GRPOTrainer, median of {len(steps)} steps (on_step_begin -> on_step_end), device {result['device']}")
    print(f"  {'phase':<22}{'median s':>10}{'% of step':>11}{'min s':>10}")
    ph = result["phases"]
    rows = {
        "generate": [p.get("generate", 0.0) for p in ph],
        "reward": [p.get("reward", 0.0) for p in ph],
        "rollout rest": [p.get("rollout", 0.0) - p.get("generate", 0.0) - p.get("reward", 0.0) for p in ph],
        "update": [t - p.get("rollout", 0.0) for t, p in zip(steps, ph)],
    }
    for label, values in rows.items():
        med = statistics.median(values)
        print(f"  {label:<22}{med:>10.4f}{100 * med / step:>10.1f}%{min(values):>10.4f}")
    print(f"  {'step':<22}{step:>10.4f}{100.0:>10.1f}%{min(steps):>10.4f}")
    print("  rollout rest: tokenising, padding, decoding, advantages, metric gathering; update: forward, backward, clip, AdamW.")
    rate = samples / step
    print(f"  samples/s: {rate:.1f} (median step), {samples * len(steps) / sum(steps):.1f} (total over the measured steps), "
          f"{samples / min(steps):.1f} (fastest step)")
    if result["reward_mean"]:
        print(f"  reward/mean over measured steps: {statistics.mean(result['reward_mean']):.3f}")
    return rate, samples / min(steps)


# ------------------------------------------------------------ main
def header(spec: JobSpec, built: bool, args: argparse.Namespace) -> str:
    opt, ro = spec.optim, spec.rollout
    rewards = " + ".join(f"{s.weight:g}*{s.label}" for s in spec.rewards)
    return "\n".join([
        f"GRPO step breakdown: {args.spec}{' (model built in a temp dir: spec path missing)' if built else ''}",
        f"  model {spec.model.path} ({spec.model.dtype}), data {spec.data.train_file}",
        f"  matched config: {opt.prompts_per_step} prompts x {ro.n} generations = {spec.samples_per_step} samples/step, "
        f"max completion {ro.max_new_tokens} tokens, temperature {ro.temperature:g}, top_p {ro.top_p:g}, top_k 0",
        f"  lr {opt.lr:g} constant, AdamW wd {opt.weight_decay:g}, grad clip {opt.grad_clip}, clip eps {opt.clip_eps_low:g}/{opt.clip_eps_high:g}, "
        f"beta/KL {opt.kl_coef:g} (reference model: {'yes' if spec.needs_reference else 'none'}), "
        f"one optimiser step and one backward per step (mini/micro batch = {opt.mini_batch_size or 'all'}/{opt.micro_batch_size or 'all'}, "
        f"ppo_epochs {opt.ppo_epochs})",
        f"  rewards: {rewards}; advantages: group-normalised ({'/std' if spec.algorithm.norm_adv_by_std else 'no std'}); loss token-mean",
        f"  torch threads: {threads_for(spec)} on both sides; {args.warmup} warm-up steps excluded, {args.steps} measured",
        "  TRL equivalents: per_device_train_batch_size=64, gradient_accumulation_steps=1, steps_per_generation=1 "
        "(generation_batch_size=64), num_generations=8, num_iterations=1, beta=0, loss_type=dapo (token-mean), "
        "scale_rewards=group, lr_scheduler_type=constant, optim=adamw_torch, bf16=False, gradient_checkpointing=False, "
        "use_vllm=False; TRL 1.16 has no max_prompt_length (the spec's is not enforced on TRL's side); "
        "prompt order differs (TRL's seeded RepeatSampler vs our PromptSampler), same file",
    ])


def packing(hidden: int, layers: int, samples: int, max_response: int, budget: int, repeats: int) -> None:
    """An update's tokens/s with and without token-budget micro-batches (`optim.micro_batch_tokens`),
    on a batch whose completion lengths vary widely (uniform in 1..max_response), with the real
    `PolicyTrainer` and the reference's log-prob pass (no Ray): the same loss, less padding."""
    import torch

    from orchestrator.core.batch import build_batch, micro_batches
    from orchestrator.core.spec import OptimSpec, RolloutSpec
    from orchestrator.entrypoints.tiny_model import init_model
    from workers.common import batched_logprobs
    from workers.trainer import PolicyTrainer

    with tempfile.TemporaryDirectory(prefix="packing-") as tmp:
        model_dir = str(init_model(Path(tmp) / "model", hidden_size=hidden, layers=layers))
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(3, 250, (int(torch.randint(4, 17, (1,), generator=g)),), generator=g).tolist() for _ in range(samples)]
        lengths = torch.randint(1, max_response + 1, (samples,), generator=g)
        valid = (torch.arange(max_response)[None] < lengths[:, None]).long()
        batch = build_batch(prompts, torch.randint(3, 250, (samples, max_response), generator=g), valid, pad_id=259)
        batch = batch.replace(advantages=torch.randn(samples, max_response, generator=g) * batch.response_mask)
        real = int(batch.attention_mask.sum())
        micro = 8
        print(f"packing: Qwen2 hidden {hidden} x {layers} layers, {samples} samples, prompts 4-16 tokens, completions 1-{max_response} "
              f"(mean {lengths.float().mean():.0f}); {real} real tokens of {batch.input_ids.numel()} padded; {torch.get_num_threads()} threads")
        for label, tokens in (("micro_batch_size 8", None), (f"micro_batch_tokens {budget}", budget)):
            parts = micro_batches(batch, micro, tokens)
            computed = sum(p.input_ids.numel() for p in parts)
            trainer = PolicyTrainer(model_dir, OptimSpec(lr=1e-5, prompts_per_step=samples, micro_batch_tokens=tokens),
                                    RolloutSpec(n=1, max_new_tokens=max_response))
            update, ref = [], []
            for _ in range(repeats + 1):
                t0 = time.perf_counter()
                loss = trainer.train_step(batch, 1, 1, micro, True)["policy_loss"]
                t1 = time.perf_counter()
                batched_logprobs(trainer.model, batch, 1.0, micro, tokens)
                update.append(t1 - t0)
                ref.append(time.perf_counter() - t1)
            u, r = statistics.median(update[1:]), statistics.median(ref[1:])
            print(f"  {label:<24} {len(parts):>3} micro-batches, {computed:>6} tokens computed; update {u:.3f} s = {real / u:,.0f} tokens/s; "
                  f"reference pass {r:.3f} s = {real / r:,.0f} tokens/s; loss {loss:.6f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default=str(ROOT / "examples" / "grpo.yaml"), help="Job spec to run (GRPO, function rewards).")
    parser.add_argument("--warmup", type=int, default=3, help="Steps run first and left out of the medians.")
    parser.add_argument("--steps", type=int, default=20, help="Measured steps per side.")
    parser.add_argument("--skip-trl", action="store_true", help="Only our Orchestrator's breakdown.")
    parser.add_argument("--skip-ours", action="store_true", help="Only TRL's run.")
    parser.add_argument("--rounds", type=int, default=1, help="Runs of each side, alternating; ratios per round and pooled.")
    parser.add_argument("--packing", action="store_true", help="Instead: an update's tokens/s with and without "
                        "optim.micro_batch_tokens on completions of widely varying length (see `packing`).")
    args = parser.parse_args()
    if args.packing:
        packing(hidden=256, layers=4, samples=64, max_response=256, budget=4096, repeats=3)
        return
    os.chdir(ROOT)  # the spec's relative paths (model, data) are relative to the repository

    with tempfile.TemporaryDirectory(prefix="step-breakdown-") as tmp:
        scratch = Path(tmp)
        spec, built = bench_spec(args.spec, scratch / "model", scratch / "run", args.warmup + args.steps)
        print(header(spec, built, args), flush=True)
        samples = spec.samples_per_step
        steps: dict[str, list[float]] = {"ours": [], "trl": []}  # every round's measured step times, pooled
        for r in range(args.rounds):
            if args.rounds > 1:
                print(f"\n======== round {r + 1} of {args.rounds}", flush=True)
            ours = trl = None
            sides = ["ours", "trl"] if r % 4 in (0, 3) else ["trl", "ours"]
            for side in sides:
                if side == "ours" and not args.skip_ours:
                    rows = run_ours(spec, args.warmup)
                    ours = print_ours(rows, samples)
                    steps["ours"] += [row["timing/step"] for row in rows]
                if side == "trl" and not args.skip_trl:
                    cfg = trl_config(spec, args.warmup, args.steps)
                    result = run_trl(cfg, scratch)
                    trl = print_trl(result, samples)
                    steps["trl"] += result["step_times"]
                    problems = check_trl_shape(result, cfg)
                    print("  TRL batch check: " + ("every measured step generated "
                          f"{samples} completions ({cfg['prompts_per_step']} prompts x {cfg['n']}), one backward, {cfg['threads']} threads"
                          if not problems else "MISMATCH\n    " + "\n    ".join(problems)))
                sys.stdout.flush()
            if ours and trl:
                print(f"\nours / TRL samples/s: {ours[0] / trl[0]:.2f}x at the median step ({ours[0]:.1f} vs {trl[0]:.1f}), "
                      f"{ours[1] / trl[1]:.2f}x at the fastest step ({ours[1]:.1f} vs {trl[1]:.1f})", flush=True)
        if args.rounds > 1 and steps["ours"] and steps["trl"]:
            med = {k: statistics.median(v) for k, v in steps.items()}
            print(f"\nall {args.rounds} rounds pooled ({len(steps['ours'])} steps a side): ours / TRL samples/s "
                  f"{med['trl'] / med['ours']:.2f}x at the median step ({samples / med['ours']:.1f} vs {samples / med['trl']:.1f}), "
                  f"{min(steps['trl']) / min(steps['ours']):.2f}x at the fastest step")


if __name__ == "__main__":
    main()
