"""The reconciler's decisions (`api.reconciler.decide`): a job record and Ray's answer in, what to
do out. Pure values: no Ray, no Redis."""

import pytest

from api.launcher import RayJobMissing, RayJobState, RayUnavailable
from api.reconciler import MISSING_GRACE_S, Resubmit, StopRayJob, Transition, decide, submission_id

NOW = 1_000_000.0
RAY_STATUSES = ("PENDING", "RUNNING", "STOPPED", "SUCCEEDED", "FAILED")
LIVE = ("queued", "starting", "running", "cancelling")


def record(status: str, created_at: float | None = NOW - 5) -> dict:
    return {"id": "job-abc", "status": status, "created_at": created_at}


def ray(status: str, message: str = "") -> RayJobState:
    return RayJobState(status, message, None)


STARTING = Transition("starting", "starting: the Ray job's driver is running")
SUCCEEDED = Transition("succeeded", "succeeded (reported by Ray)")
CANCELLED = Transition("cancelled", "cancelled: the Ray job was stopped")
DRIVER_FAILED = Transition(
    "failed", "failed: driver ended without reporting: Job entrypoint command failed with exit code 1",
    {"code": "driver_failed", "message": "driver ended without reporting: Job entrypoint command failed with exit code 1"},
)
EXIT_1 = "Job entrypoint command failed with exit code 1, last available logs (truncated to 20,000 chars):\nTraceback ..."

# Every (record status, Ray status) pair of a live job, by hand.
TABLE = {
    ("queued", "PENDING"): None,
    ("queued", "RUNNING"): STARTING,
    ("queued", "STOPPED"): CANCELLED,
    ("queued", "SUCCEEDED"): SUCCEEDED,
    ("queued", "FAILED"): DRIVER_FAILED,
    ("starting", "PENDING"): None,
    ("starting", "RUNNING"): None,  # the driver reports `running` itself
    ("starting", "STOPPED"): CANCELLED,
    ("starting", "SUCCEEDED"): SUCCEEDED,
    ("starting", "FAILED"): DRIVER_FAILED,
    ("running", "PENDING"): None,
    ("running", "RUNNING"): None,
    ("running", "STOPPED"): CANCELLED,
    ("running", "SUCCEEDED"): SUCCEEDED,
    ("running", "FAILED"): DRIVER_FAILED,
    # A cancel whose stop Ray has not acted on yet: stop again.
    ("cancelling", "PENDING"): StopRayJob(),
    ("cancelling", "RUNNING"): StopRayJob(),
    ("cancelling", "STOPPED"): CANCELLED,
    ("cancelling", "SUCCEEDED"): SUCCEEDED,
    # The driver died of the stop (SIGTERM, then SIGKILL): that is the cancel, not a failure.
    ("cancelling", "FAILED"): CANCELLED,
}


def test_table_covers_every_live_pair():
    assert set(TABLE) == {(s, r) for s in LIVE for r in RAY_STATUSES}


@pytest.mark.parametrize(("status", "ray_status"), sorted(TABLE))
def test_live_job_with_ray_state(status, ray_status):
    assert decide(record(status), ray(ray_status, EXIT_1), NOW) == TABLE[(status, ray_status)]


@pytest.mark.parametrize("status", ["succeeded", "failed", "cancelled"])
@pytest.mark.parametrize("answer", [ray("FAILED", EXIT_1), ray("STOPPED"), ray("RUNNING"), RayJobMissing("x"), RayUnavailable("x")])
def test_terminal_record_never_changes(status, answer):
    assert decide(record(status, created_at=0.0), answer, NOW) is None


@pytest.mark.parametrize("status", LIVE)
def test_ray_unavailable_decides_nothing(status):
    # Even for a job long past the grace period: an unreachable Ray says nothing about the job.
    assert decide(record(status, created_at=NOW - 10 * MISSING_GRACE_S), RayUnavailable("connection refused"), NOW) is None


@pytest.mark.parametrize("status", LIVE)
def test_ray_unreachable_past_the_deadline_fails_the_job(status):
    down = RayUnavailable("connection refused")
    assert decide(record(status), down, NOW, unreachable_s=599.0, deadline_s=600.0) is None
    assert decide(record(status), down, NOW, unreachable_s=600.0, deadline_s=600.0) is None  # exactly at the deadline
    failed = decide(record(status), down, NOW, unreachable_s=600.5, deadline_s=600.0)
    assert failed == Transition("failed", "failed: Ray unreachable", {
        "code": "ray_unreachable",
        "message": "Ray did not answer about this job for 600 s (last: connection refused); the job is presumed lost with it"})


@pytest.mark.parametrize("status", LIVE)
def test_job_missing_from_ray_is_lost_only_after_the_grace_period(status):
    missing = RayJobMissing("no such job")
    lost = Transition("failed", "failed: lost by Ray",
                      {"code": "ray_job_lost", "message": "Ray has no job job-abc (was the Ray cluster replaced?)"})
    assert decide(record(status, created_at=NOW - 1), missing, NOW) is None  # just submitted: Ray may not list it yet
    assert decide(record(status, created_at=NOW - MISSING_GRACE_S), missing, NOW) is None  # exactly at the limit
    assert decide(record(status, created_at=NOW - MISSING_GRACE_S - 0.5), missing, NOW) == lost


def test_job_missing_without_a_creation_time_counts_from_zero():
    assert decide(record("queued", created_at=None), RayJobMissing("x"), NOW).status == "failed"
    assert decide(record("queued", created_at=None), RayJobMissing("x"), MISSING_GRACE_S) is None


@pytest.mark.parametrize(("message", "reported"), [
    (EXIT_1, "Job entrypoint command failed with exit code 1"),
    ("", "the Ray job failed"),
    ("   ", "the Ray job failed"),
    ("Job supervisor actor died.\nmore detail", "Job supervisor actor died"),
    ("Unexpected error: node lost: ", "Unexpected error: node lost"),
])
def test_driver_failure_message_is_the_first_line_of_rays(message, reported):
    decision = decide(record("running"), ray("FAILED", message), NOW)
    assert decision == Transition("failed", f"failed: driver ended without reporting: {reported}",
                                  {"code": "driver_failed", "message": f"driver ended without reporting: {reported}"})


def test_unknown_ray_status_decides_nothing():
    # Ray may add statuses; an unknown one must not end a job.
    assert all(decide(record(s), ray("SOMETHING_NEW"), NOW) is None for s in ("queued", "starting", "running"))
    assert decide(record("cancelling"), ray("SOMETHING_NEW"), NOW) is None


def launched(status: str, restarts: int = 0, max_restarts: int | None = None, **extra) -> dict:
    """A record as the admission queue keeps it: with the spec it launched (fault_tolerance as given)."""
    section = {} if max_restarts is None else {"fault_tolerance": {"max_restarts": max_restarts}}
    return {**record(status), "launch_spec": {"name": "x", **section}, "restarts": restarts, "admitted_at": NOW - 4, **extra}


@pytest.mark.parametrize("status", ["queued", "starting", "running"])
def test_a_driver_that_died_is_resubmitted_while_restarts_are_left(status):
    # Default budget (3): the first three losses are restarts 1, 2, 3; the fourth fails the job, naming the budget.
    for used in range(3):
        assert decide(launched(status, restarts=used), ray("FAILED", EXIT_1), NOW) == Resubmit(
            used + 1, "driver ended without reporting: Job entrypoint command failed with exit code 1")
    message = ("driver ended without reporting: Job entrypoint command failed with exit code 1 "
               "(no restart left: fault_tolerance.max_restarts=3, 3 used)")
    assert decide(launched(status, restarts=3), ray("FAILED", EXIT_1), NOW) == Transition(
        "failed", f"failed: {message}", {"code": "driver_failed", "message": message})


def test_max_restarts_zero_fails_at_once_and_a_cancel_is_never_resubmitted():
    assert decide(launched("running", max_restarts=0), ray("FAILED", EXIT_1), NOW) == DRIVER_FAILED
    assert decide(launched("running", max_restarts=1), ray("FAILED", EXIT_1), NOW) == Resubmit(
        1, "driver ended without reporting: Job entrypoint command failed with exit code 1")
    assert decide(launched("cancelling", restarts=0), ray("FAILED", EXIT_1), NOW) == CANCELLED
    assert decide(launched("running"), ray("STOPPED"), NOW) == CANCELLED


def test_a_resubmitted_attempt_gets_its_grace_period_again():
    # Submitted long ago, resubmitted a moment ago: Ray may not list the new attempt yet.
    rec = launched("running", restarts=1, admitted_at=NOW - 10 * MISSING_GRACE_S, resubmitted_at=NOW - 1)
    assert decide(rec, RayJobMissing("x"), NOW) is None
    assert decide({**rec, "resubmitted_at": NOW - MISSING_GRACE_S - 1}, RayJobMissing("x"), NOW).status == "failed"


def test_attempts_have_their_own_submission_ids():
    assert [submission_id("job-abc", r) for r in range(3)] == ["job-abc", "job-abc-attempt2", "job-abc-attempt3"]


def test_chores_come_round_by_time_however_long_the_rounds(monkeypatch):
    """Looking for lost records every ADOPT_EVERY intervals means seconds, not rounds: a round that
    waits on a busy Ray (seconds, not the interval's 0.5 s) must not push a rebuild past a minute."""
    from api.reconciler import Reconciler
    from api.settings import Settings

    clock = [100.0]
    monkeypatch.setattr("api.reconciler.time.monotonic", lambda: clock[0])
    rec = Reconciler(None, None, Settings(reconcile_interval_s=0.5))
    period = Reconciler.ADOPT_EVERY * 0.5
    assert rec._due("adopt", Reconciler.ADOPT_EVERY)  # at the first round
    ran = []
    for _ in range(10):  # rounds of 3 s each
        clock[0] += 3.0
        ran.append(rec._due("adopt", Reconciler.ADOPT_EVERY))
    assert ran == [False, False, False, True, False, False, False, True, False, False]  # at 12 and 24 s: the first round >= 10 s on
    clock[0] += 6.0
    assert rec._due("adopt", Reconciler.ADOPT_EVERY)  # (12 s after the last)
    clock[0] += period - 0.01
    assert not rec._due("adopt", Reconciler.ADOPT_EVERY)
    clock[0] += 0.01
    assert rec._due("adopt", Reconciler.ADOPT_EVERY)
    assert rec._due("sweep", Reconciler.SWEEP_EVERY)  # chores keep their own clocks


def test_the_apis_first_calls_to_ray_from_threads_at_once_all_import_it():
    """The API imports Ray lazily, in worker threads. Its first POST /v1/jobs asked Ray for the capacity while its
    reconciler asked about a job: two threads importing Ray for the first time at once, one saw it partly initialised
    (ImportError: ... partially initialized module 'ray.util') and the request was a 500 (4 of the slow tier's API tests).
    In a fresh interpreter, the two imports from two threads at once: without `import_ray` first one fails every time
    here, with it neither does."""
    import subprocess
    import sys

    def run(first: str) -> str:
        code = f"""
import threading
from api.launcher import import_ray
barrier, errors = threading.Barrier(2), []
def each(line):
    barrier.wait()
    try:
        {first}
        exec(line)
    except Exception as err:
        errors.append(repr(err)[:200])
threads = [threading.Thread(target=each, args=(line,)) for line in
           ("from ray.util.state import list_nodes", "from ray.job_submission import JobSubmissionClient")]
[t.start() for t in threads]
[t.join(120) for t in threads]
print("import errors:", errors)
"""
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180).stdout

    assert "import errors: []" not in run("pass"), "the race did not show (else this test shows nothing)"
    for _ in range(3):
        out = run("import_ray()")
        assert "import errors: []" in out, out[-2000:]


def test_every_lazy_import_of_ray_in_the_api_goes_through_import_ray():
    """Each `import ray` / `from ray...` in api/ (but import_ray's own) follows a use of import_ray in its function (or of
    Pools._connect, which runs it first)."""
    import ast
    from pathlib import Path

    missing = []
    for path in sorted(Path("api").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for fn in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name != "import_ray"]:
            calls = [n.lineno for n in ast.walk(fn) if isinstance(n, (ast.Name, ast.Attribute))
                     and (getattr(n, "id", None) == "import_ray" or getattr(n, "attr", None) == "_connect")]
            for node in ast.walk(fn):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                if any(n == "ray" or n.startswith("ray.") for n in names) and not any(line < node.lineno for line in calls):
                    missing.append(f"{path}:{node.lineno}")
    assert not missing, missing
