"""Peak memory per trainer replica and step time: DDP vs FSDP2 vs LoRA (and with activation
checkpointing), 2 replicas of the real `PolicyTrainer` on gloo, one run.

    python benchmarks/memory.py [--hidden 1024] [--layers 8] [--steps 3] [--configs ddp,fsdp,lora,ddp+ckpt,fsdp+ckpt] [--no-record]

The model is the tiny tokenizer's Qwen2 made wide and deep enough (defaults: about 110M parameters).
Each configuration runs in 2 fresh processes (ranks 0 and 1, one torch thread each, joined by gloo),
which build the trainer, shard it (fsdp), take one warm-up step and `--steps` timed GRPO updates on
the same synthetic batch, then report their peak RSS (`ru_maxrss`) and its rise over the process's
RSS before the model was loaded, and that rise once the model is loaded (and sharded: rank 1 of
fsdp builds it empty and gets its shards from rank 0, as the driver starts it) (glibc's MALLOC_MMAP_THRESHOLD_ set to 64 KiB for all alike, so freed
tensors leave RSS). The rollouts' side of weight sync is not in it: a sharded trainer
gathers its tensors one at a time after each update, as on the shared-memory path, and drops them.
The table goes to docs/benchmarks.md (section `memory`, benchmarks/record.py) unless --no-record.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.record import markdown_table, record

CONFIGS = {
    "ddp": dict(strategy="ddp"),
    "fsdp": dict(strategy="fsdp"),
    "lora": dict(strategy="ddp", lora=True),
    "ddp+ckpt": dict(strategy="ddp", checkpointing=True),
    "fsdp+ckpt": dict(strategy="fsdp", checkpointing=True),
}


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--samples", type=int, default=8, help="Samples per update (4 per replica).")
    parser.add_argument("--response", type=int, default=96, help="Response tokens per sample.")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--no-record", action="store_true", help="print only; leave docs/benchmarks.md as it is")
    args = parser.parse_args(argv)
    import torch.multiprocessing as mp

    # Freed tensors go back to the OS at once (glibc otherwise keeps large freed blocks in its heap,
    # and RSS would show the high-water mark of the heap rather than of the tensors): for every config alike.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")

    from orchestrator.entrypoints.tiny_model import init_model
    from workers.training import free_port

    with tempfile.TemporaryDirectory(prefix="rlhf-memory-") as tmp:
        model_dir = str(init_model(Path(tmp) / "model", hidden_size=args.hidden, layers=args.layers))
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(model_dir)
        params = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_config(cfg).parameters())
        setup = (f"model: Qwen2, hidden {args.hidden}, {args.layers} layers, {params / 1e6:.0f}M parameters (fp32); 2 replicas, gloo, "
                 f"{args.samples} samples x ({16} prompt + {args.response} response) tokens per update, {args.steps} timed updates")
        print(setup)
        rows = []
        for name in args.configs.split(","):
            out = Path(tmp) / f"{name}.json"
            ctx = mp.get_context("spawn")
            port = free_port()
            procs = [ctx.Process(target=run_replica, args=(r, 2, port, model_dir, CONFIGS[name], args, str(out) + f".{r}")) for r in range(2)]
            for p in procs:
                p.start()
            for p in procs:
                p.join(1800)
            results = [__import__("json").loads(Path(str(out) + f".{r}").read_text()) for r in range(2)]
            rows.append((name, results))
        print(f"\n{'config':<10} {'peak RSS rank0 MiB':>19} {'rank1':>7} {'rise over base MiB':>19} {'vs ddp':>7} "
              f"{'load rise rank0':>16} {'rank1':>6} {'step s':>7} {'trained params':>15}")
        base = None
        table = []
        for name, results in rows:
            rise = max(r["peak_mib"] - r["base_mib"] for r in results)
            base = rise if name == "ddp" else base
            ratio = f"{rise / base:.2f}x" if base else "-"
            load = [r["load_mib"] - r["base_mib"] for r in results]
            print(f"{name:<10} {results[0]['peak_mib']:>19.0f} {results[1]['peak_mib']:>7.0f} {rise:>19.0f} {ratio:>7} "
                  f"{load[0]:>16.0f} {load[1]:>6.0f} {statistics.median(results[0]['step_s']):>7.2f} {results[0]['trained'] / 1e6:>14.2f}M")
            table.append([name, f"{results[0]['peak_mib']:.0f} / {results[1]['peak_mib']:.0f}", f"{rise:.0f}", ratio,
                          f"{load[0]:.0f} / {load[1]:.0f}", f"{statistics.median(results[0]['step_s']):.2f}",
                          f"{results[0]['trained'] / 1e6:.1f}M"])
    if not args.no_record:
        headers = ["config", "peak RSS rank 0 / rank 1 (MiB)", "rise over base (MiB)", "vs ddp",
                   "load rise rank 0 / rank 1 (MiB)", "step (s)", "trained parameters"]
        record("memory", setup + ".\n\n" + markdown_table(headers, table), title="Memory per trainer replica")
    return 0


def run_replica(rank: int, world: int, port: int, model_dir: str, config: dict, args, out: str) -> None:
    import json

    import torch

    from orchestrator.core.batch import build_batch
    from orchestrator.core.spec import LoraSpec, OptimSpec, RolloutSpec
    from workers.trainer import PolicyTrainer

    torch.set_num_threads(1)
    base = rss_mib()
    optim = OptimSpec(lr=1e-5, prompts_per_step=args.samples, gradient_checkpointing=config.get("checkpointing", False), seed=0)
    rollout = RolloutSpec(n=1, max_new_tokens=args.response)
    lora = LoraSpec(rank=16, alpha=32) if config.get("lora") else None
    # As the driver does: a sharded rank > 0 builds the model empty and gets its shards from rank 0.
    trainer = PolicyTrainer(model_dir, optim, rollout, threads=1, lora=lora, shard_rank=rank if config["strategy"] == "fsdp" else None)
    trainer.init_distributed(("127.0.0.1", port), rank, world, config["strategy"])
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the high-water mark of loading (and sharding)
    g = torch.Generator().manual_seed(rank)
    per_rank = args.samples // world
    prompts = [torch.randint(3, 250, (16,), generator=g).tolist() for _ in range(per_rank)]
    responses = torch.randint(3, 250, (per_rank, args.response), generator=g)
    batch = build_batch(prompts, responses, torch.ones_like(responses), pad_id=259)
    batch = batch.replace(advantages=torch.randn(per_rank, args.response, generator=g))
    times = []
    for step in range(args.steps + 1):
        start = time.perf_counter()
        trainer.train_step(batch, step + 1, 1, None, True, publish=True)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    trained = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)  # (a DTensor counts its global size)
    Path(out).write_text(json.dumps({"peak_mib": peak, "base_mib": base, "load_mib": loaded, "step_s": times[1:], "trained": trained}))


if __name__ == "__main__":
    sys.exit(main())
