"""Automatic recovery: which failures a job survives, and how many times.

A lost process (an actor killed, its node gone, a worker crash) is not the job's fault: the stage
tears down its actors and placement group, places them again and resumes from its last checkpoint
(pipeline.run_stage). A driver that dies is resubmitted by the control plane with `--resume`
(api/reconciler.py). Both draw on one budget, `fault_tolerance.max_restarts`: the control plane
passes what is already spent in RLHF_RESTARTS_USED. Errors of the job itself (bad data, a reward
function that raises, a model that does not load, a phase timeout) are not retried: they would
fail the same way again.
"""

from __future__ import annotations

import os
from typing import Any

from ray.exceptions import NodeDiedError, ObjectLostError, RayActorError, RayTaskError, WorkerCrashedError

RESTARTS_USED_ENV = "RLHF_RESTARTS_USED"


def lost_process(err: BaseException, names: dict[str, str]) -> str | None:
    """What died, in words (`actor job-1/reward-0 (RewardWorker)`), if `err` is the loss of a process
    rather than an error of the job; else None. `names`: actor id (hex) -> the job's name for it."""
    if isinstance(err, RayTaskError) and isinstance(getattr(err, "cause", None), BaseException):
        return lost_process(err.cause, names)
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
