"""Direct preference optimisation on the policy trainer: the same actor, model, optimiser and
checkpoints as RL, with the DPO family's losses (orchestrator/core/algos.py `dpo_loss`) on pairs whose
reference log-probs the driver attaches (the Reference actor's, once per batch)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from orchestrator.core import algos
from orchestrator.core.batch import Batch
from workers.common import response_logprobs
from workers.trainer import PolicyTrainer

if TYPE_CHECKING:
    from orchestrator.core.spec import AlgorithmSpec


class DPOTrainer(PolicyTrainer):
    """A PolicyTrainer that takes DPO steps on pairs (rows 2i chosen, 2i + 1 rejected, `ref_logprobs` set)."""

    def dpo_step(self, batch: Batch, step: int, micro_batch_size: int | None, algorithm: AlgorithmSpec) -> dict[str, float]:
        """One optimiser step on this replica's shard of pairs; `micro_batch_size` counts pairs."""
        start = time.perf_counter()
        loss_fn = lambda mb, num_tokens, num_seqs: self._loss(mb, num_seqs, algorithm)  # noqa: E731
        stats = self.optimizer_step(batch.to(self.device), 2 * micro_batch_size if micro_batch_size else None, loss_fn)
        return {**stats, "timing/update_compute": time.perf_counter() - start}

    def dpo_eval(self, batch: Batch, micro_batch_size: int | None, algorithm: AlgorithmSpec) -> dict[str, float]:
        """The same metrics on held-out pairs, without a step."""
        loss_fn = lambda mb, num_tokens, num_seqs: self._loss(mb, num_seqs, algorithm)  # noqa: E731
        return self.eval_stats(batch, 2 * micro_batch_size if micro_batch_size else None, loss_fn)

    def _loss(self, mb: Batch, num_seqs: float, algorithm: AlgorithmSpec) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean loss over the whole mini-batch's pairs (num_seqs / 2) and TRL's DPOTrainer metrics."""
        # Summed log-probs for every loss and metric, as TRL; IPO averages its margin over the lengths itself.
        logps = algos.sequence_logprobs(response_logprobs(self.model, mb)[0], mb.response_mask)
        ref = algos.sequence_logprobs(mb.ref_logprobs, mb.response_mask)
        lengths = mb.response_mask.sum(1)
        losses, chosen, rejected = algos.dpo_loss(logps[0::2], logps[1::2], ref[0::2], ref[1::2], algorithm.beta,
                                                  algorithm.loss_type, algorithm.label_smoothing, (lengths[0::2], lengths[1::2]))
        pairs = max(num_seqs / 2, 1.0)
        loss = losses.sum() / pairs
        mean = lambda x: x.detach().sum().item() / pairs  # noqa: E731
        return loss, {"loss": loss.item(), "rewards/chosen": mean(chosen), "rewards/rejected": mean(rejected),
                      "rewards/accuracies": mean((chosen > rejected).float()), "rewards/margins": mean(chosen - rejected),
                      "logps/chosen": mean(logps[0::2]), "logps/rejected": mean(logps[1::2])}
