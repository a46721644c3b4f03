"""Placing the roles on Ray: one placement group per job, one named actor per role replica, in the
layout of the job's plan (`orchestrator/core/plan.py`, in Ray's shapes by `orchestrator/core/layout.py`)."""

from __future__ import annotations

import math
import os
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from orchestrator.core.batch import Batch, even_bounds
from orchestrator.core.layout import (  # noqa: F401  (re-exported: the driver places by them)
    COLOCATABLE,
    Layout,
    driver_cpus,
    layout_of,
    plan,
    stage_plan,
)
from orchestrator.core.plan import StagePlan

# OpenMP threads (libgomp, in torch's CPU builds) that finish a parallel region spin GOMP_SPINCOUNT
# times before they sleep (libgomp's default, with no OMP_WAIT_POLICY: 300000, about 3 ms). An actor
# that computes alone wants a short spin: generate's many small ops find their threads awake
# (9.7M-parameter model, medians of 4 alternating runs: generate 1.41 s with OMP_WAIT_POLICY=PASSIVE,
# 1.13 s with libgomp's default). But not a long one: after a call its spinning threads hold a core
# while the driver and the next actor take over (benchmarks/step_breakdown.py, 0.5M GRPO example,
# 2 runs each: 968 and 1007 samples/s with 30000 spins, about 0.3 ms; 881 and 925 with 300000; at
# 9.7M no clear difference). And an actor that computes beside another one must not spin at all:
# its threads take the cores the other one waits for (a 2-thread forward/backward beside a busy
# process: 3.1-3.3 s with libgomp's default, 2.1 s passive).
SPIN = {"GOMP_SPINCOUNT": "30000"}  # (set, not left to libgomp: the raylet may pass on OMP_WAIT_POLICY=PASSIVE)
PASSIVE = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0"}


def actor_env(stage: StagePlan) -> dict[str, str]:
    """The environment of the stage's actors: OpenMP threads that spin while the actors compute one at a
    time (the plan's `one_at_a_time`), that sleep at once where two compute together."""
    return {"TOKENIZERS_PARALLELISM": "false", **(SPIN if stage.one_at_a_time else PASSIVE)}


def pinned_threads(requested: int | None, declared_cpus: float) -> int | None:
    """Torch threads for a process that declared `declared_cpus` CPUs: `resources.torch_threads` as
    asked (None: every core of the node, workers/common.py `configure_threads`), except under the
    control plane (RLHF_JOB_ID set), where tenants' quotas count declared CPUs: there never more than
    those, rounded up (a 0.5-CPU actor gets 1 thread), so that no tenant's job computes on cores it
    was not charged for."""
    if not os.environ.get("RLHF_JOB_ID"):
        return requested
    cap = max(1, math.ceil(declared_cpus))
    return min(requested or cap, cap)


def role_threads(torch_threads: int | None, stage: StagePlan, role: str) -> int | None:
    """`pinned_threads` (`resources.torch_threads` asked) for one actor of `role`, by the CPUs it asks Ray
    for (a trainer that samples or keeps the reference counts those roles' CPUs too: `RolePlan.num_cpus`)."""
    return pinned_threads(torch_threads, stage.role(role).num_cpus)


def thread_env(threads: int | None) -> dict[str, str]:
    """The process's OpenMP and MKL pools as large as its torch threads (they size themselves at load,
    from the environment: set before the process starts)."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {}


class ActorGroup:
    """N actors of one role; `call` fans a method out to all and returns the object refs."""

    def __init__(self, role: str, actors: list[Any]):
        self.role, self.actors = role, actors

    def __len__(self) -> int:
        return len(self.actors)

    def call(self, method: str, *args: Any, **kwargs: Any) -> list[ray.ObjectRef]:
        return [getattr(a, method).remote(*args, **kwargs) for a in self.actors]

    def call_each(self, method: str, per_actor_args: list[tuple]) -> list[ray.ObjectRef]:
        return [getattr(a, method).remote(*args) for a, args in zip(self.actors, per_actor_args)]

    def call_sharded(self, method: str, batch: Batch, *args: Any, whole: Any = None) -> list[ray.ObjectRef]:
        """Each actor gets one consecutive shard of `batch` (sizes differ by at most one; an actor left
        without rows gets no call); a lone actor gets `whole` (the batch already in the object store) if given."""
        if len(self) == 1:
            return self.call(method, batch if whole is None else whole, *args)
        return [getattr(a, method).remote(shard, *args) for a, shard in zip(self.actors, batch.split(len(self))) if len(shard)]

    def call_on_rows(self, method: str, columns: list[list], *args: Any) -> list[ray.ObjectRef]:
        """Each actor gets one consecutive, even slice of every column (same rule as `call_sharded`)."""
        bounds = even_bounds(len(columns[0]), len(self))
        return [getattr(a, method).remote(*(c[s:e] for c in columns), *args) for a, (s, e) in zip(self.actors, bounds) if e > s]


def create_placement_group(layout: Layout, job_id: str, timeout_s: float = 120) -> PlacementGroup:
    pg = placement_group(layout.bundles, strategy="PACK", name=f"{job_id}/placement")
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        total = {k: sum(b.get(k, 0) for b in layout.bundles) for k in ("CPU", "GPU")}
        raise RuntimeError(
            f"the job's placement group ({total['CPU']:g} CPUs, {total['GPU']:g} GPUs in {len(layout.bundles)} bundles) "
            f"could not be scheduled within {timeout_s:.0f}s; cluster resources: {ray.cluster_resources()}"
        )
    return pg


def spawn_group(cls: type, role: str, job_id: str, pg: PlacementGroup, layout: Layout, make_kwargs, env: dict[str, str],
                threads: int | None = None) -> ActorGroup:
    """Start the role's actors, named `<job>/<role>-<i>`, with `env` (`actor_env`) and `threads` torch
    threads (`role_threads`; None: every core); make_kwargs(i) gives replica i's other constructor kwargs."""
    remote_cls = ray.remote(cls)
    actors = []
    for i, bundle_index in enumerate(layout.slots[role]):
        actors.append(
            remote_cls.options(
                name=f"{job_id}/{role}-{i}",
                max_concurrency=1,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=bundle_index),
                runtime_env={"env_vars": {**env, **thread_env(threads)}},
                **layout.actor_resources[role],
            ).remote(**make_kwargs(i), threads=threads)
        )
    return ActorGroup(role, actors)
