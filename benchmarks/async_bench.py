"""Synchronous vs asynchronous GRPO (issue 29) on a long-tailed response-length workload, on this machine.

    python benchmarks/async_bench.py [--rounds 3] [--steps 12] [--backend hf|vllm] [--no-record]

The workload: the tiny model (`rlhf init-model`) made to end its completions after a geometric number
of tokens: every token's embedding gets one constant dimension (which the tied LM head turns into
one logit shift for every token, cancelling in the softmax) and EOS a little more of it, so that
EOS is drawn with a fixed chance per token. A step's 32 completions then have a median of 15-25
tokens and a longest 4-8x that (printed and recorded: the longest / median of each of a few
step-sized batches, sampled before the runs). Rewards: the arithmetic answer and a 0.5 format bonus
(examples/grpo.yaml's), so that the runs learn something comparable.

Four modes, each `--steps` steps of 4 prompts x 8 samples through the real entrypoint
(`python -m orchestrator.entrypoints.run`, an embedded Ray): `sync` (rollout.max_staleness 0: the
plan's synchronous loop, on CPUs one call to the trainer per step) with every core or one torch
thread (on a shared 2-core machine two spinning OpenMP threads can lose to one), `async k=1` and
`async k=2` (the rollout in its own actor and the trainer beside it, one torch thread each). The
modes run in turn, `--rounds` times, each round in a rotated order. samples/s = the run's samples /
(last metrics line - the `actors_ready` event): model loading and Ray's start are left out, every
step is in. Reward at equal samples: reward/mean over each run's last 3 steps. Response tokens/s: the completions'
tokens over the same seconds (the lengths drift with training, differently per mode, unless the lr is small).
`--backend vllm`: the rollout on vLLM's CPU build (its engine in the rollout actor in every mode; async
pauses it at each chunk's end: workers/rollout_vllm.py `stream`), in its own block.
Writes docs/benchmarks.md's `async_bench` block (benchmarks/record.py) unless --no-record.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.record import markdown_table, record

PROMPTS, N, MAX_NEW = 4, 8, 128
EOS_SHIFT = 0.28  # EOS's extra on the constant dimension: a median of 15-25 tokens (measured, see above)
# What the synchronous plan runs, per backend (the HF rollout shares the trainer's actor on CPUs).
SYNC_PLAN = {"hf": "one call per step to the trainer", "vllm": "the vLLM rollout actor, then the trainer, each step"}
# mode -> (max_staleness, torch threads per actor; None: every core)
MODES = {"sync": (0, None), "sync, 1 thread": (0, 1), "async k=1": (1, 1), "async k=2": (2, 1)}


def long_tailed_model(out: Path) -> Path:
    """The tiny model with a fixed chance of EOS per token (see the module's docstring)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orchestrator.entrypoints.tiny_model import init_model

    init_model(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    eos = AutoTokenizer.from_pretrained(out).eos_token_id
    with torch.no_grad():
        weight = model.get_input_embeddings().weight  # tied: also the LM head
        weight[:, 0] = 1.0
        weight[eos, 0] = 1.0 + EOS_SHIFT
    model.save_pretrained(out)
    return out


def length_tails(model_dir: Path, batches: int = 4) -> list[tuple[float, int]]:
    """(median, longest) completion length of `batches` step-sized batches (4 prompts x 8 samples)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orchestrator.core.batch import left_pad

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rows = [json.loads(line) for line in (ROOT / "examples/arithmetic/data/train.jsonl").read_text().splitlines()]
    out = []
    for b in range(batches):
        ids, mask = left_pad([tok(r["prompt"])["input_ids"] for r in rows[b * PROMPTS:(b + 1) * PROMPTS]], tok.pad_token_id)
        torch.manual_seed(b)
        with torch.no_grad():
            seqs = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=True, top_k=0,
                                  num_return_sequences=N, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        lengths = [r.index(tok.eos_token_id) + 1 if tok.eos_token_id in r else MAX_NEW for r in seqs[:, ids.shape[1]:].tolist()]
        out.append((statistics.median(lengths), max(lengths)))
    return out


def spec(model_dir: Path, run_dir: Path, mode: str, steps: int, lr: float, backend: str = "hf", chunk_tokens: int = 16) -> dict:
    k, threads = MODES[mode]
    return {
        "api_version": "rlhf/v1", "name": run_dir.name, "algorithm": {"name": "grpo"}, "model": {"path": str(model_dir)},
        "data": {"train_file": str(ROOT / "examples/arithmetic/data/train.jsonl"), "max_prompt_length": 16},
        "rollout": {"n": N, "max_new_tokens": MAX_NEW, "max_staleness": k, "chunk_tokens": chunk_tokens, "backend": backend},
        "rewards": [{"function": "accuracy"}, {"function": "regex_match", "name": "format", "weight": 0.5,
                                                "kwargs": {"pattern": "^-?\\d"}}],
        "optim": {"lr": lr, "steps": steps, "prompts_per_step": PROMPTS, "seed": 0},
        "resources": {"torch_threads": threads} if threads else {}, "output_dir": str(run_dir),
    }


def run(model_dir: Path, work: Path, mode: str, round_: int, steps: int, lr: float, backend: str, chunk_tokens: int) -> dict:
    run_dir = work / f"{''.join(c for c in mode if c.isalnum())}-r{round_}"
    path = work / f"{run_dir.name}.json"
    path.write_text(json.dumps(spec(model_dir, run_dir, mode, steps, lr, backend, chunk_tokens)))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-m", "orchestrator.entrypoints.run", "--spec", str(path)], cwd=ROOT, env=env,
                          check=False, capture_output=True, text=True, timeout=1800)
    if done.returncode:
        raise RuntimeError(f"{mode} round {round_} failed:\n{done.stderr[-3000:]}")
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    start = next(e["time"] for e in events if e["type"] == "actors_ready")
    seconds = metrics[-1]["time"] - start
    result = {"mode": mode, "round": round_, "seconds": seconds, "samples_per_s": steps * PROMPTS * N / seconds,
              "tokens_per_s": sum(m["response_length/mean"] for m in metrics) * PROMPTS * N / seconds,
              "reward_last3": statistics.mean(m["reward/mean"] for m in metrics[-3:]),
              "length_mean": statistics.mean(m["response_length/mean"] for m in metrics),
              "staleness_mean": statistics.mean(m.get("staleness/mean", 0.0) for m in metrics),
              # A synchronous step's split (after the first): what overlapping generation and update can gain at most.
              "generate_s": statistics.mean(m.get("timing/generate_compute", 0.0) for m in metrics[1:]),
              "update_s": statistics.mean(m.get("timing/update_compute", 0.0) for m in metrics[1:])}
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--lr", type=float, default=1e-5,
                        help="1e-5 (default) keeps the lengths, which set a step's cost, where they start in every mode; "
                        "a larger lr lets them drift, differently per mode (recorded in its own block)")
    parser.add_argument("--backend", choices=["hf", "vllm"], default="hf", help="the rollout's engine (vllm: vLLM's CPU build)")
    parser.add_argument("--chunk-tokens", type=int, default=16, help="async: tokens per chunk of a partial rollout (weights load between chunks)")
    parser.add_argument("--no-record", action="store_true", help="print only; leave docs/benchmarks.md as it is")
    args = parser.parse_args()
    names = list(MODES)
    with tempfile.TemporaryDirectory(prefix="async-bench-") as tmp:
        work = Path(tmp)
        model_dir = long_tailed_model(work / "model")
        tails = length_tails(model_dir)
        print("median, longest per batch:", tails, flush=True)
        results = [run(model_dir, work, mode, r + 1, args.steps, args.lr, args.backend, args.chunk_tokens)
                   for r in range(args.rounds) for mode in names[r % len(names):] + names[:r % len(names)]]
    # The baseline: the faster of the two synchronous configurations (the machine decides which).
    sync = max(statistics.median(x["samples_per_s"] for x in results if x["mode"] == m) for m in names if m.startswith("sync"))
    rows = []
    for mode in names:
        mine = [x for x in results if x["mode"] == mode]
        rate = statistics.median(x["samples_per_s"] for x in mine)
        tokens = statistics.median(x["tokens_per_s"] for x in mine)
        rows.append([mode, " / ".join(f"{x['samples_per_s']:.1f}" for x in mine), f"{rate:.1f}", f"{rate / sync:.2f}x", f"{tokens:.0f}",
                     " / ".join(f"{x['reward_last3']:.3f}" for x in mine), f"{statistics.mean(x['length_mean'] for x in mine):.1f}",
                     f"{statistics.mean(x['staleness_mean'] for x in mine):.2f}"])
    table = markdown_table(["mode", "samples/s per round", "median", "vs best sync", "response tokens/s (median)", "reward/mean, last 3 steps, per round",
                            "mean length", "staleness mean"], rows)
    text = (f"GRPO on the {args.backend} backend, {args.steps} steps of {PROMPTS} prompts x {N} samples (max {MAX_NEW} tokens), {args.rounds} rounds, "
            f"modes alternating in rotated order. Workload: step-sized batches' (median, longest) completion lengths "
            f"{', '.join(f'({m:g}, {x})' for m, x in tails)}: longest / median {min(x / m for m, x in tails):.1f}-"
            f"{max(x / m for m, x in tails):.1f}x. sync: {SYNC_PLAN[args.backend]} (all cores, or 1 torch "
            f"thread); async: the rollout actor and the trainer, one torch thread each, chunks of {args.chunk_tokens} tokens. lr {args.lr:g}.\n\n{table}")
    one = [x for x in results if x["mode"] == "sync, 1 thread"]
    gen, upd = statistics.median(x["generate_s"] for x in one), statistics.median(x["update_s"] for x in one)
    text += (f"\n\nThe synchronous step (1 thread, median of the rounds' means): generate {gen:.3f} s, update {upd:.3f} s; "
             f"overlapping them can give at most (generate + update) / max(generate, update) = {(gen + upd) / max(gen, upd, 1e-9):.2f}x "
             "its samples/s, and less when a chunked generation costs more than one call.")
    print(text)
    if not args.no_record:
        section = "async_bench" if args.lr == parser.get_default("lr") else f"async_bench_lr{args.lr:g}"
        section += ("" if args.backend == "hf" else f"_{args.backend}") + ("" if args.chunk_tokens == 16 else f"_chunk{args.chunk_tokens}")
        record(section, text, title="Synchronous vs asynchronous GRPO, long-tailed lengths (async_bench)")


if __name__ == "__main__":
    main()
