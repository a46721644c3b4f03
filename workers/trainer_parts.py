"""The parts a policy trainer (workers/trainer.py) is composed with when it runs a phase of the step
besides its update: sampling the completions, the reference log-probs, or the rewards of a step that
is one call. The trainer factory (orchestrator/stages/roles.py) gives one part per phase the plan
puts on the trainer (`RolePlan.also`).

Each part is a plain class in two steps: built where the plan is read, from paths, specs and seeds
alone (cheap to send to the trainer's actor), then `attach`ed in the trainer's process, where it
loads what it needs (a tokenizer, a model, reward functions) and finds the trainer's model.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from orchestrator.core.advantages import compute_advantages
from orchestrator.core.batch import Batch, tensors_to_wire
from workers.common import batched_logprobs, load_tokenizer
from workers.reference import Reference
from workers.reward import RewardWorker
from workers.rollout import make_sampler

if TYPE_CHECKING:
    from orchestrator.core.spec import JobSpec, RolloutSpec
    from workers.trainer import PolicyTrainer


class Sampling:
    """The rollout phase: the HF rollout's `generate` from the trainer's own weights, nothing to sync.
    Replica i samples with seed `seed + i`, as rollout actor i would. With `rollout.agent`, each sample
    is an episode of its environment (workers/agent_rollout.py `AgentSampler`)."""

    phase: ClassVar[str] = "rollout"

    def __init__(self, tokenizer_path: str, trust_remote_code: bool, rollout: RolloutSpec, seed: int):
        self.tokenizer_path, self.trust_remote_code, self.rollout, self.seed = tokenizer_path, trust_remote_code, rollout, seed

    def attach(self, trainer: PolicyTrainer) -> None:
        r = self.rollout
        self.trainer = trainer
        self.sampler = make_sampler(load_tokenizer(self.tokenizer_path, self.trust_remote_code), r.n, r.max_new_tokens, r.temperature,
                                    r.top_p, self.seed, r.agent)

    def generate(self, prompt_ids: list[list[int]], extras: list[dict], step: int, greedy: bool = False,
                 with_logprobs: bool = True) -> tuple[Batch, float]:
        model = self.trainer.model
        model.eval()
        try:
            return self.sampler.generate(model, self.trainer.device, prompt_ids, extras, step, greedy, with_logprobs)
        finally:
            model.train()


class KeptReference:
    """The reference phase from a frozen copy of the starting weights that the trainer keeps in its
    process (`resources.reference_in`): the Reference role's own class, on the trainer's threads."""

    phase: ClassVar[str] = "reference"

    def __init__(self, **reference_kwargs: Any):
        self.kwargs = reference_kwargs  # `Reference`'s arguments but `threads`

    def attach(self, trainer: PolicyTrainer) -> None:
        self.reference = Reference(**self.kwargs, threads=trainer.threads)

    def compute_logprobs(self, batch: Batch) -> tuple[torch.Tensor, float]:
        return self.reference.compute_logprobs(batch)


class FrozenBase:
    """The reference phase of a LoRA policy: its own frozen base, the adapters off for the pass."""

    phase: ClassVar[str] = "reference"

    def __init__(self, temperature: float):
        self.temperature = temperature

    def attach(self, trainer: PolicyTrainer) -> None:
        self.trainer = trainer

    def compute_logprobs(self, batch: Batch) -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        t = self.trainer
        t.model.eval()
        try:
            with t.model.disable_adapter():
                logprobs = batched_logprobs(t.model, batch.to(t.device), self.temperature, t.optim.micro_batch_size, t.optim.micro_batch_tokens)
        finally:
            t.model.train()
        return (logprobs * batch.response_mask.to(t.device)).cpu(), time.perf_counter() - start


class OneCallStep:
    """The reward phase of a step that is one call (the plan's `one_call_step`): the trainer samples
    (its `Sampling` part), scores with the job's reward functions, computes the advantages and
    updates, the driver's phases (orchestrator/stages/driver.py) without a Ray round trip between."""

    phase: ClassVar[str] = "reward"

    def __init__(self, spec: JobSpec, tokenizer_path: str, dtype: str, trust_remote_code: bool):
        self.spec, self.tokenizer_path, self.dtype, self.trust_remote_code = spec, tokenizer_path, dtype, trust_remote_code

    def attach(self, trainer: PolicyTrainer) -> None:
        self.trainer = trainer
        self.rewards = RewardWorker(self.spec.reward_sources, self.tokenizer_path, self.dtype, self.trust_remote_code, threads=trainer.threads)

    def whole_step(self, prompt_ids: list[list[int]], extras: list[dict], step: int, with_logprobs: bool, num_mini_batches: int,
                   micro_batch_size: int | None, on_policy: bool) -> tuple[Batch, dict[str, Any], dict[str, float]]:
        """The scored batch, each reward's scores (as `tensors_to_wire` sends them), and the update's
        stats with each phase's seconds (`timing/...`)."""
        batch, generate_s = self.trainer.generate(prompt_ids, extras, step, False, with_logprobs)
        scores, per_source, reward_s = self.rewards.score(batch)
        start = time.perf_counter()
        batch = compute_advantages(batch.replace(scores=scores), self.spec)
        advantages_s = time.perf_counter() - start
        stats = self.trainer.train_step(batch, step, num_mini_batches, micro_batch_size, on_policy)
        stats.update({"timing/generate_compute": generate_s, "timing/reward": reward_s, "timing/advantages": advantages_s})
        return batch, tensors_to_wire(per_source), stats
