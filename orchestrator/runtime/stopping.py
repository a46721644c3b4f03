"""A stop asked for by a signal: the driver finishes the step it is in, saves a checkpoint, and ends
with a status that says how to resume. A second signal stops at once.

`rlhf train` (and `python -m orchestrator.entrypoints.run` outside the control plane) stops this way on SIGINT
and SIGTERM. Under the control plane (RLHF_JOB_ID set), SIGTERM is `ray job stop` cancelling the job:
that one ends it at once, as it always did (Ray kills a driver that lingers after SIGTERM).

`ray.init` installs its own SIGTERM handler, so `install()` runs again once Ray is connected.
"""

from __future__ import annotations

import os
import signal
import sys
import threading


class Cancelled(Exception):
    """The driver was asked to stop at once (SIGTERM from `ray job stop`, or a second signal)."""


class StopRequested(Exception):
    """Raised by the driver at a step boundary, after a checkpoint of that step, when a stop was asked for."""

    def __init__(self, step: int, signal_name: str):
        super().__init__(f"stopped by {signal_name} after step {step}")
        self.step, self.signal_name = step, signal_name


_asked = threading.Event()
_signal_name = ""
_now = ""  # why the run must end at once; an exception raised inside Ray's C++ (ray.get) reaches us as a SystemError


def _graceful(signum, frame) -> None:
    global _signal_name, _now
    name = signal.Signals(signum).name
    if _asked.is_set():
        _now = f"received {name} twice"
        raise Cancelled(_now)
    _signal_name = name
    _asked.set()
    print(f"\nreceived {name}: stopping after this step, with a checkpoint (send it again to stop at once)", file=sys.stderr, flush=True)


def _at_once(signum, frame) -> None:
    global _now
    _now = f"received signal {signum}"
    raise Cancelled(_now)


def cancelled() -> str | None:
    """Why the run must end at once, once a signal said so (whatever exception then surfaced)."""
    return _now or None


def install() -> None:
    """Install the handlers (in the main thread; elsewhere there is nothing to install)."""
    if threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGINT, _graceful)
    signal.signal(signal.SIGTERM, _at_once if os.environ.get("RLHF_JOB_ID") else _graceful)


def requested() -> str | None:
    """The signal's name once a stop was asked for, else None."""
    return _signal_name if _asked.is_set() else None


def reset() -> None:
    global _signal_name, _now
    _asked.clear()
    _signal_name = _now = ""
