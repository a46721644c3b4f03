"""Automatic recovery: which failures a job survives, and how many times.

A lost process (an actor killed, its node gone, a worker crash) is not the job's fault: the stage
tears down its actors and placement group, places them again and resumes from its last checkpoint
(pipeline.run_stage). A driver that dies is resubmitted by the control plane with `--resume`
(api/reconciler.py). Both draw on one budget, `fault_tolerance.max_restarts`: the control plane
passes what is already spent in RLHF_RESTARTS_USED. Errors of the job itself (bad data, a reward
function that raises, a model that does not load, a phase timeout) are not retried: they would
fail the same way again. Nor is the loss of the Ray cluster itself (its head restarted under the
job: the GCS answers with another cluster id): nothing of the job is left to place again, and the
driver reports it as `ray_job_lost` (RayClusterLost), as the control plane does for a job that
Ray no longer knows.
"""

from __future__ import annotations

import os
import time
from typing import Any

from ray.exceptions import (
    AuthenticationError,
    NodeDiedError,
    ObjectLostError,
    RayActorError,
    RayTaskError,
    RpcError,
    WorkerCrashedError,
)

RESTARTS_USED_ENV = "RLHF_RESTARTS_USED"
# After a lost process, how long the driver waits for a Ray head that does not answer (restarting)
# before it calls the cluster lost. Ray's own limit for a driver cut off from its GCS is 60 s
# (gcs_rpc_server_reconnect_timeout_s), after which the driver process is ended anyway.
HEAD_WAIT_S = 30.0
_PROBE_TIMEOUT_S = 3


class RayClusterLost(RuntimeError):
    """The Ray cluster the job ran on is gone (its head restarted): code `ray_job_lost`."""


def cluster_restarted(err: BaseException) -> bool:
    """Whether `err` is Ray's answer to a driver whose GCS has been replaced: a new head (another
    cluster id) refuses the old cluster's clients with `WrongClusterID`, as an AuthenticationError."""
    if isinstance(err, RayTaskError) and isinstance(getattr(err, "cause", None), BaseException):
        return cluster_restarted(err.cause)
    return isinstance(err, AuthenticationError) and "WrongClusterID" in str(getattr(err, "message", err))


def cluster_lost_error(err: BaseException) -> RayClusterLost:
    return RayClusterLost("the Ray cluster this job ran on was restarted under it (its head answers with another cluster id, "
                          f"WrongClusterID): the job's actors and placement groups went with it; {cause_line_short(err)}")


def check_cluster(died: str, err: BaseException, wait_s: float = HEAD_WAIT_S) -> None:
    """Raise RayClusterLost if the Ray head this driver joined is gone: it answers with another
    cluster id, or not at all for `wait_s`. A lost worker node or actor leaves the head as it was."""
    import ray

    if not ray.is_initialized():
        return
    # The driver's own GCS client: it raises on a refusal, where ray.nodes() and the like abort the
    # whole process once the head has been replaced (a failed CHECK in Ray's global state accessor).
    gcs = ray._private.worker.global_worker.gcs_client
    deadline = time.monotonic() + wait_s
    while True:
        try:
            gcs.internal_kv_exists(b"rlhf-cluster-probe", None, timeout=_PROBE_TIMEOUT_S)
            return
        except AuthenticationError as probe:
            if cluster_restarted(probe):
                raise cluster_lost_error(probe) from err
            return  # another refusal: not this question's to answer; the restart meets it
        except RpcError as probe:  # no answer: the head is down (or restarting)
            if time.monotonic() > deadline:
                raise RayClusterLost(f"{died} died and the Ray head has not answered for {wait_s:.0f} s since "
                                     f"({cause_line_short(probe)}): the job is presumed lost with its cluster") from err
        time.sleep(1.0)


def lost_process(err: BaseException, names: dict[str, str]) -> str | None:
    """What died, in words (`actor job-1/reward-0 (RewardWorker)`), if `err` is the loss of a process
    that a restart can replace; else None (an error of the job). `names`: actor id (hex) -> the job's
    name for it. Raises RayClusterLost when the whole cluster went (see check_cluster)."""
    if cluster_restarted(err):
        raise cluster_lost_error(err) from err
    died = _what_died(err, names)
    if died is not None:
        check_cluster(died, err)
    return died


def _what_died(err: BaseException, names: dict[str, str]) -> str | None:
    if isinstance(err, RayTaskError) and isinstance(getattr(err, "cause", None), BaseException):
        return _what_died(err.cause, names)
    if isinstance(err, RayActorError):
        if err.actor_init_failed:  # its constructor raised: a model that does not load, a bad reward
            return None
        name = names.get(err.actor_id or "")
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return f"actor {name}" if name else f"an actor ({first})"
    if isinstance(err, NodeDiedError):
        return "a node"
    if isinstance(err, WorkerCrashedError):
        return "a worker process"
    if isinstance(err, ObjectLostError):
        return "an object's owner or its node"
    return None


def cause_line(err: BaseException) -> str:
    """The error's message as one line, for the restart event and the final error."""
    text = " ".join(line.strip() for line in str(err).strip().splitlines() if line.strip())
    return f"{type(err).__name__}: {text}"[:500]


def cause_line_short(err: BaseException) -> str:
    """Ray's own message without its advice (an AuthenticationError appends a paragraph about tokens)."""
    text = str(getattr(err, "message", None) or err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


class RestartBudget:
    """`fault_tolerance.max_restarts` for the whole job (all stages, all driver attempts)."""

    def __init__(self, max_restarts: int, used: int | None = None):
        self.max_restarts = max_restarts
        self.used = int(os.environ.get(RESTARTS_USED_ENV, "0")) if used is None else used

    def take(self) -> bool:
        """Spend one restart; False when none is left."""
        if self.used >= self.max_restarts:
            return False
        self.used += 1
        return True

    def event(self, died: str, err: BaseException, resume_step: int, resume_from: Any) -> tuple[str, dict]:
        """The `restart` event's message and fields."""
        where = f"from checkpoint step {resume_step}" if resume_from is not None else f"from step {resume_step} (no checkpoint yet)"
        message = f"{died} died; restart {self.used} of {self.max_restarts}: placing the actors again and resuming {where}"
        return message, {"died": died, "cause": cause_line(err), "restart": self.used, "max_restarts": self.max_restarts,
                         "resume_step": resume_step, **({"path": str(resume_from)} if resume_from is not None else {})}


class RestartsExhausted(RuntimeError):
    """A process was lost once more than `fault_tolerance.max_restarts` allows."""

    def __init__(self, died: str, err: BaseException, budget: RestartBudget):
        super().__init__(f"{died} died and no restart is left (fault_tolerance.max_restarts={budget.max_restarts}, "
                         f"{budget.used} used): {cause_line(err)}")
