"""The SFT stage's driver: the policy trainer alone takes the steps (its data lives in
orchestrator/core/data.py: `load_sft`, `sft_batch`)."""

from __future__ import annotations

import time

from orchestrator.core.data import sft_batch
from orchestrator.stages.driver import Orchestrator


class SFTOrchestrator(Orchestrator):
    """The SFT stage: the policy trainer alone takes the steps; to evaluate (greedy generation scored
    by the job's rewards), the trainer generates too (`resources.rollout_in`) or rollout actors
    start, and a reward actor for a reward model."""

    syncs_every_step = False

    def train_step(self, step: int) -> dict[str, float]:
        start = time.perf_counter()
        batch = sft_batch(self.dataset, self.sampler.indices(step - 1), self.pad_token_id)
        results = self.wait(self.groups["trainer"].call_sharded("sft_step", batch, step, self.spec.optim.micro_batch_size), "update")
        compute = max(r.pop("timing/update_compute") for r in results)
        stats = results[0]  # every replica holds the all-reduced values
        elapsed = time.perf_counter() - start
        lengths = batch.response_mask.sum(1)
        return {**stats, "lr": self.spec.optim.lr, "response_length/mean": lengths.mean().item(),
                "timing/update_compute": compute, "timing/step": elapsed,
                "throughput/tokens_per_s": float(batch.attention_mask.sum()) / elapsed}

    def sync_weights(self, timing: dict | None = None) -> None:
        if "rollout" in self.groups:  # only present when the stage evaluates
            super().sync_weights(timing)
