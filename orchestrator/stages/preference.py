"""What the stages that learn from preference pairs (`rm`, `dpo`) share: each step is one batch of
pairs from the dataset (orchestrator/core/data.py `preference_batch`) and one trainer call; held-out
evaluation is the same loss and metrics on `data.eval_file`'s pairs, reported under `eval/`."""

from __future__ import annotations

import time

from orchestrator.core.batch import Batch
from orchestrator.core.data import PreferenceDataset, preference_batch
from orchestrator.stages.driver import Orchestrator


class PreferenceOrchestrator(Orchestrator):
    """A stage on preference pairs: no rollouts, so no weights to sync. Subclasses name the trainer's
    methods and may attach what the trainer needs to each batch (`pairs`)."""

    syncs_every_step = False
    with_eos = True  # whether completions end with EOS (a policy learns to stop; a reward model scores text)
    step_method = eval_method = ""  # the trainer's (batch, step, micro_batch_size, *trainer_args) and (batch, micro_batch_size, *trainer_args)

    def trainer_args(self) -> tuple:
        return ()

    def pairs(self, dataset: PreferenceDataset, index: list[int], timing: dict) -> Batch:
        """Pairs `index` as one batch (rows 2i chosen, 2i + 1 rejected)."""
        return preference_batch(dataset, index, self.with_eos)

    def train_step(self, step: int) -> dict[str, float]:
        start, timing = time.perf_counter(), {}
        batch = self.pairs(self.dataset, self.sampler.indices(step - 1), timing)
        t0 = time.perf_counter()
        micro = self.spec.optim.micro_batch_size
        results = self.wait(self.groups["trainer"].call_sharded(self.step_method, batch, step, micro, *self.trainer_args()), "update")
        timing["update_compute"] = max(r.pop("timing/update_compute") for r in results)
        timing["update"] = time.perf_counter() - t0
        stats = results[0]  # every replica holds the all-reduced values
        timing["step"] = time.perf_counter() - start
        return {**stats, "lr": self.spec.optim.lr, "response_length/mean": batch.response_mask.sum(1).mean().item(),
                **{f"timing/{k}": v for k, v in timing.items()},
                "throughput/tokens_per_s": float(batch.attention_mask.sum()) / timing["step"]}

    def evaluate(self, dataset: PreferenceDataset) -> dict[str, float]:
        """The trainer's metrics on every held-out pair (`eval/accuracy` for a reward model,
        `eval/rewards/accuracies` for DPO), in batches of `optim.prompts_per_step` pairs on rank 0."""
        start = time.perf_counter()
        size, micro = self.spec.optim.prompts_per_step, self.spec.optim.micro_batch_size
        trainer = self.groups["trainer"].actors[0]
        totals: dict[str, float] = {}
        for lo in range(0, len(dataset), size):
            index = list(range(lo, min(lo + size, len(dataset))))
            stats = self.wait(getattr(trainer, self.eval_method).remote(self.pairs(dataset, index, {}), micro, *self.trainer_args()), "eval")
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v * len(index)
        out = {f"eval/{k}": v / len(dataset) for k, v in totals.items()}
        out["timing/eval"] = time.perf_counter() - start
        return out

    def sync_weights(self, timing: dict | None = None) -> None:
        pass  # no rollout actors
