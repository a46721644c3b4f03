"""Reward-model training: a one-logit sequence classifier fitted to preference pairs by the
Bradley-Terry loss, data parallel like the policy trainer (workers/training.py).

Its checkpoint (`reward_model/`, with the tokenizer the driver adds) is what `rewards: [{model: ...}]`
loads: workers/reward.py `RewardModel` scores a completion by the same logit at its last token.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from orchestrator.core import algos
from orchestrator.core.batch import Batch
from workers.common import configure_threads, cpu_state_dict, load_model, load_tokenizer, pick_device, sequence_scores
from workers.training import DataParallel

if TYPE_CHECKING:
    from orchestrator.core.spec import OptimSpec


def pair_rewards(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen (p,), rejected (p,)) scores of a batch of pairs (rows 2i chosen, 2i + 1 rejected)."""
    scores = sequence_scores(model, batch.input_ids, batch.attention_mask)
    return scores[0::2], scores[1::2]


class RewardTrainer(DataParallel):
    """The policy's backbone (or `model.rm_path`'s) with a fresh one-logit head, trained on pairs."""

    def __init__(self, model_path: str, optim: OptimSpec, rollout: Any = None, dtype: str = "float32",
                 trust_remote_code: bool = False, num_gpus: float = 0, threads: int | None = None):
        configure_threads(threads)
        torch.manual_seed(optim.seed)
        self.optim, self.device = optim, pick_device(num_gpus)
        # A causal LM checkpoint loads into *ForSequenceClassification with a freshly initialised `score` head.
        self.model = load_model(model_path, "AutoModelForSequenceClassification", dtype, trust_remote_code, self.device, num_labels=1)
        if self.model.config.pad_token_id is None:  # it finds the last real token by the pad id, as RewardModel does
            self.model.config.pad_token_id = load_tokenizer(model_path, trust_remote_code).pad_token_id
        self.model.train()
        self.grad_clip = optim.grad_clip
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=optim.lr, weight_decay=optim.weight_decay, foreach=True)

    def rm_step(self, batch: Batch, step: int, micro_batch_size: int | None) -> dict[str, float]:
        """One optimiser step on this replica's shard of pairs; `micro_batch_size` counts pairs."""
        start = time.perf_counter()
        stats = self.optimizer_step(batch.to(self.device), 2 * micro_batch_size if micro_batch_size else None, self._loss)
        return {**stats, "timing/update_compute": time.perf_counter() - start}

    def rm_eval(self, batch: Batch, micro_batch_size: int | None) -> dict[str, float]:
        """The same metrics on held-out pairs, without a step."""
        return self.eval_stats(batch, 2 * micro_batch_size if micro_batch_size else None, self._loss)

    def _loss(self, mb: Batch, num_tokens: float, num_seqs: float) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean Bradley-Terry loss over the whole mini-batch's pairs (num_seqs / 2) and TRL's
        RewardTrainer metrics: accuracy (r_c > r_r), margin r_c - r_r, mean rewards."""
        chosen, rejected = pair_rewards(self.model, mb)
        margin = torch.tensor([float(e.get("margin", 0.0)) for e in mb.extras], device=chosen.device)
        pairs = max(num_seqs / 2, 1.0)
        loss = algos.bradley_terry_loss(chosen, rejected, margin).sum() / pairs
        with torch.no_grad():
            stats = {"loss": loss.item(), "accuracy": (chosen > rejected).float().sum().item() / pairs,
                     "margin": (chosen - rejected).sum().item() / pairs,
                     "rewards/chosen": chosen.sum().item() / pairs, "rewards/rejected": rejected.sum().item() / pairs}
        return loss, stats

    def state_dict(self) -> dict[str, torch.Tensor]:
        return cpu_state_dict(self.model)

    def save(self, path: str) -> None:
        """Rank 0 writes `reward_model/` (HF layout: a model `rewards: [{model: ...}]` loads) and its optimiser state."""
        self.save_pretrained(path, "reward_model")

    def load(self, path: str) -> None:
        self.load_pretrained(path, "reward_model")
