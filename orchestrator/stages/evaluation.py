"""Held-out evaluation: greedy completions of `data.eval_file`, scored by the job's own rewards.

Reported as `eval/<reward>/mean` (e.g. `eval/accuracy/mean` for the verifiable reward), plus the
weighted sum `eval/reward/mean` and `eval/response_length/mean`.
"""

from __future__ import annotations

import time

from orchestrator.core.batch import concat
from orchestrator.core.data import PromptDataset


class Evaluator:
    """Evaluates every `every` steps of a stage (0 = never mid-stage) and at its last step."""

    def __init__(self, dataset: PromptDataset, every: int, first_step: int = 1):
        self.dataset, self.every, self.first_step = dataset, every, first_step

    def __call__(self, orch, step: int) -> dict[str, float]:
        stage_step = step - self.first_step + 1
        if step == orch.total_steps or (self.every and stage_step % self.every == 0):
            return orch.evaluate(self.dataset)  # the driver's kind of evaluation (below, or a preference stage's)
        return {}


def evaluate(orch, dataset: PromptDataset) -> dict[str, float]:
    """Greedy generation on the rollout actors, scored by the job's rewards; the policy is the trainer's
    current one (an SFT stage syncs it first: it does not sync after every step)."""
    start = time.perf_counter()
    if not orch.syncs_every_step:
        orch.sync_weights()
    rollouts = orch.rollout_group
    # (prompts, extras, step, greedy, with_logprobs): scoring needs no behaviour log-probs.
    batch = concat([b for b, _ in orch.wait(rollouts.call_on_rows("generate", [dataset.prompt_ids, dataset.extras], 0, True, False), "eval generate")])
    scores, per_source, _ = orch.wait(orch.score_rewards(batch), "eval reward")
    out = {f"eval/{label}/mean": values.nan_to_num(0.0).mean().item() for label, values in per_source.items()}
    out["eval/reward/mean"] = scores.mean().item()
    out["eval/response_length/mean"] = batch.response_mask.sum(1).mean().item()
    out["timing/eval"] = time.perf_counter() - start
    return out
