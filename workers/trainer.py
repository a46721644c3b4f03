"""Policy trainer: forward/backward, AdamW, grad clip and gradient accumulation, data parallel
across replicas with torch.distributed (gloo on CPU, NCCL on GPU)."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from orchestrator import algos
from orchestrator.batch import Batch
from workers.common import configure_threads, cpu_state_dict, load_model, pick_device, response_logprobs, to_transport
from workers.shared_weights import Region, SharedWeightWriter


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DataParallelMixin:
    """Joins a torch.distributed group and averages gradients across it."""

    rank, world_size = 0, 1

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

    def init_distributed(self, master: tuple[str, int], rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size
        if world_size == 1:
            return
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://{master[0]}:{master[1]}", rank=rank, world_size=world_size)

    def _all_reduce_sum(self, tensors: list[torch.Tensor]) -> None:
        if self.world_size > 1:
            for t in tensors:
                dist.all_reduce(t, op=dist.ReduceOp.SUM)

    def _global_count(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        self._all_reduce_sum([t])
        return float(t.item())


class PolicyTrainer(DataParallelMixin):
    _shared: SharedWeightWriter | None = None  # rank 0, with shared-memory weight sync

    def __init__(self, model_path: str, optim: dict[str, Any], dtype: str = "float32", trust_remote_code: bool = False,
                 temperature: float = 1.0, seed: int = 0, num_gpus: float = 0, threads: int | None = None,
                 importance_sampling: dict[str, Any] | None = None):
        configure_threads(threads)
        torch.manual_seed(seed)
        self.importance_sampling = importance_sampling or {"enabled": False}
        self.device = pick_device(num_gpus)
        self.model = load_model(model_path, "AutoModelForCausalLM", dtype, trust_remote_code, self.device)
        self.model.train()
        self.cfg = optim
        self.temperature = temperature
        # foreach: one fused update over all tensors instead of a Python loop (13% of a tiny model's step).
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=optim["lr"], weight_decay=optim["weight_decay"], foreach=True)

    # ------------------------------------------------------------ one step
    def train_step(self, batch: Batch, step: int, num_mini_batches: int, micro_batch_size: int | None, on_policy: bool,
                   publish: bool = False) -> dict[str, float]:
        """PPO-style update over this replica's shard of the step's samples.

        The shard is cut into `num_mini_batches` optimiser steps, each accumulated over micro-batches,
        for `ppo_epochs` passes. With `on_policy` (one optimiser step) the old log-probs are the
        current ones detached, so the ratio is 1 and no old-log-prob pass is needed. With `publish`
        (shared-memory weight sync), rank 0 then writes the new weights where the rollouts read them.
        """
        start = time.perf_counter()
        batch = batch.to(self.device)
        stats: dict[str, list[float]] = {}
        g = torch.Generator().manual_seed(int(self.cfg["seed"]) * 1_000_003 + step)
        for _ in range(self.cfg["ppo_epochs"]):
            order = torch.randperm(len(batch), generator=g) if num_mini_batches > 1 else torch.arange(len(batch))
            for mb_index in order.chunk(num_mini_batches):
                self._optimizer_step(batch.select(mb_index), micro_batch_size, on_policy, stats)
        out = {k: sum(v) / len(v) for k, v in stats.items()}
        out["timing/update_compute"] = time.perf_counter() - start
        if publish and self._shared is not None:
            out["timing/weight_sync"] = self.write_shared_weights()
        return out

    def _optimizer_step(self, mb: Batch, micro_batch_size: int | None, on_policy: bool, stats: dict) -> None:
        # Normalise by the whole mini-batch (across micro-batches and replicas), so accumulated
        # gradients equal the gradient of the full mini-batch's loss.
        num_tokens = self._global_count(float(mb.response_mask.sum()))
        num_seqs = self._global_count(float(len(mb)))
        size = micro_batch_size or len(mb)
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for i in range(0, len(mb), size):
            loss, micro_stats = self._loss(mb.select(slice(i, i + size)), on_policy, num_tokens, num_seqs)
            loss.backward()
            for k, v in micro_stats.items():
                sums[k] = sums.get(k, 0.0) + v
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        # Each micro-batch's stat is its share of the mini-batch mean: summing over micro-batches
        # and replicas gives the mini-batch's value.
        totals = torch.tensor(list(sums.values()), dtype=torch.float64, device=self.device)
        self._all_reduce_sum(grads + [totals])
        grad_norm = self._clip(grads)
        self.optimizer.step()
        for k, v in zip(sums, totals.tolist()):
            stats.setdefault(k, []).append(v)
        stats.setdefault("grad_norm", []).append(grad_norm)

    def _loss(self, mb: Batch, on_policy: bool, num_tokens: float, num_seqs: float) -> tuple[torch.Tensor, dict[str, float]]:
        cfg, mask = self.cfg, mb.response_mask
        logprobs, entropy = response_logprobs(self.model, mb, self.temperature, with_entropy=True, entropy_grad=bool(cfg["entropy_coef"]))
        old_logprobs = logprobs.detach() if on_policy or mb.logprobs is None else mb.logprobs
        pg, clipped = algos.policy_loss(logprobs, old_logprobs, mb.advantages, mask, cfg["clip_eps_low"], cfg["clip_eps_high"], cfg["dual_clip"])
        is_stats = {}
        if self.importance_sampling["enabled"] and on_policy and mb.logprobs is not None:
            # Off-policy steps already take the rollout log-probs as old_logprobs; this corrects the on-policy ratio of 1.
            weights, sums = algos.truncated_importance_weights(old_logprobs, mb.logprobs, mask, self.importance_sampling["cap"])
            pg = pg * weights
            is_stats = {f"rollout_is/{k}": v.item() / max(num_tokens, 1) for k, v in sums.items()}
        agg = dict(mode=cfg["loss_agg"], num_tokens=num_tokens, num_seqs=num_seqs)
        loss = algos.aggregate_loss(pg, mask, **agg)
        stats = {"policy_loss": loss.item(), **is_stats}
        if cfg["kl_coef"] > 0 and cfg["kl_in"] == "loss":
            kl = algos.kl_estimate(logprobs, mb.ref_logprobs, cfg["kl_estimator"])
            kl_loss = algos.aggregate_loss(kl, mask, **agg)
            loss = loss + cfg["kl_coef"] * kl_loss
            stats["kl_loss"] = kl_loss.item()
        ent = algos.aggregate_loss(entropy, mask, **agg)
        if cfg["entropy_coef"]:
            loss = loss - cfg["entropy_coef"] * ent
        stats.update(entropy=ent.item(), clip_ratio=(clipped.sum() / max(num_tokens, 1)).item())
        if mb.logprobs is not None:
            stats["approx_kl_behaviour"] = (algos.masked_sum(0.5 * (logprobs.detach() - mb.logprobs) ** 2, mask) / max(num_tokens, 1)).item()
        return loss, stats

    def _clip(self, grads: list[torch.Tensor]) -> float:
        max_norm = self.cfg["grad_clip"]
        if max_norm is None:
            return float(torch.norm(torch.stack([g.norm() for g in grads]))) if grads else 0.0
        return float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))

    # ------------------------------------------------------------ weights and checkpoints
    def state_dict(self) -> dict[str, torch.Tensor]:
        return cpu_state_dict(self.model)

    def weights_for_sync(self) -> dict[str, Any]:
        """The weights in the object store's zero-copy form (see `to_transport`)."""
        return to_transport(self.model.state_dict())

    # ------------------------------------------------------------ weight sync, the trainer's end
    def attach_shared_weights(self, path: str, size: int, regions: dict[str, Region]) -> None:
        """Map the rollouts' shared weights file (CPU, same node), then unlink it: every process has it mapped."""
        try:
            self._shared = SharedWeightWriter(path, size, regions, self.model.state_dict())
        finally:
            if os.path.exists(path):
                os.unlink(path)

    def write_shared_weights(self) -> float:
        """One sync: copy the weights into the memory the rollouts compute from; returns the seconds spent."""
        return self._shared.write(self.model.state_dict())

    def init_weight_sender(self, host: str, port: int, world_size: int) -> None:
        """GPU, vLLM: open the NCCL group with every engine worker (this is rank 0)."""
        from workers.rollout_vllm import NcclWeightSender

        self._sender = NcclWeightSender(host, port, world_size, self.device)
        self._buckets = NcclWeightSender.plan(self.model)

    def weight_buckets(self) -> list:
        return self._buckets

    def send_weights_nccl(self) -> None:
        self._sender.send(self.model, self._buckets)

    def ipc_weights(self) -> tuple[dict[str, Any], list]:
        """GPU, colocated vLLM: the weights as one CUDA buffer shared by IPC, kept until `release_ipc_weights`."""
        from workers.rollout_vllm import cuda_ipc_payload

        handles, buckets, self._ipc_buffer = cuda_ipc_payload(self.model)
        return handles, buckets

    def release_ipc_weights(self) -> None:
        self._ipc_buffer = None

    def save(self, path: str) -> None:
        """Rank 0 writes the model (HF layout, loadable by any role) and the optimiser state."""
        if self.rank != 0:
            return
        out = Path(path)
        self.model.save_pretrained(out / "policy")
        torch.save({"optimizer": self.optimizer.state_dict(), "torch_rng": torch.get_rng_state()}, out / "policy_optim.pt")

    def load(self, path: str) -> None:
        src = Path(path)
        from safetensors.torch import load_file

        weights = {}
        for f in sorted((src / "policy").glob("*.safetensors")):
            weights.update(load_file(f))
        missing, unexpected = self.model.load_state_dict(weights, strict=False)
        # Tied embeddings are saved once; anything else missing is an error.
        if unexpected or [k for k in missing if "lm_head" not in k]:
            raise RuntimeError(f"checkpoint {src} does not match the model: missing {missing}, unexpected {unexpected}")
        state = torch.load(src / "policy_optim.pt", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
