"""Which failures a job recovers from (orchestrator/runtime/recovery.py), its restart budget, and the rewind
that keeps one metrics row per step when steps are redone (run directory and Redis)."""

from __future__ import annotations

import json

import pytest
import redis
from ray.exceptions import ActorDiedError, NodeDiedError, RayActorError, RayTaskError, WorkerCrashedError

from orchestrator.core.records import metrics_key
from orchestrator.runtime.recovery import RESTARTS_USED_ENV, RestartBudget, RestartsExhausted, lost_process
from orchestrator.reporting.redis_reporter import RedisReporter
from orchestrator.reporting.reporters import FileReporter, MultiReporter
from tests.conftest import read_jsonl, wait_until
from tests.test_redis_outage import start_redis
from workers.reward import RewardError

NAMES = {"ab12": "job-1/reward-0"}


def test_a_lost_actor_is_named_and_errors_of_the_job_are_not_lost_processes():
    assert lost_process(RayActorError("ab12", "The actor died unexpectedly"), NAMES) == "actor job-1/reward-0"
    assert lost_process(ActorDiedError(), NAMES).startswith("an actor (The actor died unexpectedly")
    assert lost_process(NodeDiedError("node n1 died"), NAMES) == "a node"
    assert lost_process(WorkerCrashedError(), NAMES) == "a worker process"
    # A constructor that raised (a model that does not load) would raise again: not retried.
    assert lost_process(RayActorError("ab12", "init failed", actor_init_failed=True), NAMES) is None
    # A reward function that raises is the job's own error, wrapped by Ray in a RayTaskError.
    task_error = RayTaskError("score", "Traceback ...", RewardError("bad reward"))
    assert lost_process(task_error, NAMES) is None
    assert lost_process(RayTaskError("score", "Traceback ...", RayActorError("ab12", "died")), NAMES) == "actor job-1/reward-0"
    assert lost_process(ValueError("x"), NAMES) is None


def test_the_budget_is_shared_with_earlier_attempts(monkeypatch):
    budget = RestartBudget(2, used=0)
    assert budget.take() and budget.take() and not budget.take()
    assert budget.used == 2
    monkeypatch.setenv(RESTARTS_USED_ENV, "2")  # what the control plane passes to a resubmitted driver
    later = RestartBudget(3)
    assert later.used == 2 and later.take() and not later.take()
    message, fields = later.event("actor job-1/trainer-0", RayActorError("x", "The actor died\n  pid: 7"), 4, "/ckpt/step_000004")
    assert message == ("actor job-1/trainer-0 died; restart 3 of 3: placing the actors again and resuming from checkpoint step 4")
    assert fields == {"died": "actor job-1/trainer-0", "cause": "RayActorError: The actor died pid: 7", "restart": 3,
                      "max_restarts": 3, "resume_step": 4, "path": "/ckpt/step_000004"}
    assert "from step 0 (no checkpoint yet)" in later.event("a node", NodeDiedError("node n1 died"), 0, None)[0]
    assert str(RestartsExhausted("a node", NodeDiedError("node n1 died"), later)) == (
        "a node died and no restart is left (fault_tolerance.max_restarts=3, 3 used): NodeDiedError: node n1 died")


def test_rewind_drops_the_redone_steps_in_the_run_dir_and_in_redis(tmp_path):
    from tests.conftest import free_port

    port = free_port()
    server = start_redis(port, tmp_path)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        rep = MultiReporter(FileReporter(tmp_path / "run"), RedisReporter(url, "job-rw"))
        for step in (1, 2, 3, 4):
            rep.metrics(step, {"loss": float(step)})
        rep.rewind(2)  # restarted from the checkpoint of step 2: steps 3 and 4 are redone
        for step in (3, 4, 5):
            rep.metrics(step, {"loss": 10.0 + step})
        rep.close()
        client = redis.Redis(port=port)
        wait_until(lambda: client.xlen(metrics_key("job-rw")) == 5, 15, "five metric entries")
        in_redis = [json.loads(f[b"data"]) for _, f in client.xrange(metrics_key("job-rw"))]
        assert [(m["step"], m["values"]["loss"]) for m in in_redis] == [(1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0), (5, 15.0)]
        in_file = read_jsonl(tmp_path / "run" / "metrics.jsonl")
        assert [(m["step"], m["loss"]) for m in in_file] == [(1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0), (5, 15.0)]
    finally:
        server.kill()
        server.wait(10)


@pytest.mark.parametrize("value", [-1, 101])
def test_max_restarts_is_bounded(value):
    from pydantic import ValidationError

    from orchestrator.core.spec import FaultToleranceSpec

    with pytest.raises(ValidationError, match="max_restarts"):
        FaultToleranceSpec(max_restarts=value)


# --- a Ray head restarted under a running job (issue 27, item 12) ------------------------------------

# What Ray 2.60 raises in a driver whose head was replaced, word for word (seen with a real restart below).
WRONG_CLUSTER = "RPC error: WrongClusterID: Perhaps the client is accessing GCS after it has restarted."


def test_a_replaced_head_is_the_jobs_loss_not_an_internal_error_nor_a_lost_process():
    from ray.exceptions import AuthenticationError

    from orchestrator.runtime.recovery import RayClusterLost
    from orchestrator.entrypoints.run import describe_error

    err = AuthenticationError(WRONG_CLUSTER)
    with pytest.raises(RayClusterLost, match="restarted under it"):
        lost_process(err, NAMES)  # no restart is spent on it: nothing of the job is left to place again
    code, message = describe_error(err)
    assert code == "ray_job_lost" and "WrongClusterID" in message and "token" not in message, message
    assert describe_error(RayClusterLost("x")) == ("ray_job_lost", "x")


HEAD_RESTART_DRIVER = r'''
import json, sys, time
import ray
from orchestrator.runtime.recovery import lost_process
from orchestrator.entrypoints.run import describe_error

ray.init(address=sys.argv[1], log_to_driver=False)

@ray.remote(num_cpus=0)
class Probe:
    def ping(self):
        return 1

actor = Probe.remote()
ray.get(actor.ping.remote(), timeout=60)
print("READY", flush=True)
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    try:
        ray.get(actor.ping.remote(), timeout=10)
    except Exception as err:
        try:
            died = lost_process(err, {})
            print(json.dumps({"died": died}), flush=True)
        except Exception as lost:
            print(json.dumps({"raised": type(lost).__name__, "error": describe_error(lost)}), flush=True)
        sys.exit(0)
    time.sleep(0.5)
print(json.dumps({"timeout": True}), flush=True)
'''


@pytest.mark.slow
def test_a_head_restarted_under_a_driver_is_reported_as_ray_job_lost(monkeypatch, tmp_path):
    """A real head, stopped and started again on the same ports (a new cluster id) while a driver
    runs: the driver's lost actor is classified as the cluster's loss, with no restart spent."""
    import subprocess
    import sys

    import tests.conftest as shared

    ports = [shared.free_port() for _ in range(5)]  # the same five ports for both heads

    def head():
        it = iter(ports)
        monkeypatch.setattr(shared, "free_port", lambda: next(it))
        return shared.RayHead()

    first = head().wait_up()
    log = tmp_path / "driver.out"
    second = None
    with open(log, "w") as out:
        driver = subprocess.Popen([sys.executable, "-c", HEAD_RESTART_DRIVER, first.address], cwd=shared.ROOT, stdout=out,
                                  stderr=subprocess.STDOUT, env={**shared.os.environ, **shared.RAY_ENV}, start_new_session=True)
    try:
        wait_until(lambda: "READY" in log.read_text(), 120, "the driver's actor")
        first.stop()
        second = head().wait_up()
        driver.wait(150)
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
        # RayClusterLost, never {"died": ...} (a restart spent on placing actors in a cluster that is gone).
        assert lines and lines[-1].get("raised") == "RayClusterLost", log.read_text()[-3000:]
        assert lines[-1]["error"][0] == "ray_job_lost", lines[-1]
    finally:
        shared.stop_group(driver)
        first.stop()
        if second is not None:
            second.stop()
