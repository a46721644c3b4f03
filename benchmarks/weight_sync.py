"""Time one weight sync into a running vLLM engine, next to a plain copy of the same bytes.

    python benchmarks/weight_sync.py [--sizes 1M 10M 100M] [--no-ray]

For each model size (a Qwen2 of the shape `orchestrator.tiny_model` builds) it starts one
`VLLMRollout` (in a fresh process, so engines do not share state) and prints, per sync:

- copy:   `dst.copy_(src)` over every tensor of the state dict, into preallocated tensors;
- put:    `ray.put(to_transport(state_dict))`, the trainer's half of the CPU path (one copy into
          the object store's shared memory; the rollout actor's `ray.get` maps it without a copy);
- load:   `VLLMRollout.load_weights(state_dict)`, the rollout's half (into the engine's kernels);
- sync:   put + load, what a step pays. Rates are state-dict bytes / seconds, best of --repeats.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# As in the job's actors (orchestrator/placement.py): spinning OpenMP waits distort timings on a shared machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# (hidden size, layers) of models with about 1M, 10M and 100M parameters (head_dim 64).
SHAPES = {"1M": (128, 4), "10M": (256, 12), "30M": (512, 9), "100M": (768, 13)}


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(size: str, repeats: int, use_ray: bool, out_queue) -> None:
    import torch

    from orchestrator.tiny_model import build_model, build_tokenizer
    from workers.rollout_vllm import VLLMRollout

    hidden, layers = SHAPES[size]
    with tempfile.TemporaryDirectory() as tmp:
        tok = build_tokenizer()
        model = build_model(len(tok), hidden, layers, 0, tok.eos_token_id, tok.pad_token_id)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        params = sum(p.numel() for p in model.parameters())
        state = {k: v.detach().clone() + 0.01 for k, v in model.state_dict().items()}
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
        unique = {t.data_ptr(): t for t in state.values()}
        nbytes = sum(t.numel() * t.element_size() for t in unique.values())
        rollout = VLLMRollout(tmp, n=1, max_new_tokens=4, threads=None)
        dst = {k: torch.empty_like(v) for k, v in state.items()}
        rollout.load_weights(state)  # first touch of every page
        # Interleaved, so both see the same load on a shared machine.
        copy_s = load_s = float("inf")
        for _ in range(repeats):
            copy_s = min(copy_s, best(lambda: [dst[k].copy_(v) for k, v in state.items()], 1))
            load_s = min(load_s, best(lambda: rollout.load_weights(state), 1))
        put_s = float("nan")
        if use_ray:
            import ray

            ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
            from workers.common import to_transport

            # What the driver's sync does on the trainer's side: numpy views into the object store.
            put_s = best(lambda: ray.put(to_transport(state)), repeats)
            ray.shutdown()
        assert all(torch.equal(rollout.state_dict()[k], v) for k, v in state.items())
    out_queue.put(dict(size=size, params=params, bytes=nbytes, copy_s=copy_s, put_s=put_s, load_s=load_s))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["1M", "10M", "100M"], choices=list(SHAPES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-ray", action="store_true", help="skip the object-store half")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    ctx = mp.get_context("spawn")
    rows = []
    header = f"{'model':>6} {'params':>11} {'MB':>8} {'copy GB/s':>10} {'put GB/s':>9} {'load GB/s':>10} {'sync s':>8} {'sync GB/s':>10} {'sync/copy':>9}"
    print(header)
    for size in args.sizes:
        queue = ctx.Queue()
        proc = ctx.Process(target=measure, args=(size, args.repeats, not args.no_ray, queue))
        proc.start()
        r = queue.get()
        proc.join()
        sync_s = r["load_s"] + (0.0 if args.no_ray else r["put_s"])
        r.update(sync_s=sync_s, copy_rate=r["bytes"] / r["copy_s"], sync_rate=r["bytes"] / sync_s)
        rows.append(r)
        gb = lambda s: r["bytes"] / s / 1e9 if s == s else float("nan")  # noqa: E731
        print(f"{size:>6} {r['params']:>11,} {r['bytes'] / 1e6:>8.1f} {gb(r['copy_s']):>10.2f} {gb(r['put_s']):>9.2f} "
              f"{gb(r['load_s']):>10.2f} {sync_s:>8.3f} {gb(sync_s):>10.2f} {r['sync_rate'] / r['copy_rate']:>8.0%}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
