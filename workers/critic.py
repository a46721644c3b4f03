"""The PPO critic: a value model (the policy's backbone with a one-output token head) and its optimiser."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from orchestrator import algos
from orchestrator.batch import Batch
from workers.common import configure_threads, load_model, pick_device, position_ids
from workers.trainer import DataParallelMixin


class Critic(DataParallelMixin):
    def __init__(self, model_path: str, optim: dict[str, Any], dtype: str = "float32", trust_remote_code: bool = False,
                 seed: int = 0, num_gpus: float = 0, threads: int | None = None):
        configure_threads(threads)
        torch.manual_seed(seed + 1)
        self.device = pick_device(num_gpus)
        # A causal LM checkpoint loads into *ForTokenClassification with a fresh 1-output head.
        self.model = load_model(model_path, "AutoModelForTokenClassification", dtype, trust_remote_code, self.device, num_labels=1)
        self.cfg = optim
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=optim["critic_lr"], weight_decay=optim["weight_decay"], foreach=True)

    def _values(self, batch: Batch) -> torch.Tensor:
        out = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids(batch.attention_mask))
        # V(s_t) for response token t is read at the position before it, like the log-probs.
        return out.logits[:, batch.prompt_len - 1 : -1, 0].float() * batch.response_mask

    @torch.no_grad()
    def compute_values(self, batch: Batch) -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        self.model.eval()
        values = self._values(batch.to(self.device)).cpu()
        return values, time.perf_counter() - start

    def train_step(self, batch: Batch, step: int, num_mini_batches: int, micro_batch_size: int | None) -> dict[str, float]:
        start = time.perf_counter()
        self.model.train()
        batch = batch.to(self.device)
        losses, clipfracs = [], []
        g = torch.Generator().manual_seed(int(self.cfg["seed"]) * 1_000_003 + step + 7)
        for _ in range(self.cfg["ppo_epochs"]):
            order = torch.randperm(len(batch), generator=g) if num_mini_batches > 1 else torch.arange(len(batch))
            for mb_index in order.chunk(num_mini_batches):
                loss, clipfrac = self._optimizer_step(batch.select(mb_index), micro_batch_size)
                losses.append(loss)
                clipfracs.append(clipfrac)
        return {"value_loss": sum(losses) / len(losses), "value_clip_ratio": sum(clipfracs) / len(clipfracs),
                "timing/critic_update_compute": time.perf_counter() - start}

    def _optimizer_step(self, mb: Batch, micro_batch_size: int | None) -> tuple[float, float]:
        num_tokens = self._global_count(float(mb.response_mask.sum()))
        size = micro_batch_size or len(mb)
        self.optimizer.zero_grad(set_to_none=True)
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        for i in range(0, len(mb), size):
            micro = mb.select(slice(i, i + size))
            loss, clipped = algos.value_loss(self._values(micro), micro.values, micro.returns, micro.response_mask, self.cfg["value_clip"])
            loss = algos.aggregate_loss(loss, micro.response_mask, "token-mean", num_tokens=num_tokens)
            loss.backward()
            totals += torch.tensor([loss.item(), clipped.sum().item() / max(num_tokens, 1)], dtype=torch.float64, device=self.device)
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        self._all_reduce_sum(grads + [totals])
        if self.cfg["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg["grad_clip"])
        self.optimizer.step()
        return float(totals[0]), float(totals[1])

    def save(self, path: str) -> None:
        if self.rank == 0:
            out = Path(path)
            out.mkdir(parents=True, exist_ok=True)
            torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}, out / "critic.pt")

    def load(self, path: str) -> None:
        state = torch.load(Path(path) / "critic.pt", weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
