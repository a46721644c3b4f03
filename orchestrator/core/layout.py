"""The placement group a job (one stage of it) asks Ray for, as placement reads it: its bundles and
each role's slots, taken from the stage's plan (core/plan.py, where the rules are).

Pure, so that the control plane's admission queue counts a job's resources exactly as the driver
will ask for them. Roles get separate bundles by default; with `resources.colocate`, replica i of
rollout, trainer, reference and critic share bundle i (and its GPU, each taking a fraction). The
reward actor, when the rewards are not computed in the driver, always has its own bundle and one replica.
A trainer that also samples the completions (`resources.rollout_in`) or keeps the reference
(`resources.reference_in`) asks for the rollout's or the reference's CPUs too.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.core.plan import COLOCATABLE, StagePlan, make_plan, plan_stage  # noqa: F401  (COLOCATABLE: re-exported)
from orchestrator.core.spec import JobSpec


@dataclass
class Layout:
    """Bundles of the placement group and, per role, the bundle index of each replica."""

    bundles: list[dict[str, float]]
    slots: dict[str, list[int]]
    # Per role, the resources each actor asks for inside its bundle.
    actor_resources: dict[str, dict[str, float]]


def layout_of(stage: StagePlan) -> Layout:
    """A stage plan's placement group, in the shapes Ray's calls take."""
    return Layout([b.as_ray() for b in stage.bundles], {r.role: list(r.slots) for r in stage.roles},
                  {r.role: {"num_cpus": r.num_cpus, "num_gpus": r.num_gpus} for r in stage.roles})


def stage_plan(spec: JobSpec) -> StagePlan:
    """The plan of one stage's spec (its own sections; a spec without stages: its plan's only stage)."""
    return make_plan(spec).stages[0] if spec.stages is None else plan_stage(spec)


def plan(spec: JobSpec) -> Layout:
    """The placement group of one stage's spec."""
    return layout_of(stage_plan(spec))


def driver_cpus(spec: JobSpec) -> float:
    """The CPUs the job's driver process asks Ray for (the Ray job's `entrypoint_num_cpus`): where it
    computes the rewards itself (`resources.reward_in`), what the reward actor would have had."""
    return make_plan(spec).driver_cpus


def demand(spec: JobSpec) -> list[dict[str, float]]:
    """What the job holds at once: the bundles of its largest placement group (its stages run one
    after another, each with its own), and its driver's CPUs (`driver_cpus`) as one more bundle."""
    return [b.as_ray() for b in make_plan(spec).demand]
