"""Held-out evaluation: greedy completions of `data.eval_file`, scored by the job's own rewards.

Reported as `eval/<reward>/mean` (e.g. `eval/accuracy/mean` for the verifiable reward), plus the
weighted sum `eval/reward/mean` and `eval/response_length/mean`. The driver decides when
(`Evaluator.due`) and hands `evaluate` what it needs: the prompts, who samples, who scores, and
its timed wait.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from orchestrator.core.batch import Batch, concat
from orchestrator.core.data import PromptDataset
from orchestrator.core.plan import StagePlan


class Evaluator:
    """A stage's held-out set and when to evaluate on it: every `every` steps of the stage (0 = never
    mid-stage) and at its last step."""

    def __init__(self, dataset: Any, every: int, stage: StagePlan):
        self.dataset, self.every, self.first_step, self.last_step = dataset, every, stage.first_step, stage.last_step

    def due(self, step: int) -> bool:
        stage_step = step - self.first_step + 1
        return step == self.last_step or bool(self.every and stage_step % self.every == 0)


def evaluate(dataset: PromptDataset, rollouts, score: Callable[[Batch], Any], wait: Callable[[Any, str], Any]) -> dict[str, float]:
    """Greedy generation on `rollouts` (an ActorGroup: the rollout actors, or the trainers that sample),
    scored by `score` (the driver's `score_rewards`: a Future or an ObjectRef of (scores, per source,
    seconds)), each call waited for with `wait` (the driver's timed wait, which names the phase)."""
    # (prompts, extras, step, greedy, with_logprobs): scoring needs no behaviour log-probs.
    batch = concat([b for b, _ in wait(rollouts.call_on_rows("generate", [dataset.prompt_ids, dataset.extras], 0, True, False), "eval generate")])
    scores, per_source, _ = wait(score(batch), "eval reward")
    out = {f"eval/{label}/mean": values.nan_to_num(0.0).mean().item() for label, values in per_source.items()}
    out["eval/reward/mean"] = scores.mean().item()
    out["eval/response_length/mean"] = batch.response_mask.sum(1).mean().item()
    return out
