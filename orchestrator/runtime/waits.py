"""One timed wait for every call on an actor (and for work of the driver's own threads).

Every stage kind, held-out evaluation, checkpoints and weight sync wait through `wait`, bounded by
`fault_tolerance.call_timeout_s`: a hung actor fails the job with a `timeout` error naming the
phase instead of holding its resources forever. tests/test_layers.py checks that no other module
calls `ray.get` or waits on a ref without a deadline.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

import ray
from ray.exceptions import GetTimeoutError


class PhaseTimeout(TimeoutError):
    """A phase took longer than `fault_tolerance.call_timeout_s` (or the actors' start than `start_timeout_s`)."""


def wait(refs, phase: str, limit: float | None, step: int | None = None, setting: str = "fault_tolerance.call_timeout_s"):
    """`ray.get(refs)` (or a `Future`'s result), bounded by `limit` seconds (None: no bound); past it a
    PhaseTimeout naming `phase` (and `step`, if given) and the `setting` that set the limit. A call that failed (its actor lost) raises as
    soon as it is known, not after its peers, which may be blocked on it in a collective (DDP's
    all-reduce) until they time out."""
    of_step = f" of step {step}" if step else ""

    def timed_out() -> PhaseTimeout:
        return PhaseTimeout(f"the {phase} phase{of_step} did not finish within {setting}={limit:g} s")

    if isinstance(refs, Future):  # computed in this process (rewards in the driver)
        try:
            return refs.result(timeout=limit)
        except FutureTimeout:
            raise timed_out() from None
    deadline = None if limit is None else time.monotonic() + limit

    def left() -> float | None:
        return None if deadline is None else max(deadline - time.monotonic(), 0)

    pending = list(refs) if isinstance(refs, list) else [refs]
    while len(pending) > 1:
        ready, pending = ray.wait(pending, num_returns=1, timeout=left())
        if not ready:
            break
        ray.get(ready)  # raises if that call failed
    try:
        return ray.get(refs, timeout=left())
    except GetTimeoutError:
        raise timed_out() from None
