"""Keeps each active job record in step with Ray's view of its job.

The driver reports its own status; this catches what it cannot report: a driver killed from
outside, a node lost, a job stopped from the Ray dashboard, a job that never started.
"""

from __future__ import annotations

import asyncio
import logging
import time

from api.launcher import RayJobMissing, RayJobState, RayLauncher, RayUnavailable
from api.store import JobStore
from orchestrator.core.records import TERMINAL

log = logging.getLogger("api.reconciler")

# A submitted job Ray does not know after this long was lost (e.g. the Ray head was replaced).
MISSING_GRACE_S = 60.0


def ray_failure_message(state: RayJobState) -> str:
    first = (state.message or "the Ray job failed").strip().splitlines()[0]
    first = first.split(", last available logs")[0].rstrip(".: ")
    return f"driver ended without reporting: {first}"


class Reconciler:
    def __init__(self, store: JobStore, launcher: RayLauncher, interval_s: float):
        self.store, self.launcher, self.interval_s = store, launcher, interval_s
        self._sem = asyncio.Semaphore(8)

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

    async def _one(self, job_id: str) -> None:
        async with self._sem:
            rec = await self.store.get(job_id)
            if rec is None or rec["status"] in TERMINAL:
                return
            try:
                state = await self.launcher.state(job_id)
            except RayUnavailable:
                return  # nothing is known; try again next round
            except RayJobMissing:
                if time.time() - (rec["created_at"] or 0) > MISSING_GRACE_S:
                    await self.store.transition(
                        job_id, "failed", "failed: lost by Ray", error={"code": "ray_job_lost", "message": f"Ray has no job {job_id} (was the Ray cluster replaced?)"}
                    )
                return
            await self.apply(job_id, rec["status"], state)

    async def apply(self, job_id: str, status: str, state: RayJobState) -> None:
        ray_status = state.status
        if ray_status == "RUNNING" and status == "queued":
            await self.store.transition(job_id, "starting", "starting: the Ray job's driver is running")
        elif ray_status == "SUCCEEDED":
            await self.store.transition(job_id, "succeeded", "succeeded (reported by Ray)")
        elif ray_status == "STOPPED" or (ray_status == "FAILED" and status == "cancelling"):
            await self.store.transition(job_id, "cancelled", "cancelled: the Ray job was stopped")
        elif status == "cancelling" and ray_status in ("PENDING", "RUNNING"):
            await self.launcher.stop(job_id)  # the stop at cancel time may not have reached Ray
        elif ray_status == "FAILED":
            message = ray_failure_message(state)
            await self.store.transition(job_id, "failed", f"failed: {message}", error={"code": "driver_failed", "message": message})
