"""The placement group a job (one stage of it) asks Ray for: its bundles and each role's slots.

Pure, so that the control plane's admission queue counts a job's resources exactly as the driver
will ask for them. Roles get separate bundles by default; with `resources.colocate`, replica i of
rollout, trainer, reference and critic share bundle i (and its GPU, each taking a fraction). The
reward actor, when the rewards are not computed in the driver, always has its own bundle and one replica.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.core.spec import JobSpec, RoleResources

COLOCATABLE = ("rollout", "trainer", "reference", "critic")


def _bundle(res: RoleResources) -> dict[str, float]:
    out = {"CPU": res.num_cpus}
    if res.num_gpus:
        out["GPU"] = res.num_gpus
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
    actor_resources = {r: {"num_cpus": getattr(res, r).num_cpus, "num_gpus": getattr(res, r).num_gpus} for r in roles}
    shared = [r for r in roles if r in COLOCATABLE] if res.colocate else []
    if shared:
        width = max(getattr(res, r).replicas for r in shared)
        for i in range(width):
            members = [r for r in shared if i < getattr(res, r).replicas]
            gpus = max(getattr(res, r).num_gpus for r in members)
            bundle = {"CPU": sum(getattr(res, r).num_cpus for r in members)}
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
        role_res = getattr(res, r)
        replicas = 1 if r == "reward" else role_res.replicas
        for _ in range(replicas):
            bundles.append(_bundle(role_res))
            slots.setdefault(r, []).append(len(bundles) - 1)
    return Layout(bundles, slots, actor_resources)


def demand(spec: JobSpec) -> list[dict[str, float]]:
    """The bundles of the largest placement group the job holds at once (its stages run one after
    another, each with its own)."""
    layouts = [plan(stage).bundles for _, stage in spec.stage_specs()]
    return max(layouts, key=lambda b: (sum(x.get("GPU", 0) for x in b), sum(x.get("CPU", 0) for x in b)))
