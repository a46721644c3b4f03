"""The `dpo` stage's driver: the reference's log-probs of each batch of pairs (computed once, on the
Reference actors), then one DPO step on the policy trainer (workers/dpo.py)."""

from __future__ import annotations

import time

import torch

from orchestrator.core.batch import Batch
from orchestrator.core.data import PreferenceDataset
from orchestrator.stages.preference import PreferenceOrchestrator


class DPOOrchestrator(PreferenceOrchestrator):
    step_method, eval_method = "dpo_step", "dpo_eval"

    def trainer_args(self) -> tuple:
        return (self.spec.algorithm,)  # loss_type, beta, label_smoothing

    def pairs(self, dataset: PreferenceDataset, index: list[int], timing: dict) -> Batch:
        batch = super().pairs(dataset, index, timing)
        t0 = time.perf_counter()
        results = self.wait(self.reference_group.call_sharded("compute_logprobs", batch), "reference")
        timing["reference_compute"] = max(t for _, t in results)
        timing["reference"] = time.perf_counter() - t0
        return batch.replace(ref_logprobs=torch.cat([lp for lp, _ in results]))
