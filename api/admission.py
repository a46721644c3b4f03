"""The admission queue: which waiting jobs go to Ray now, and why the others wait.

A job waits in the control plane (status `queued`, not yet submitted to Ray) until its placement
group fits what the cluster has left: the cluster's capacity (Ray's alive nodes) less what the jobs
already admitted hold, bundle by bundle as the driver will ask for them (`core/layout.py`). Order:
priority (higher first, bounded per tenant), then fair share (the tenant holding least goes first),
then submit time. A job held back by its tenant's quota lets the next one pass; a job held back by
the cluster stops admission behind it (no backfill), so a large job is never starved by small ones.

`decide` is pure: records and numbers in, decisions out; the reconciler does the I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Quota:
    cpus: float | None = None  # CPUs a tenant's admitted jobs may hold at once (None: no limit)
    gpus: float | None = None
    max_priority: int = 0  # the highest `priority` its jobs may ask for


@dataclass(frozen=True)
class Capacity:
    total: dict[str, float]  # over the cluster's alive nodes
    largest: dict[str, float]  # of its largest node: a bundle must fit one node


@dataclass
class Decision:
    admit: list[str] = field(default_factory=list)
    waiting: dict[str, tuple[int, str]] = field(default_factory=dict)  # job id -> (position, reason)


def total(bundles: list[dict[str, float]], resource: str) -> float:
    return sum(b.get(resource, 0.0) for b in bundles)


def never_fits(bundles: list[dict[str, float]], capacity: Capacity) -> str | None:
    """Why a job can never run on this cluster as it is, or None."""
    for resource in ("CPU", "GPU"):
        need, have = total(bundles, resource), capacity.total.get(resource, 0.0)
        if need > have + 1e-9:
            return f"the job asks for {need:g} {resource}s in all; the cluster has {have:g}"
    for b in bundles:
        for resource, need in b.items():
            if need > capacity.largest.get(resource, 0.0) + 1e-9:
                return (f"one of the job's bundles asks for {need:g} {resource}s; the cluster's largest node has "
                        f"{capacity.largest.get(resource, 0.0):g}")
    return None


def decide(waiting: list[dict], admitted: list[dict], capacity: Capacity | None, quotas: dict[str, Quota], default: Quota) -> Decision:
    """`waiting`/`admitted`: records with `id`, `tenant`, `priority`, `seq` and `demand` (bundles)."""
    out = Decision()
    held: dict[str, dict[str, float]] = {}
    for rec in admitted:
        t = held.setdefault(rec["tenant"], {"CPU": 0.0, "GPU": 0.0})
        for resource in t:
            t[resource] += total(rec["demand"] or [], resource)
    free = {r: (capacity.total.get(r, 0.0) if capacity else 0.0) - sum(t[r] for t in held.values()) for r in ("CPU", "GPU")}

    def share(rec):  # what the tenant holds now: GPUs first, then CPUs
        t = held.get(rec["tenant"], {"CPU": 0.0, "GPU": 0.0})
        return (t["GPU"], t["CPU"])

    blocked: str | None = None if capacity else "the Ray cluster's resources are not known yet (is Ray reachable?)"
    remaining, position = list(waiting), 0
    while remaining:
        # Fair share is recomputed as jobs are admitted: the tenant holding least (GPUs, then CPUs) goes next.
        rec = min(remaining, key=lambda r: (-(r.get("priority") or 0), share(r), r["seq"]))
        remaining.remove(rec)
        bundles = rec["demand"] or []
        need = {r: total(bundles, r) for r in ("CPU", "GPU")}
        quota = quotas.get(rec["tenant"], default)
        mine = held.get(rec["tenant"], {"CPU": 0.0, "GPU": 0.0})
        over = [f"tenant quota: {mine[r]:g} of {limit:g} {r}s in use" for r, limit in (("CPU", quota.cpus), ("GPU", quota.gpus))
                if limit is not None and mine[r] + need[r] > limit + 1e-9]
        asks = f"the job asks for {need['CPU']:g} CPUs, {need['GPU']:g} GPUs"
        if over:
            position += 1
            out.waiting[rec["id"]] = (position, "; ".join(over) + f" ({asks})")
            continue
        if blocked is None:
            short = [f"{need[r] - free[r]:g} more {r}s" for r in ("CPU", "GPU") if need[r] > free[r] + 1e-9]
            if short:
                position += 1
                out.waiting[rec["id"]] = (position, f"waiting for {' and '.join(short)} ({asks}; "
                                          f"{max(free['CPU'], 0):g} CPUs and {max(free['GPU'], 0):g} GPUs are free)")
                blocked = f"behind job {rec['id']}, which waits for resources"
                continue
        if blocked is not None:
            position += 1
            out.waiting[rec["id"]] = (position, blocked)
            continue
        out.admit.append(rec["id"])
        for r in ("CPU", "GPU"):
            free[r] -= need[r]
            held.setdefault(rec["tenant"], {"CPU": 0.0, "GPU": 0.0})[r] += need[r]
    return out
