"""Keeps each active job record in step with Ray's view of its job.

The driver reports its own status; this catches what it cannot report: a driver killed from
outside, a node lost, a job stopped from the Ray dashboard, a job that never started.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from api.launcher import RayJobMissing, RayJobState, RayLauncher, RayUnavailable
from api.store import JobStore
from orchestrator.core.records import TERMINAL

log = logging.getLogger("api.reconciler")

# A submitted job Ray does not know after this long was lost (e.g. the Ray head was replaced).
MISSING_GRACE_S = 60.0


def ray_failure_message(state: RayJobState) -> str:
    lines = (state.message or "").strip().splitlines()
    first = lines[0] if lines else "the Ray job failed"  # a blank message too, not only an empty one
    first = first.split(", last available logs")[0].rstrip(".: ")
    return f"driver ended without reporting: {first}"


@dataclass(frozen=True)
class Transition:
    """Move the record to `status`, with this event message (and, for a failure, the error)."""

    status: str
    message: str
    error: dict[str, str] | None = None


@dataclass(frozen=True)
class StopRayJob:
    """Ask Ray again to stop the job: the stop sent at cancel time may not have reached it."""


Decision = Transition | StopRayJob | None


def decide(rec: dict[str, Any], ray: RayJobState | RayUnavailable | RayJobMissing, now: float) -> Decision:
    """What one round does for one job, from its record and Ray's answer (its state, or the error
    asking raised); None: nothing this round. Pure: the caller does the I/O."""
    status = rec["status"]
    if status in TERMINAL:
        return None
    if isinstance(ray, RayUnavailable):
        return None  # nothing is known; try again next round
    if isinstance(ray, RayJobMissing):
        if now - (rec["created_at"] or 0) > MISSING_GRACE_S:
            message = f"Ray has no job {rec['id']} (was the Ray cluster replaced?)"
            return Transition("failed", "failed: lost by Ray", {"code": "ray_job_lost", "message": message})
        return None
    ray_status = ray.status
    if ray_status == "RUNNING" and status == "queued":
        return Transition("starting", "starting: the Ray job's driver is running")
    if ray_status == "SUCCEEDED":
        return Transition("succeeded", "succeeded (reported by Ray)")
    if ray_status == "STOPPED" or (ray_status == "FAILED" and status == "cancelling"):
        return Transition("cancelled", "cancelled: the Ray job was stopped")
    if status == "cancelling" and ray_status in ("PENDING", "RUNNING"):
        return StopRayJob()
    if ray_status == "FAILED":
        message = ray_failure_message(ray)
        return Transition("failed", f"failed: {message}", {"code": "driver_failed", "message": message})
    return None


class Reconciler:
    SWEEP_EVERY = 5  # rounds between sweeps of the Redis users of ended jobs

    def __init__(self, store: JobStore, launcher: RayLauncher, interval_s: float):
        self.store, self.launcher, self.interval_s = store, launcher, interval_s
        self._sem = asyncio.Semaphore(8)
        self._rounds = 0

    async def run(self) -> None:
        while True:
            try:
                await self.reconcile_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # one bad round must not end reconciliation for good
                log.exception("reconcile round failed")
            await asyncio.sleep(self.interval_s)

    async def reconcile_once(self) -> None:
        ids = await self.store.active_ids()
        await asyncio.gather(*(self._one(job_id) for job_id in ids))
        self._rounds += 1
        if self._rounds % self.SWEEP_EVERY == 1:
            await self.store.drop_job_users(keep=self._still_running)

    async def _still_running(self, job_id: str) -> bool:
        """A job's Redis user lives as long as the job is not terminal."""
        rec = await self.store.get(job_id)
        return rec is not None and rec["status"] not in TERMINAL

    async def _one(self, job_id: str) -> None:
        async with self._sem:
            rec = await self.store.get(job_id)
            if rec is None or rec["status"] in TERMINAL:
                return  # (decide would do nothing either: this saves asking Ray)
            try:
                ray: RayJobState | RayUnavailable | RayJobMissing = await self.launcher.state(job_id)
            except (RayUnavailable, RayJobMissing) as err:
                ray = err
            await self.act(job_id, decide(rec, ray, time.time()))

    async def act(self, job_id: str, decision: Decision) -> None:
        if isinstance(decision, StopRayJob):
            await self.launcher.stop(job_id)
        elif isinstance(decision, Transition):
            error = {"error": decision.error} if decision.error is not None else {}
            await self.store.transition(job_id, decision.status, decision.message, **error)
