"""Keeps each active job record in step with Ray's view of its job, and runs the admission queue.

The driver reports its own status; this catches what it cannot report: a driver killed from
outside, a node lost, a job stopped from the Ray dashboard, a job that never started. Each round
then admits the waiting jobs that fit (api/admission.py) by submitting them to Ray.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from redis.exceptions import LockError

from api import admission
from api.admission import Capacity, Quota
from api.launcher import RayJobMissing, RayJobState, RayLauncher, RayUnavailable
from api.settings import Settings
from api.store import CLAIM_S, JobStore
from api.tinker import pool_resources
from orchestrator.core.records import PREFIX, TERMINAL
from orchestrator.core.spec import FaultToleranceSpec

log = logging.getLogger("api.reconciler")

# A submitted job Ray does not know after this long was lost (e.g. the Ray head was replaced).
MISSING_GRACE_S = 60.0
# Ray unreachable for this long (settings.ray_unreachable_deadline_s): the job is failed, not `running` forever.
UNREACHABLE_DEADLINE_S = 600.0
ORPHANS_KEY = f"{PREFIX}jobs:stop_when_reachable"
JOB_ID = re.compile(r"job-[0-9a-f]{24}")  # as api/routers/jobs.py makes them


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


@dataclass(frozen=True)
class Resubmit:
    """The driver died without reporting: submit the job to Ray again, with `--resume`, as restart
    number `restart` (its Ray submission id `<job id>-attempt<restart + 1>`)."""

    restart: int
    cause: str


Decision = Transition | StopRayJob | Resubmit | None


def max_restarts(rec: dict[str, Any]) -> int:
    """`fault_tolerance.max_restarts` of the job's spec as launched (its default if unset)."""
    section = (rec.get("launch_spec") or {}).get("fault_tolerance") or {}
    value = section.get("max_restarts")
    return int(value) if value is not None else FaultToleranceSpec.model_fields["max_restarts"].default


def submission_id(job_id: str, restart: int) -> str:
    """The Ray submission id of a job's attempt: the job id for the first, then `-attempt2`, ..."""
    return job_id if restart == 0 else f"{job_id}-attempt{restart + 1}"


def decide(rec: dict[str, Any], ray: RayJobState | RayUnavailable | RayJobMissing, now: float,
           unreachable_s: float = 0.0, deadline_s: float = UNREACHABLE_DEADLINE_S) -> Decision:
    """What one round does for one job, from its record and Ray's answer (its state, or the error
    asking raised; `unreachable_s`: how long Ray has not answered about it); None: nothing this
    round. Pure: the caller does the I/O."""
    status = rec["status"]
    if status in TERMINAL:
        return None
    if isinstance(ray, RayUnavailable):
        if unreachable_s > deadline_s:
            # A driver does not outlive its Ray head; a head away this long took the job with it.
            message = f"Ray did not answer about this job for {unreachable_s:.0f} s (last: {ray}); the job is presumed lost with it"
            return Transition("failed", "failed: Ray unreachable", {"code": "ray_unreachable", "message": message})
        return None  # nothing is known; try again next round
    if isinstance(ray, RayJobMissing):
        if now - max(rec.get("admitted_at") or rec["created_at"] or 0, rec.get("resubmitted_at") or 0) > MISSING_GRACE_S:
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
        if rec.get("launch_spec"):  # (a record from an API before the admission queue cannot be resubmitted)
            used, allowed = rec.get("restarts") or 0, max_restarts(rec)
            if used < allowed:
                return Resubmit(used + 1, message)
            if allowed:
                message += f" (no restart left: fault_tolerance.max_restarts={allowed}, {used} used)"
        return Transition("failed", f"failed: {message}", {"code": "driver_failed", "message": message})
    return None


def _demand(spec: dict) -> list[dict[str, float]]:
    """The bundles a launched spec holds (what admission counts for it); none if it no longer validates."""
    from orchestrator.core.layout import demand
    from orchestrator.core.spec import JobSpec

    try:
        return demand(JobSpec.model_validate(spec))
    except ValueError:
        return []


def redis_endpoint(url: str | None) -> tuple | None:
    """The Redis server and database a URL names, whoever's credentials it carries (None: no URL, or
    not a Redis URL)."""
    from redis.connection import parse_url

    try:
        kw = parse_url(url) if url else None
    except ValueError:
        return None
    return None if kw is None else (kw.get("path") or kw.get("host", "localhost"), kw.get("port", 6379), kw.get("db", 0))


def waiting_for_admission(rec: dict[str, Any]) -> bool:
    """Recorded with its launch spec and not yet submitted to Ray. (A record without a launch spec
    comes from an API before the admission queue, which submitted at once.)"""
    return rec["status"] == "queued" and bool(rec.get("launch_spec")) and not rec.get("admitted_at")


class Reconciler:
    # In reconcile intervals, and kept in time, not rounds (a round that waits on a busy Ray is longer):
    SWEEP_EVERY = 5  # between sweeps of the Redis users of ended jobs
    ADOPT_EVERY = 20  # between looks for running Ray jobs whose records Redis lost (and at the first round)
    CAPACITY_TTL_S = 5.0

    def __init__(self, store: JobStore, launcher: RayLauncher, settings: Settings):
        self.store, self.launcher, self.settings = store, launcher, settings
        self.interval_s = settings.reconcile_interval_s
        self._sem = asyncio.Semaphore(8)
        self._last: dict[str, float] = {}  # chore -> when it last ran (time.monotonic())
        self._wake = asyncio.Event()
        self._capacity: tuple[float, Capacity] | None = None
        self._pool_cpus = 0.0  # CPUs the Tinker API's adapter pools hold (api/tinker.py pool_resources), counted with the capacity
        self._pool_gpus = 0.0  # and their GPUs (RLHF_API_TINKER_POOL_GPUS)
        # Set at shutdown beside the task's cancel: Python 3.11's wait_for can swallow a cancel that arrives as its
        # wait ends (a loop that then ran on held the app's shutdown forever); this ends the loop at its next round.
        self.stopping = False
        self._unreachable: dict[str, float] = {}  # job id -> when Ray first failed to answer about it (this process)

    def wake(self) -> None:
        """Run the next round now (a job was submitted)."""
        self._wake.set()

    async def run(self) -> None:
        """Reconcile every `interval_s` (sooner when woken) until `stopping` is set or the task is cancelled."""
        while not self.stopping:
            try:
                await self.reconcile_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # one bad round must not end reconciliation for good
                log.exception("reconcile round failed")
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval_s)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()

    async def reconcile_once(self) -> None:
        ids = await self.store.active_ids()
        if self.settings.job_credentials == "acl":
            await self.restore_job_users(ids)
        await asyncio.gather(*(self._one(job_id) for job_id in ids))
        await self.stop_orphans()
        ending = await self.confirm_ended()
        await self.admit(ids, ending)
        if self._due("adopt", self.ADOPT_EVERY):
            await self.rebuild_lost_records()
        if self._due("sweep", self.SWEEP_EVERY):
            await self.store.drop_job_users(keep=self._still_running)

    def _due(self, chore: str, intervals: int) -> bool:
        """Whether `chore` last ran `intervals` reconcile intervals ago or more (or never); if so it runs now."""
        now = time.monotonic()
        if chore in self._last and now - self._last[chore] < intervals * self.interval_s:
            return False
        self._last[chore] = now
        return True

    async def restore_job_users(self, ids: list[str]) -> None:
        """Redis restarted from its AOF keeps the job records but not the jobs' users: recreated here,
        within a round, so that the drivers (retrying meanwhile) report again and lose nothing."""
        for job_id in await self.store.restore_job_users(ids):
            log.warning("recreated the Redis user of job %s (Redis had lost it: restarted without an ACL file?)", job_id)

    async def rebuild_lost_records(self) -> int:
        """Record again the jobs running in Ray whose records Redis has lost (their Ray submission
        carries tenant, name, spec and Redis URL), so that they show, finish and can be cancelled: no
        job runs on unseen. Their Redis users come back with the passwords their processes hold, and
        what they report from then on arrives. How many were rebuilt."""
        try:
            live = await self.launcher.live_jobs()
        except RayUnavailable:
            return 0
        rebuilt, ours = 0, redis_endpoint(self.settings.jobs_redis_url)
        for job in live:
            if not JOB_ID.fullmatch(job.job_id):  # only ids this service gives (the metadata is anyone's who may submit to Ray)
                continue
            # Only jobs that report to this service's Redis: another control plane's job on the same Ray
            # cluster is not lost, and adopting it made two reconcilers resubmit it after its driver
            # died, the later one rewriting its launch file, so that the resumed driver reported to the
            # other Redis (issue 27 item 11: /metrics lost every step after the outage).
            if redis_endpoint(job.env.get("RLHF_REDIS_URL")) != ours:
                continue
            rec = await self.store.get(job.job_id)
            if not job.tenant or (rec is not None and rec.get("tenant")):  # (a driver's writes alone leave a hash without one)
                continue
            try:
                spec = json.loads(job.env.get("RLHF_SPEC_JSON") or "{}")
            except ValueError:
                spec = {}
            note = (f"record rebuilt from Ray's job {job.submission_id} after the control plane's Redis lost it; "
                    "events and metrics reported before then are gone")
            if not await self.store.rebuild(job.job_id, job.tenant, job.name, spec, job.submission_id, job.attempt - 1, job.started_at, note,
                                            demand=_demand(spec)):
                continue
            password = urlsplit(job.env.get("RLHF_REDIS_URL") or "").password
            if password and self.settings.job_credentials == "acl":
                await self.store.restore_job_user(job.job_id, unquote(password))
            log.warning("rebuilt the lost record of job %s (tenant %s) from Ray's job %s", job.job_id, job.tenant, job.submission_id)
            rebuilt += 1
        return rebuilt

    # --- admission -------------------------------------------------------------------------------

    async def capacity(self) -> Capacity | None:
        """The cluster's resources, asked at most every CAPACITY_TTL_S; the last known while Ray is away."""
        now = time.monotonic()
        if self._capacity is None or now - self._capacity[0] > self.CAPACITY_TTL_S:
            try:
                self._capacity = (now, await self.launcher.capacity())
            except RayUnavailable as err:
                log.warning("admission: %s", err)
                return self._capacity[1] if self._capacity else None
            try:
                held = await asyncio.wait_for(asyncio.to_thread(pool_resources, self.settings.ray_address), 15)
                self._pool_cpus, self._pool_gpus = held["CPU"], held["GPU"]
            except Exception as err:  # noqa: BLE001  (Ray's state API away, whatever it raises: the last count stands)
                log.warning("admission: the Tinker pools' CPUs and GPUs could not be counted (%s: %s)", type(err).__name__, err)
        return self._capacity[1]

    async def admit(self, ids: list[str], ending: list[dict[str, Any]] = ()) -> None:
        """`ending`: records of jobs that reported they ended while their Ray jobs still run (they hold what they held).
        One API process at a time admits; the others skip the round. Under the lock the active jobs are listed and read
        again (another process may have admitted some since `ids` was listed), and the lock is renewed before each
        submission; a round that lost it stops (another process decides from there)."""
        if not any(r is not None and waiting_for_admission(r) for r in [await self.store.get(i) for i in ids]):
            return
        lock = self.store.admission_lock()
        if not await lock.acquire():
            return
        try:
            await self._admit(await self.store.active_ids(), ending, lock)
        except LockError:
            log.warning("admission: a round outlasted its lock (%.0f s); the next round goes on", CLAIM_S)
        finally:
            try:
                await lock.release()
            except LockError:  # held past its timeout (a Ray that took long to answer): another may hold it now
                log.warning("admission: a round outlasted its lock (%.0f s)", CLAIM_S)

    async def _admit(self, ids: list[str], ending: list[dict[str, Any]], lock) -> None:
        recs = [r for r in [await self.store.get(i) for i in ids] if r is not None and r["status"] not in TERMINAL]
        waiting = [r for r in recs if waiting_for_admission(r)]
        if not waiting:
            return
        admitted = [r for r in recs if not waiting_for_admission(r)] + [r for r in ending if r["id"] not in ids]
        capacity = await self.capacity()
        if self._pool_cpus or self._pool_gpus:  # the Tinker API's adapter pools hold part of the same cluster (as last asked)
            held = {"CPU": self._pool_cpus, **({"GPU": self._pool_gpus} if self._pool_gpus else {})}
            admitted.append({"id": "tinker-pools", "tenant": "", "priority": 0, "seq": 0, "demand": [held]})
        quotas = {t: Quota(**q.model_dump()) for t, q in self.settings.quotas.items()}
        decision = admission.decide(waiting, admitted, capacity, quotas, Quota(**self.settings.default_quota.model_dump()))
        by_id = {r["id"]: r for r in waiting}
        for job_id in decision.admit:
            await lock.reacquire()  # (LockNotOwnedError, a LockError, once another process may hold it)
            if not await self._submit(by_id[job_id]):
                break  # Ray away: the rest wait for the next round
        for job_id, (position, reason) in decision.waiting.items():
            queue = {"position": position, "reason": reason}
            if by_id[job_id].get("queue") != queue:
                if not by_id[job_id].get("queue"):
                    await self.store.add_event(job_id, "queued", f"waiting for admission: {reason}", position=position)
                await self.store.set_fields(job_id, queue=queue)

    async def _submit(self, rec: dict[str, Any]) -> bool:
        """Submit a waiting job to Ray; False when Ray did not answer. A submission is claimed first and its claim is
        kept (CLAIM_S) even when Ray did not answer: a submit that timed out may still reach Ray, and only once the
        claim has lapsed does a round ask Ray whether it has the job before sending it again."""
        job_id, tenant = rec["id"], rec["tenant"]
        if not await self.store.claim_submission(job_id):
            log.warning("admission: job %s is being submitted by another API process", job_id)
            return True
        try:
            if await self._in_ray(job_id):  # a submit whose answer was lost (it timed out, or its process died) reached Ray
                log.warning("admission: Ray already has job %s; recorded as admitted, not sent again", job_id)
            else:
                user = await self.store.job_user(job_id) if self.settings.job_credentials == "acl" else None
                await self.launcher.submit(job_id, tenant, rec.get("name") or "", rec["launch_spec"], redis_user=user)
        except RayUnavailable as err:
            await self.store.set_fields(job_id, queue={"position": 1, "reason": f"Ray is unavailable: {err}"})
            return False
        waited = time.time() - (rec["created_at"] or time.time())
        await self.store.set_fields(job_id, admitted_at=time.time(), queue=None)
        await self.store.add_event(job_id, "admitted", f"admitted after {waited:.1f} s in the queue: submitted to Ray", waited_s=waited)
        after = await self.store.get(job_id)
        if after is not None and after["status"] in TERMINAL:  # cancelled while it was being submitted
            await self.launcher.stop(job_id)
        return True

    async def resubmit(self, rec: dict[str, Any], decision: Resubmit) -> None:
        """Submit a job whose driver died to Ray again, resuming from its last checkpoint: same job id,
        same run directory, the next attempt's submission id; the restarts spent so far go with it."""
        job_id, restart = rec["id"], decision.restart
        new_id = submission_id(job_id, restart)
        if not await self.store.claim_submission(new_id):  # another API process resubmits it (the same decision)
            return
        try:
            # Ray may have it already: a round whose record of the submission was lost (Redis failed right
            # after it). Sent again, it would change the job user's password and the launch file under
            # the running attempt, and Ray would refuse it every round.
            if await self._in_ray(new_id):
                log.warning("resubmitting %s: Ray already has %s; recorded, not sent again", job_id, new_id)
            else:
                user = await self.store.job_user(job_id) if self.settings.job_credentials == "acl" else None
                await self.launcher.submit(job_id, rec["tenant"], rec.get("name") or "", rec["launch_spec"], redis_user=user,
                                           submission_id=new_id, restarts_used=restart)
        except RayUnavailable as err:  # (the claim stays until it lapses: see _submit)
            log.warning("resubmitting %s: %s (next round)", job_id, err)
            return
        allowed = max_restarts(rec)
        await self.store.set_fields(job_id, ray_submission_id=new_id, restarts=restart, resubmitted_at=time.time())
        await self.store.add_event(job_id, "restart", f"the driver died ({decision.cause}); restart {restart} of {allowed}: "
                                   f"resubmitted to Ray as {new_id}, resuming from the last checkpoint", died="driver",
                                   cause=decision.cause, restart=restart, max_restarts=allowed, ray_submission_id=new_id)
        after = await self.store.get(job_id)
        if after is not None and after["status"] in (*TERMINAL, "cancelling"):  # cancelled meanwhile
            await self.launcher.stop(new_id)

    async def _in_ray(self, submission: str) -> bool:
        """Whether Ray knows this submission id (RayUnavailable when it cannot say)."""
        try:
            await self.launcher.state(submission)
        except RayJobMissing:
            return False
        return True

    async def _still_running(self, job_id: str) -> bool:
        """A job's Redis user lives as long as the job is not terminal."""
        rec = await self.store.get(job_id)
        return rec is not None and rec["status"] not in TERMINAL

    async def _one(self, job_id: str) -> None:
        async with self._sem:
            rec = await self.store.get(job_id)
            if rec is None or rec["status"] in TERMINAL or waiting_for_admission(rec):
                return  # (decide would do nothing either: this saves asking Ray; Ray has never seen a waiting job)
            try:
                ray: RayJobState | RayUnavailable | RayJobMissing = await self.launcher.state(rec.get("ray_submission_id") or job_id)
            except (RayUnavailable, RayJobMissing) as err:
                ray = err
            now = time.time()
            since = self._unreachable.setdefault(job_id, now) if isinstance(ray, RayUnavailable) else self._unreachable.pop(job_id, None)
            unreachable_s = now - since if isinstance(ray, RayUnavailable) else 0.0
            await self.act(job_id, decide(rec, ray, now, unreachable_s, self.settings.ray_unreachable_deadline_s), rec)

    async def act(self, job_id: str, decision: Decision, rec: dict[str, Any] | None = None) -> None:
        if isinstance(decision, StopRayJob):
            await self.launcher.stop(((rec or {}).get("ray_submission_id")) or job_id)
        elif isinstance(decision, Resubmit):
            await self.resubmit(rec or await self.store.get(job_id), decision)
        elif isinstance(decision, Transition):
            error = {"error": decision.error} if decision.error is not None else {}
            if (decision.error or {}).get("code") == "ray_unreachable":
                # Failed while Ray could not be asked: if it comes back with the job still running, stop it.
                # Listed before the record says failed: no moment (or crash) shows a failed record whose job nobody will stop.
                await self.store.redis.sadd(ORPHANS_KEY, job_id)
            await self.store.transition(job_id, decision.status, decision.message, **error)

    async def confirm_ended(self) -> list[dict[str, Any]]:
        """A job's own word that it ended frees nothing: until Ray's job is seen ended too, admission
        counts what it holds, and one still running `ended_job_grace_s` after its word is stopped.
        The records of those still running."""
        running = []
        for job_id, since in (await self.store.ending()).items():
            rec = await self.store.get(job_id)
            try:
                state = await self.launcher.state((rec or {}).get("ray_submission_id") or job_id)
            except RayUnavailable:
                running += [rec] if rec else []
                continue
            except RayJobMissing:
                state = None
            if rec is None or state is None or state.status not in ("PENDING", "RUNNING"):
                await self.store.ended(job_id)
            elif time.time() - since > self.settings.ended_job_grace_s:
                await self.launcher.stop(rec.get("ray_submission_id") or job_id)
                await self.store.add_event(job_id, "warning", f"the job reported it {rec['status']}, but its Ray job ran on for "
                                           f"{time.time() - since:.0f} s (ended_job_grace_s={self.settings.ended_job_grace_s:g}): stopped")
                await self.store.ended(job_id)
            else:
                running.append(rec)
        return running

    async def stop_orphans(self) -> None:
        """Stop the Ray jobs of records failed while Ray was unreachable, once Ray answers again: no job
        outlives its record."""
        for job_id in await self.store.redis.smembers(ORPHANS_KEY):
            try:
                await self.launcher.stop(job_id)
            except RayUnavailable:
                return  # still away: next round
            except RayJobMissing:
                pass
            await self.store.redis.srem(ORPHANS_KEY, job_id)
