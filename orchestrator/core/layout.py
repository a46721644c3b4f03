"""The placement group a job (one stage of it) asks Ray for: its bundles and each role's slots.

Pure, so that the control plane's admission queue counts a job's resources exactly as the driver
will ask for them. Roles get separate bundles by default; with `resources.colocate`, replica i of
rollout, trainer, reference and critic share bundle i (and its GPU, each taking a fraction). The
reward actor, when the rewards are not computed in the driver, always has its own bundle and one replica.
A trainer that also samples the completions (`resources.rollout_in`) or keeps the reference
(`resources.reference_in`) asks for the rollout's or the reference's CPUs too.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.core.spec import JobSpec

COLOCATABLE = ("rollout", "trainer", "reference", "critic")


def needs(spec: JobSpec, role: str) -> dict[str, float]:
    """What one actor of `role` asks Ray for: the role's resources, and for a trainer that is also the
    rollout or keeps the reference, their CPUs as well (the phases take turns on one device)."""
    res, own = spec.resources, getattr(spec.resources, role)
    ask = {"num_cpus": own.num_cpus, "num_gpus": own.num_gpus}
    if role == "trainer":  # what the trainer does in place of a rollout or a reference actor
        for other in [r for r, inside in (("rollout", spec.rollouts_in_trainer), ("reference", spec.reference_copy_in_trainer)) if inside]:
            extra = getattr(res, other)
            ask = {"num_cpus": ask["num_cpus"] + extra.num_cpus, "num_gpus": max(ask["num_gpus"], extra.num_gpus)}
    return ask


def _bundle(actor: dict[str, float]) -> dict[str, float]:
    out = {"CPU": actor["num_cpus"]}
    if actor["num_gpus"]:
        out["GPU"] = actor["num_gpus"]
    return out


@dataclass
class Layout:
    """Bundles of the placement group and, per role, the bundle index of each replica."""

    bundles: list[dict[str, float]]
    slots: dict[str, list[int]]
    # Per role, the resources each actor asks for inside its bundle.
    actor_resources: dict[str, dict[str, float]]


def plan(spec: JobSpec) -> Layout:
    res = spec.resources
    roles = spec.roles
    bundles: list[dict[str, float]] = []
    slots: dict[str, list[int]] = {}
    actor_resources = {r: needs(spec, r) for r in roles}
    shared = [r for r in roles if r in COLOCATABLE] if res.colocate else []
    if shared:
        width = max(getattr(res, r).replicas for r in shared)
        for i in range(width):
            members = [r for r in shared if i < getattr(res, r).replicas]
            gpus = max(actor_resources[r]["num_gpus"] for r in members)
            bundle = {"CPU": sum(actor_resources[r]["num_cpus"] for r in members)}
            if gpus:
                bundle["GPU"] = gpus
            bundles.append(bundle)
            for r in members:
                slots.setdefault(r, []).append(len(bundles) - 1)
        for r in shared:
            if actor_resources[r]["num_gpus"]:
                # Colocated roles time-share the bundle's GPU.
                actor_resources[r]["num_gpus"] = actor_resources[r]["num_gpus"] / len(shared)
    for r in roles:
        if r in shared:
            continue
        replicas = 1 if r == "reward" else getattr(res, r).replicas
        for _ in range(replicas):
            bundles.append(_bundle(actor_resources[r]))
            slots.setdefault(r, []).append(len(bundles) - 1)
    return Layout(bundles, slots, actor_resources)


def driver_cpus(spec: JobSpec) -> float:
    """The CPUs the job's driver process asks Ray for (the Ray job's `entrypoint_num_cpus`): where it
    computes the rewards itself (`resources.reward_in`), what the reward actor would have had."""
    return max((stage.resources.reward.num_cpus for _, stage in spec.stage_specs() if stage.scores_with_rewards and stage.rewards_in_driver),
               default=0.0)


def demand(spec: JobSpec) -> list[dict[str, float]]:
    """What the job holds at once: the bundles of its largest placement group (its stages run one
    after another, each with its own), and its driver's CPUs (`driver_cpus`) as one more bundle."""
    layouts = [plan(stage).bundles for _, stage in spec.stage_specs()]
    largest = max(layouts, key=lambda b: (sum(x.get("GPU", 0) for x in b), sum(x.get("CPU", 0) for x in b)))
    cpus = driver_cpus(spec)
    return largest + ([{"CPU": cpus}] if cpus else [])
