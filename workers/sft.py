"""Supervised fine-tuning on the policy trainer: the same actor, model and optimiser as RL, with
the negative log-likelihood of the completion tokens as the loss."""

from __future__ import annotations

import time

import torch

from orchestrator import algos
from orchestrator.batch import Batch
from workers.common import response_logits
from workers.trainer import PolicyTrainer


class SFTTrainer(PolicyTrainer):
    """A PolicyTrainer that also takes SFT steps; checkpoints, weight sync and data parallelism are shared."""

    def sft_step(self, batch: Batch, step: int, micro_batch_size: int | None) -> dict[str, float]:
        """One optimiser step on this replica's shard: token-mean NLL over `response_mask`, which is 1
        on completion (assistant) tokens only, so prompts carry no loss."""
        start = time.perf_counter()
        batch = batch.to(self.device)
        num_tokens = self._global_count(float(batch.response_mask.sum()))
        size = micro_batch_size or len(batch)
        self.optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # (loss, correct tokens), summed
        for i in range(0, len(batch), size):
            mb = batch.select(slice(i, i + size))
            logits = response_logits(self.model, mb)
            nll = -algos.logprobs_from_logits(logits, mb.responses)
            loss = algos.masked_sum(nll, mb.response_mask) / max(num_tokens, 1.0)
            loss.backward()
            correct = algos.masked_sum((logits.argmax(-1) == mb.responses).float(), mb.response_mask)
            sums += torch.stack([loss.detach(), correct.detach() / max(num_tokens, 1.0)]).double()
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        self._all_reduce_sum(grads + [sums])
        grad_norm = self._clip(grads)
        self.optimizer.step()
        loss, accuracy = sums.tolist()
        return {"loss": loss, "mean_token_accuracy": accuracy, "grad_norm": grad_norm,
                "timing/update_compute": time.perf_counter() - start}
