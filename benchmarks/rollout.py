"""Generation throughput of the vLLM and HF rollout backends on the same prompts and models.

    python benchmarks/rollout.py [--sizes 1M 10M] [--prompts 8] [--n 4] [--max-new-tokens 32] [--no-record]

Each (size, backend) runs in a fresh process: one warm-up call, then the best of --repeats
`generate` calls. Tokens/s counts response tokens (up to and including EOS). The table goes to
docs/benchmarks.md (section `rollout`, benchmarks/record.py) unless --no-record.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# As in the job's actors (orchestrator/runtime/placement.py): spinning OpenMP waits distort timings on a shared machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from benchmarks.record import markdown_table, record
from benchmarks.weight_sync import SHAPES


def measure(backend: str, size: str, args, out_queue) -> None:
    import torch

    from orchestrator.stages.driver import rollout_class
    from orchestrator.entrypoints.tiny_model import init_model

    hidden, layers = SHAPES[size]
    with tempfile.TemporaryDirectory() as tmp:
        init_model(tmp, hidden_size=hidden, layers=layers, seed=0)
        rollout = rollout_class(backend)(tmp, n=args.n, max_new_tokens=args.max_new_tokens, seed=0)
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, 256, (int(torch.randint(8, 24, (1,), generator=g)),), generator=g).tolist() for _ in range(args.prompts)]
        extras = [{} for _ in prompts]
        rollout.generate(prompts, extras, step=0)
        best = 0.0
        for step in range(1, args.repeats + 1):
            batch, seconds = rollout.generate(prompts, extras, step=step)
            best = max(best, float(batch.response_mask.sum()) / seconds)
    out_queue.put(best)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["1M", "10M"], choices=list(SHAPES))
    parser.add_argument("--backends", nargs="+", default=["vllm", "hf"], choices=["vllm", "hf"])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-record", action="store_true", help="print only; leave docs/benchmarks.md as it is")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    ctx = mp.get_context("spawn")
    print(f"{args.prompts} prompts x {args.n} samples, up to {args.max_new_tokens} new tokens")
    print(f"{'model':>6} " + " ".join(f"{b + ' tok/s':>12}" for b in args.backends))
    rows = []
    for size in args.sizes:
        rates = []
        for backend in args.backends:
            queue = ctx.Queue()
            proc = ctx.Process(target=measure, args=(backend, size, args, queue))
            proc.start()
            rates.append(queue.get())
            proc.join()
        print(f"{size:>6} " + " ".join(f"{r:>12.0f}" for r in rates), flush=True)
        rows.append([size, *(f"{r:,.0f}" for r in rates)])
    if not args.no_record:
        setup = (f"CPU, {args.prompts} prompts x {args.n} samples, up to {args.max_new_tokens} new tokens, "
                 f"same prompts and models for every backend, best of {args.repeats} `generate` calls after one warm-up.")
        record("rollout", setup + "\n\n" + markdown_table(["model", *(f"{b} tokens/s" for b in args.backends)], rows),
               title="Rollout tokens/s")


if __name__ == "__main__":
    main()
