"""One factory per role: the class a role's actors run and replica i's constructor arguments, read
from the stage's spec (models, optimiser, sampling) and its plan (where each phase runs).

`FACTORIES[role](spec, stage)` gives a `RoleFactory`; the driver spawns `stage.roles` with them
(orchestrator/runtime/placement.py `spawn_group` adds each actor's threads). Every model loads
with its own trust decision (core/spec.py): the policy's `model.trust_remote_code`, the critic's
and a trained model's their own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from orchestrator.core.plan import StagePlan
from orchestrator.core.spec import JobSpec
from orchestrator.runtime.placement import pinned_threads
from orchestrator.runtime.registry import rollout_class, trainer_class
from workers.critic import Critic
from workers.reference import Reference
from workers.reward import RewardWorker
from workers.trainer import TrainerPart
from workers.trainer_parts import FrozenBase, KeptReference, OneCallStep, Sampling
from workers.sandbox import Limits, Sandbox


@dataclass(frozen=True)
class RoleFactory:
    cls: type
    kwargs: Callable[[int], dict[str, Any]]  # replica i -> its constructor kwargs (but `threads`)


def reference_temperature(spec: JobSpec) -> float:
    """The temperature reference log-probs are taken at: the rollouts' (a stage without rollouts, DPO: 1)."""
    return spec.rollout.temperature if spec.algo.rollouts else 1.0


def _sharded(spec: JobSpec, role: str, i: int) -> dict[str, Any]:
    """In a sharded role only rank 0 reads the weights; it sends the others their shards."""
    res = getattr(spec.resources, role)
    return {"shard_rank": i} if res.strategy == "fsdp" and res.replicas > 1 else {}


def rollout(spec: JobSpec, stage: StagePlan) -> RoleFactory:
    m, r, res = spec.model, spec.rollout, spec.resources
    # Engine options only the vLLM backend takes: tensor parallelism and sleep/wake when colocated.
    vllm = {"tensor_parallel_size": r.tensor_parallel_size, "colocate": res.colocate} if r.backend == "vllm" else {}
    agent = {"agent": r.agent} if stage.rollout_mode == "multi_turn" else {}  # (episodes of its environment: workers/agent_rollout.py)
    return RoleFactory(rollout_class(r.backend), lambda i: dict(
        model_path=m.path, n=r.n, max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
        seed=spec.optim.seed + i, num_gpus=res.rollout.num_gpus, trust_remote_code=m.trust_remote_code, dtype=m.dtype, **vllm, **agent))


def trainer(spec: JobSpec, stage: StagePlan) -> RoleFactory:
    """The trainer, composed: its update, and a part for each phase the plan runs on it besides
    (`RolePlan.also`: rollout, reference, reward; workers/trainer_parts.py)."""
    m = spec.model
    also = stage.role("trainer").also
    # A policy's own options (a reward model's trainer takes neither): LoRA adapters, and its parts.
    policy = spec.algo.produces == "policy"
    return RoleFactory(trainer_class(spec.algorithm.name), lambda i: dict(
        model_path=spec.trained_model_path, optim=spec.optim, rollout=spec.rollout, num_gpus=spec.resources.trainer.num_gpus,
        trust_remote_code=spec.trained_model_trust, dtype=m.dtype, **_sharded(spec, "trainer", i),
        **({"lora": m.lora, "parts": [TRAINER_PARTS[phase](spec, stage, i) for phase in also]} if policy else {})))


def _sampling(spec: JobSpec, stage: StagePlan, i: int) -> Sampling:
    """Replica i samples with the rollout seed `seed + i`, as rollout actor i would; episodes of `rollout.agent`
    only where the plan's rollout is multi-turn (an SFT stage's evaluation samples single completions)."""
    rollout = spec.rollout if stage.rollout_mode == "multi_turn" else spec.rollout.model_copy(update={"agent": None})
    return Sampling(spec.trained_model_path, spec.trained_model_trust, rollout, spec.optim.seed + i)


def _reference(spec: JobSpec, stage: StagePlan, i: int) -> KeptReference | FrozenBase:
    """A kept copy of the starting weights (`resources.reference_in`), or a LoRA policy's frozen base."""
    if not stage.reference_copy:
        return FrozenBase(reference_temperature(spec))
    opt = spec.optim
    return KeptReference(model_path=spec.trained_model_path, dtype=spec.model.dtype, trust_remote_code=spec.trained_model_trust,
                         temperature=reference_temperature(spec), num_gpus=spec.resources.trainer.num_gpus,
                         micro_batch_size=opt.micro_batch_size, micro_batch_tokens=opt.micro_batch_tokens)


def _one_call_step(spec: JobSpec, stage: StagePlan, i: int) -> OneCallStep:
    """The job's reward functions, in a step that is one call (the plan's `one_call_step`)."""
    return OneCallStep(spec, spec.trained_model_path, spec.model.dtype, spec.trained_model_trust)


# The plan's phase -> the trainer part that runs it (`RolePlan.also`).
TRAINER_PARTS: dict[str, Callable[[JobSpec, StagePlan, int], TrainerPart]] = {
    "rollout": _sampling, "reference": _reference, "reward": _one_call_step}


def reward(spec: JobSpec, stage: StagePlan) -> RoleFactory:
    m = spec.model
    return RoleFactory(RewardWorker, lambda i: {"sources": spec.reward_sources, "tokenizer_path": m.path, "num_gpus": spec.resources.reward.num_gpus,
                                                    "trust_remote_code": m.trust_remote_code, "dtype": m.dtype})


def reference(spec: JobSpec, stage: StagePlan) -> RoleFactory:
    m, opt = spec.model, spec.optim
    return RoleFactory(Reference, lambda i: dict(
        model_path=m.path, temperature=reference_temperature(spec), micro_batch_size=opt.micro_batch_size,
        micro_batch_tokens=opt.micro_batch_tokens, num_gpus=spec.resources.reference.num_gpus, trust_remote_code=m.trust_remote_code,
        dtype=m.dtype, **_sharded(spec, "reference", i)))


def critic(spec: JobSpec, stage: StagePlan) -> RoleFactory:
    m = spec.model
    return RoleFactory(Critic, lambda i: dict(
        model_path=m.critic_path or m.path, optim=spec.optim, num_gpus=spec.resources.critic.num_gpus, trust_remote_code=m.critic_trust,
        dtype=m.dtype, lora=m.lora if m.lora and m.lora.critic else None, **_sharded(spec, "critic", i)))


def sandbox(spec: JobSpec, stage: StagePlan) -> RoleFactory:
    """Where a multi-turn environment's code runs: `Sandbox` actors with `rollout.agent.sandbox`'s limits."""
    box = spec.rollout.agent.sandbox
    return RoleFactory(Sandbox, lambda i: {"limits": Limits(cpu_s=box.cpu_s, wall_s=box.wall_s, memory_mb=box.memory_mb)})


FACTORIES: dict[str, Callable[[JobSpec, StagePlan], RoleFactory]] = {
    "rollout": rollout, "trainer": trainer, "reward": reward, "reference": reference, "critic": critic, "sandbox": sandbox}


def driver_rewards(spec: JobSpec, stage: StagePlan) -> RewardWorker | None:
    """The reward functions in the driver's own process, where the plan scores in the driver (or in a
    trainer that runs whole steps: the driver still scores the held-out prompts); else None."""
    if stage.where("reward") not in ("driver", "trainer"):
        return None
    m = spec.model
    return RewardWorker(spec.reward_sources, m.path, m.dtype, m.trust_remote_code,
                        threads=pinned_threads(spec.resources.torch_threads, stage.driver_cpus))
