"""Time one weight sync from a trainer actor into a running vLLM engine, next to a plain copy of the same bytes.

    python benchmarks/weight_sync.py [--sizes 1M 10M 100M] [--repeats 5] [--json out.json]

For each model size (a Qwen2 of the shape `orchestrator.entrypoints.tiny_model` builds) it starts, on a local
Ray, one `PolicyTrainer` actor and one `VLLMRollout` actor (the job's own classes), and times what
`Orchestrator.sync_weights` does, from the driver, best of --repeats:

- copy:          `dst.copy_(src)` over every tensor of the state dict in one process, into
                 preallocated tensors: the limit (the rate of memory itself);
- shared memory: the CPU default (`rollout.weight_sync: auto` on one node): the engine computes
                 from a /dev/shm file that the trainer copies its tensors into. In a training step
                 the trainer does so as the last act of its update call, so the step pays the copy
                 alone ("in step", timed inside the actor); a sync on its own (after loading a
                 checkpoint) adds one actor call ("call", timed from the driver);
- object store:  `rollout.weight_sync: object_store`: the trainer puts its state dict into Ray's
                 object store (one copy), the engine maps it and loads it (a second copy).

Rates are state-dict bytes / seconds. After each path the engine's weights are compared with the
trainer's, tensor by tensor.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# As in the job's actors (orchestrator/runtime/placement.py): spinning OpenMP waits distort timings on a shared machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

# (hidden size, layers) of models with about 1M, 10M and 100M parameters (head_dim 64).
SHAPES = {"1M": (128, 4), "10M": (256, 12), "30M": (512, 9), "100M": (768, 13)}


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(size: str, repeats: int) -> dict:
    import ray
    import torch

    from orchestrator.runtime import waits
    from orchestrator.core.spec import OptimSpec, RolloutSpec
    from orchestrator.runtime.placement import PASSIVE
    from orchestrator.entrypoints.tiny_model import init_model
    from orchestrator.runtime.weight_sync import share_memory
    from workers.rollout_vllm import VLLMRollout
    from workers.trainer import PolicyTrainer

    hidden, layers = SHAPES[size]
    with tempfile.TemporaryDirectory() as tmp:
        init_model(tmp, hidden_size=hidden, layers=layers, seed=0)
        optim = OptimSpec(lr=1e-3, weight_decay=0.0)
        env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", **PASSIVE}}  # (as these numbers were first measured)
        trainer = ray.remote(PolicyTrainer).options(num_cpus=0, runtime_env=env).remote(tmp, optim, RolloutSpec())
        rollout = ray.remote(VLLMRollout).options(num_cpus=0, runtime_env=env).remote(tmp, n=1, max_new_tokens=4)
        state = ray.get(trainer.state_dict.remote())
        unique = {t.data_ptr(): t for t in state.values()}
        nbytes = sum(t.numel() * t.element_size() for t in unique.values())
        params = sum(t.numel() for t in unique.values())
        dst = {k: torch.empty_like(v) for k, v in unique.items()}

        def copy():
            for k, v in unique.items():
                dst[k].copy_(v)

        def via_object_store():
            ray.get(rollout.load_weights.remote(trainer.weights_for_sync.remote()))

        def via_shared_memory():
            return ray.get(trainer.write_shared_weights.remote())

        def same_weights() -> bool:
            synced = ray.get(rollout.state_dict.remote())
            return all(torch.equal(synced[k], v) for k, v in state.items())

        copy(), via_object_store()  # first touch of every page
        object_store_s = best(via_object_store, repeats)
        assert same_weights(), "object store sync: engine weights differ from the trainer's"
        failed = share_memory(trainer, [rollout], f"bench-{size}", lambda refs, phase: waits.wait(refs, phase, None))
        if failed:
            raise SystemExit(f"shared memory sync is not possible here: {failed}")
        via_shared_memory()
        # Interleaved with the copy, so both see the same load on a shared machine.
        copy_s = shm_s = in_step_s = float("inf")
        for _ in range(repeats):
            copy_s = min(copy_s, best(copy, 1))
            start = time.perf_counter()
            in_step_s = min(in_step_s, via_shared_memory())
            shm_s = min(shm_s, time.perf_counter() - start)
        assert same_weights(), "shared memory sync: engine weights differ from the trainer's"
        for actor in (trainer, rollout):
            ray.kill(actor)
    return dict(size=size, params=params, bytes=nbytes, copy_s=copy_s, shared_memory_in_step_s=in_step_s, shared_memory_call_s=shm_s,
                object_store_s=object_store_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["1M", "10M", "100M"], choices=list(SHAPES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    import ray

    ray.init(include_dashboard=False, log_to_driver=False, _temp_dir=tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    rows = []
    paths = [("shared_memory_in_step_s", "shm in step"), ("shared_memory_call_s", "shm call"), ("object_store_s", "object store")]
    print(f"{'model':>6} {'params':>11} {'MB':>7} {'copy s':>8} {'GB/s':>5}" + "".join(f" | {label + ' s':>15} {'GB/s':>5} {'/copy':>5}" for _, label in paths))
    for size in args.sizes:
        r = measure(size, args.repeats)
        rows.append(r)
        gb = lambda key: r["bytes"] / r[key] / 1e9  # noqa: E731
        print(f"{size:>6} {r['params']:>11,} {r['bytes'] / 1e6:>7.1f} {r['copy_s']:>8.4f} {gb('copy_s'):>5.2f}"
              + "".join(f" | {r[key]:>15.4f} {gb(key):>5.2f} {r['copy_s'] / r[key]:>5.0%}" for key, _ in paths), flush=True)
    ray.shutdown()
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
