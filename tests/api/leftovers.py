"""What a job may have left behind once it has ended: its processes (driver and actors, found by
the RLHF_JOB_ID in their environment), live actors and placement groups in Ray's state."""

from __future__ import annotations

import psutil
from ray.job_submission import JobSubmissionClient
from ray.util.state import list_actors, list_placement_groups


def job_processes(job_id: str) -> list[str]:
    found = []
    for p in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            if p.environ().get("RLHF_JOB_ID") == job_id:
                found.append(f"pid {p.pid}: {' '.join(p.info['cmdline'] or [p.info['name']])[:120]}")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def leftovers(job_id: str, dashboard: str) -> list[str]:
    """Everything of the job still alive, over all its attempts (Ray submissions): processes, actors
    not DEAD, placement groups not REMOVED."""
    ray_jobs = {j.job_id for j in JobSubmissionClient(dashboard).list_jobs() if (j.metadata or {}).get("rlhf_job_id") == job_id and j.job_id}
    out = job_processes(job_id)
    for ray_job in ray_jobs:
        out += [f"actor {a.class_name} {a.state}" for a in list_actors(address=dashboard, filters=[("job_id", "=", ray_job)], limit=1000)
                if a.state != "DEAD"]
    out += [f"placement group {g.placement_group_id} {g.state}" for g in list_placement_groups(address=dashboard, detail=True, limit=1000)
            if getattr(g, "creator_job_id", None) in ray_jobs and g.state != "REMOVED"]
    return out
