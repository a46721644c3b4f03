"""What every trained role shares: data parallelism across its replicas (torch.distributed: gloo on
CPU, NCCL on GPU), the PPO-style mini-batch schedule, and one optimiser step accumulated over
micro-batches."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from orchestrator.core import storage
from orchestrator.core.batch import Batch, micro_batches
from orchestrator.core.seeds import step_seed

# (micro-batch, tokens in the whole mini-batch, sequences in the whole mini-batch) -> (loss, stats)
LossFn = Callable[[Batch, float, float], tuple[torch.Tensor, dict[str, float]]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mini_batches(batch: Batch, num_mini_batches: int, epochs: int, seed: int, step: int, offset: int = 0) -> Iterator[Batch]:
    """The step's samples as `epochs` passes of `num_mini_batches` optimiser steps, shuffled
    (seeded by (seed, step)) when there is more than one."""
    g = torch.Generator().manual_seed(step_seed(seed, step, offset))
    for _ in range(epochs):
        order = torch.randperm(len(batch), generator=g) if num_mini_batches > 1 else torch.arange(len(batch))
        for index in order.chunk(num_mini_batches):
            yield batch.select(index)


class Sharded:
    """Replicas of one role that may shard its model (FSDP2, `resources.<role>.strategy: fsdp`):
    the process group, the sharding, and the collectives every rank must take part in. `self.model`
    and `self.device` are set by the subclass; a trained role (`DataParallel`) also sets `self.optimizer`."""

    rank, world_size = 0, 1
    model: torch.nn.Module
    device: torch.device
    sharded = False  # FSDP2: parameters (and, trained, gradients and optimizer state) split across the replicas

    def address(self) -> tuple[str, int]:
        """Where rank 0 listens; call on rank 0 before `init_distributed` on every rank."""
        host = "127.0.0.1"
        try:  # under Ray, the node's address; alone, loopback
            import ray

            if ray.is_initialized():
                host = ray.util.get_node_ip_address()
        except ImportError:
            pass
        return host, free_port()

    def init_distributed(self, master: tuple[str, int], rank: int, world_size: int, strategy: str = "ddp") -> None:
        self.rank, self.world_size = rank, world_size
        if world_size == 1:
            self.model.to(self.device)  # (a lone rank 0 of an fsdp role loaded on the CPU: nothing to shard)
            return
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://{master[0]}:{master[1]}", rank=rank, world_size=world_size)
        if strategy == "fsdp":
            self._shard()

    def _shard(self) -> None:
        """FSDP2: each decoder layer (the model's `_no_split_modules`), then the rest, sharded across
        the replicas, and filled from rank 0's weights: the other ranks may have built the model on
        the meta device (`load_model(shard_rank=r)`), so no rank but 0 ever holds the whole model. A
        trained role's optimizer is made again over the sharded parameters. On a GPU, rank 0's model
        was loaded on the CPU: `fully_shard` moves each layer to the device as it shards it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        from torch.distributed.fsdp import FSDPModule, fully_shard

        # Rank 0: the loaded tensors (no copy), which stay where they are when sharding moves the parameters.
        full = {k: v.detach() for k, v in self.model.state_dict().items()} if self.rank == 0 else {}
        blocks = set(getattr(self.model, "_no_split_modules", None) or [])
        for module in self.model.modules():
            if type(module).__name__ in blocks:
                fully_shard(module)
        fully_shard(self.model)
        if any(p.is_meta for p in self.model.parameters()) or any(b.is_meta for b in self.model.buffers()):
            self.model.to_empty(device=self.device)
        # Rank 0 sends each tensor whole, one at a time; every rank keeps its shard.
        set_model_state_dict(self.model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        del full
        for buffer in self.model.buffers():  # not sharded, and some (rotary frequencies) not in the state dict
            dist.broadcast(buffer, 0)
        # Losses are normalised by the whole mini-batch's counts: gradients are summed across replicas
        # (as DDP's all-reduce does here), not averaged. A plain sum is also what gloo can reduce.
        # Each sharded module (every layer, and the root) reduces its own parameters' gradients.
        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                module.set_force_sum_reduction_for_comms(True)
                module.set_gradient_divide_factor(1.0)
        optimizer = getattr(self, "optimizer", None)
        if optimizer is not None:
            defaults = {k: v for k, v in optimizer.defaults.items() if k in ("lr", "betas", "eps", "weight_decay", "foreach")}
            self.optimizer = type(optimizer)([p for p in self.model.parameters() if p.requires_grad], **defaults)
        self.sharded = True

    def iter_full_tensors(self):
        """Sharded: the model's tensors one at a time, each gathered whole on every rank (every rank
        must iterate to the end): never a whole extra copy of the model."""
        for name, tensor in self.model.state_dict().items():
            yield name, (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach()

    def rounds(self, count: int) -> int:
        """How many forwards (and backwards) this rank runs for its `count` micro-batches: sharded,
        each is a collective, so every rank runs as many as the rank with the most (token budgets cut
        shards of unlike lengths differently); the extra ones are thrown away."""
        return int(self._global_max(count)) if self.sharded else count

    def _all_reduce_sum(self, tensors: list[torch.Tensor]) -> None:
        if self.world_size > 1:
            for t in tensors:
                dist.all_reduce(t, op=dist.ReduceOp.SUM)

    def _global_max(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def _global_count(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        self._all_reduce_sum([t])
        return float(t.item())


class DataParallel(Sharded):
    """A trained role: `self.model`, `self.optimizer`, `self.device` and `self.grad_clip` are set
    by the subclass; replicas join one process group and sum gradients across it (or shard, fsdp)."""

    optimizer: torch.optim.Optimizer
    grad_clip: float | None = None

    mixed_precision = "no"
    _full: dict[str, torch.Tensor] | None = None  # sharded, rank 0: the full weights after the last update (CPU)

    def configure_training(self, gradient_checkpointing: bool, mixed_precision: str) -> None:
        """Activation checkpointing and bf16 autocast (the weights stay as loaded: fp32 master weights)."""
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.mixed_precision = mixed_precision

    def autocast(self):
        """The forward's precision: bf16 autocast with `mixed_precision: bf16`, else as loaded."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.mixed_precision == "bf16")

    def gather_full_weights(self) -> None:
        """Sharded: rank 0 keeps the full weights on the CPU, for a sync path that reads them from
        rank 0 alone (object store, NCCL) and for the first sync after a load."""
        full = {}
        for name, whole in self.iter_full_tensors():
            if self.rank == 0:
                full[name] = whole.to("cpu", copy=True)
        self._full = full if self.rank == 0 else None

    def publish_sharded(self, publish: bool) -> dict[str, float]:
        """After a sharded update, on every rank: stream the gathered tensors into the rollouts'
        shared file (rank 0 writes, shared-memory sync) or keep them on rank 0 (other paths)."""
        start = time.perf_counter()
        if not publish:
            self.gather_full_weights()
            return {}
        items = self.iter_full_tensors()
        shared = getattr(self, "_shared", None)
        if shared is not None:
            shared.write_items(items)
        else:
            for _ in items:
                pass
        return {"timing/weight_sync": time.perf_counter() - start}

    def optimizer_step(self, mb: Batch, micro_batch_size: int | None, loss_fn: LossFn, micro_batch_tokens: int | None = None) -> dict[str, float]:
        """One optimiser step on this replica's share of a mini-batch, accumulated over micro-batches.

        Losses are normalised by the whole mini-batch's token and sequence counts (across micro-batches
        and replicas), so the summed gradients equal the gradient of the full mini-batch's loss. Each
        micro-batch's stat is its share of the mini-batch value: summed over micro-batches and replicas,
        the returned stats are the mini-batch's values; `grad_norm` is the norm before clipping.
        With `micro_batch_tokens`, micro-batches hold rows of like length up to that many padded
        tokens (core/batch.py `micro_batches`) instead of `micro_batch_size` rows.
        """
        num_tokens = self._global_count(float(mb.response_mask.sum()))
        num_seqs = self._global_count(float(len(mb)))
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        parts = micro_batches(mb, micro_batch_size, micro_batch_tokens)
        for i in range(self.rounds(len(parts))):  # (sharded, the extra ones add nothing: loss times 0)
            with self.autocast():
                loss, stats = loss_fn(parts[i % len(parts)], num_tokens, num_seqs)
            if i >= len(parts):
                (loss * 0.0).backward()
                continue
            loss.backward()
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        totals = torch.tensor(list(sums.values()), dtype=torch.float64, device=self.device)
        self._all_reduce_sum(([] if self.sharded else grads) + [totals])  # FSDP has reduce-scattered the gradients
        grad_norm = self._clip(grads)
        self.optimizer.step()
        return {**dict(zip(sums, totals.tolist())), "grad_norm": grad_norm}

    @torch.no_grad()
    def eval_stats(self, batch: Batch, micro_batch_size: int | None, loss_fn: LossFn) -> dict[str, float]:
        """`loss_fn`'s stats over `batch` (this replica's, in eval mode, no gradients), normalised by the
        batch's own counts: no collective, so any one replica can evaluate any batch."""
        batch = batch.to(self.device)
        num_tokens, num_seqs = float(batch.response_mask.sum()), float(len(batch))
        size = micro_batch_size or len(batch)
        self.model.eval()
        sums: dict[str, float] = {}
        try:
            for i in range(0, len(batch), size):
                _, stats = loss_fn(batch.select(slice(i, i + size)), num_tokens, num_seqs)
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v
        finally:
            self.model.train()
        return sums

    def save_pretrained(self, path: str, name: str) -> None:
        """Rank 0 writes `<path>/<name>/` (the model, HF layout, loadable by any role) and `<path>/<name>_optim.pt`.
        Sharded, every rank also writes its shards of the model and optimizer to `<path>/<name>_dcp/`."""
        if self.sharded:
            self._save_sharded(path, name)
            return
        if self.rank != 0:
            return
        with storage.local_dir_for(path) as local:  # a URL: written here, then uploaded
            out = Path(local)
            self.model.save_pretrained(out / name)
            torch.save({"optimizer": self.optimizer.state_dict(), "torch_rng": torch.get_rng_state()}, out / f"{name}_optim.pt")

    def _save_sharded(self, path: str, name: str, hf: bool = True) -> None:
        """Every rank writes its shards of the model and optimizer to `<path>/<name>_dcp/` and its RNG
        state; with `hf`, rank 0 also writes `<path>/<name>/` in HF layout, gathered tensor by tensor."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        if storage.is_url(path):
            raise ValueError("a sharded role (strategy fsdp) writes its shards to a shared filesystem: checkpoint.dir must be a local path")
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(Path(path) / f"{name}_dcp"))
        torch.save({"torch_rng": torch.get_rng_state()}, Path(path) / f"{name}_rng_{self.rank}.pt")
        if hf:
            self._save_hf_in_buckets(Path(path) / name)

    def _save_hf_in_buckets(self, out: Path, bucket_bytes: int = 256 << 20) -> None:
        """`out/` in HF layout from a sharded model: tensors gathered one at a time, written by rank 0
        in safetensors files of at most `bucket_bytes` with their index (as transformers shards)."""
        import json

        from safetensors.torch import save_file

        tied = bool(getattr(self.model.config, "tie_word_embeddings", False))
        bucket: dict[str, torch.Tensor] = {}
        weight_map: dict[str, str] = {}
        total = files = 0

        def flush():
            nonlocal bucket, files
            if bucket and self.rank == 0:
                files += 1
                save_file(bucket, out / f"model-{files:05d}.safetensors", metadata={"format": "pt"})
                weight_map.update({k: f"model-{files:05d}.safetensors" for k in bucket})
            bucket = {}

        if self.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            self.model.config.save_pretrained(out)
            if getattr(self.model, "generation_config", None) is not None:
                self.model.generation_config.save_pretrained(out)
        for key, whole in self.iter_full_tensors():
            if tied and key == "lm_head.weight":
                continue
            if self.rank == 0:
                bucket[key] = whole.to("cpu", copy=True).contiguous()
                total += whole.numel() * whole.element_size()
                if sum(t.numel() * t.element_size() for t in bucket.values()) >= bucket_bytes:
                    flush()
        flush()
        if self.rank == 0:
            (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))

    def _load_sharded(self, path: str, name: str) -> None:
        """The shards `_save_sharded` wrote, on any number of replicas, sharded or not (DCP reshards)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        if not storage.isdir(storage.join(path, f"{name}_dcp")):
            raise RuntimeError(f"checkpoint {path} was written by unsharded replicas (it has no {name}_dcp/): "
                               f"resume it with strategy ddp, not fsdp")
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=str(Path(path) / f"{name}_dcp"))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        rng = Path(path) / f"{name}_rng_{self.rank}.pt"
        if rng.exists():
            torch.set_rng_state(torch.load(rng, weights_only=False)["torch_rng"])

    def load_pretrained(self, path: str, name: str) -> None:
        """The model, optimiser and RNG state that `save_pretrained(path, name)` wrote."""
        from safetensors.torch import load_file

        src = Path(storage.local_copy(path))
        if self.sharded or ((src / f"{name}_dcp").exists() and not (src / f"{name}_optim.pt").exists()):
            self._load_sharded(path, name)  # (also a sharded job's checkpoint resumed on unsharded replicas: DCP reshards)
            return

        weights = {}
        for f in sorted((src / name).glob("*.safetensors")):
            weights.update(load_file(f))
        missing, unexpected = self.model.load_state_dict(weights, strict=False)
        # Tied embeddings are saved once; anything else missing is an error.
        if unexpected or [k for k in missing if "lm_head" not in k]:
            raise RuntimeError(f"checkpoint {src} does not match the model: missing {missing}, unexpected {unexpected}")
        state = torch.load(src / f"{name}_optim.pt", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])

    def _clip(self, grads: list[torch.Tensor]) -> float:
        if self.sharded:  # the norm over every rank's shards (a collective)
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip if self.grad_clip is not None else float("inf"))
            return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if self.grad_clip is None:
            return float(torch.norm(torch.stack([g.norm() for g in grads]))) if grads else 0.0
        return float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip))
