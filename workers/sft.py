"""Supervised fine-tuning on the policy trainer: the same actor, model and optimiser as RL, with
the negative log-likelihood of the completion tokens as the loss."""

from __future__ import annotations

import time

import torch

from orchestrator.core import algos
from orchestrator.core.batch import Batch
from workers.common import response_logits
from workers.trainer import PolicyTrainer


class SFTTrainer(PolicyTrainer):
    """A PolicyTrainer that also takes SFT steps; checkpoints, weight sync and data parallelism are shared."""

    def sft_step(self, batch: Batch, step: int, micro_batch_size: int | None) -> dict[str, float]:
        """One optimiser step on this replica's shard: token-mean NLL over `response_mask`, which is 1
        on completion (assistant) tokens only, so prompts carry no loss."""
        start = time.perf_counter()
        stats = self.optimizer_step(batch.to(self.device), micro_batch_size, self._nll)
        return {"loss": stats["loss"], "mean_token_accuracy": stats["mean_token_accuracy"], "grad_norm": stats["grad_norm"],
                "timing/update_compute": time.perf_counter() - start}

    def _nll(self, mb: Batch, num_tokens: float, num_seqs: float) -> tuple[torch.Tensor, dict[str, float]]:
        logits = response_logits(self.model, mb)
        nll = -algos.logprobs_from_logits(logits, mb.responses)
        loss = algos.masked_sum(nll, mb.response_mask) / max(num_tokens, 1.0)
        with torch.no_grad():
            correct = algos.masked_sum((logits.argmax(-1) == mb.responses).float(), mb.response_mask)
        return loss, {"loss": loss.item(), "mean_token_accuracy": (correct / max(num_tokens, 1.0)).item()}
