"""Automatic recovery on the real Ray head, through the REST API: the reward actor's process, then
the trainer's (which also samples the completions) twice, SIGKILLed one after another mid-job, and the real Python driver SIGKILLed. The
job succeeds with a `restart` event per loss, and its metrics history has each step exactly once."""

import os
import signal

import pytest
from ray.util.state import list_actors

from tests.api.conftest import job_body, wait_status, wait_until
from tests.api.test_e2e import assert_nothing_left, driver_of

pytestmark = pytest.mark.slow


# Real jobs: the API as `rlhf serve` on the session's Ray head.
@pytest.fixture()
def alpha(served_alpha):
    return served_alpha


def events_of(client, job_id: str, type: str | None = None) -> list[dict]:
    events = client.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
    return [e for e in events if type is None or e["type"] == type]


def metric_steps(client, job_id: str) -> list[int]:
    return [m["step"] for m in client.get(f"/v1/jobs/{job_id}/metrics", params={"limit": 1000}).json()["data"]]


def alive_actor_pid(dashboard: str, name: str) -> int | None:
    found = list_actors(address=dashboard, filters=[("name", "=", name), ("state", "=", "ALIVE")], limit=10)
    return found[0].pid if found and found[0].pid else None


def test_lost_actors_are_placed_again_and_each_step_is_reported_once(alpha, tiny, workdir, ray_head):
    steps = 30
    body = job_body(tiny, workdir, "phoenix", steps, fault_tolerance={"max_restarts": 3}, checkpoint={"every": 2},
                    resources={"torch_threads": 1, "reward_in": "actor"})  # a reward actor to lose
    job_id = alpha.post("/v1/jobs", json=body).json()["id"]
    wait_status(alpha, job_id, {"running"}, 150)
    killed = []
    for role in ("reward", "trainer", "trainer"):  # (the trainers sample the completions: no rollout actor)
        # Training again since the last loss: a step newer than any reported before it.
        seen = max(metric_steps(alpha, job_id), default=0)
        wait_until(lambda: len(events_of(alpha, job_id, "restart")) == len(killed)
                   and len(metric_steps(alpha, job_id)) and metric_steps(alpha, job_id)[-1] > seen, 150,
                   f"job {job_id} training after {len(killed)} restarts")
        name = f"{job_id}/{role}-0"
        pid = wait_until(lambda: alive_actor_pid(ray_head.dashboard, name), 30, f"the process of actor {name}")
        os.kill(pid, signal.SIGKILL)
        killed.append(name)
        if wait_status(alpha, job_id, {"running", "succeeded", "failed"}, 5)["status"] != "running":
            pytest.fail(f"job {job_id} ended before all three kills: {events_of(alpha, job_id)[-3:]}")

    job = wait_status(alpha, job_id, {"succeeded", "failed", "cancelled"}, 300)
    events = events_of(alpha, job_id)
    assert job["status"] == "succeeded", events[-5:]
    restarts = [e["data"] for e in events if e["type"] == "restart"]
    assert [r["died"] for r in restarts] == [f"actor {name}" for name in killed], restarts
    assert [r["restart"] for r in restarts] == [1, 2, 3] and job["restarts"] == 3
    assert all(r["resume_step"] % 2 == 0 for r in restarts), restarts  # from a checkpoint (every 2 steps), or step 0
    # Each step once, in order: the first attempts of the redone steps are gone.
    assert metric_steps(alpha, job_id) == list(range(1, steps + 1))
    assert job["step"] == steps
    assert_nothing_left(job_id, ray_head)


def test_a_killed_driver_is_resubmitted_and_resumes_from_its_checkpoint(alpha, tiny, workdir, ray_head):
    steps = 16
    body = job_body(tiny, workdir, "lazarus", steps, fault_tolerance={"max_restarts": 1}, checkpoint={"every": 2})
    job_id = alpha.post("/v1/jobs", json=body).json()["id"]
    wait_status(alpha, job_id, {"running"}, 150)
    wait_until(lambda: any(e["type"] == "checkpoint" for e in events_of(alpha, job_id)) and len(metric_steps(alpha, job_id)) >= 3,
               120, f"job {job_id}'s first checkpoint")
    first = driver_of(job_id)
    assert first is not None and "python" in os.path.basename(first.cmdline()[0])  # the Python driver, not Ray's shell around it
    os.kill(first.pid, signal.SIGKILL)

    job = wait_status(alpha, job_id, {"succeeded", "failed", "cancelled"}, 300)
    events = events_of(alpha, job_id)
    assert job["status"] == "succeeded", events[-5:]
    restart = next(e["data"] for e in events if e["type"] == "restart")
    assert restart["died"] == "driver" and restart["restart"] == 1 and restart["ray_submission_id"] == f"{job_id}-attempt2"
    assert "exit code" in restart["cause"], restart
    assert job["restarts"] == 1 and job["ray_submission_id"] == f"{job_id}-attempt2"
    resumed = next(e["data"] for e in events if e["type"] == "resumed")
    assert resumed["step"] >= 2 and resumed["step"] % 2 == 0
    assert metric_steps(alpha, job_id) == list(range(1, steps + 1))
    assert_nothing_left(job_id, ray_head)


def test_a_record_redis_lost_is_rebuilt_from_ray_and_the_job_can_be_cancelled(alpha, tiny, workdir, ray_head, redis_url):
    import redis

    from api.store import JOB_USER_PREFIX, merge
    from orchestrator.core.records import (
        COUNTS_KEY,
        control_key,
        events_key,
        job_key,
        metrics_key,
        tenant_jobs_key,
        tenant_status_key,
    )

    job_id = alpha.post("/v1/jobs", json=job_body(tiny, workdir, "amnesia", 100000)).json()["id"]
    wait_status(alpha, job_id, {"running"}, 150)
    wait_until(lambda: len(metric_steps(alpha, job_id)) >= 2, 60, "two steps of metrics")

    # Redis loses the job: its record, history, index entries and Redis user (as a flushed or lost database would).
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    rec = merge(r.hgetall(job_key(job_id)), r.hgetall(control_key(job_id)))
    pipe = r.pipeline(transaction=True)
    pipe.delete(job_key(job_id), events_key(job_id), metrics_key(job_id), control_key(job_id))
    pipe.zrem(tenant_jobs_key("alpha"), job_id)
    pipe.zrem(tenant_status_key("alpha", rec["status"]), job_id)
    pipe.hincrby(COUNTS_KEY, rec["status"], -1)
    pipe.execute()
    r.execute_command("ACL", "DELUSER", JOB_USER_PREFIX + job_id)  # the driver's connection is closed with it
    assert alpha.get(f"/v1/jobs/{job_id}").status_code == 404

    # The reconciler finds the job running in Ray and records it again; the driver's reports flow again.
    job = wait_until(lambda: (j := alpha.get(f"/v1/jobs/{job_id}")).status_code == 200 and j.json(), 180, "the rebuilt record")
    assert job["status"] == "running" and job["name"] == "amnesia" and job["spec"]["name"] == "amnesia"
    recovered = events_of(alpha, job_id, "recovered")
    assert len(recovered) == 1 and "after the control plane's Redis lost it" in recovered[0]["message"], recovered
    assert job_id in [j["id"] for j in alpha.get("/v1/jobs", params={"status": "running"}).json()["data"]]
    assert merge(r.hgetall(job_key(job_id)), r.hgetall(control_key(job_id)))["demand"] == rec["demand"]  # admission counts what it holds again
    wait_until(lambda: len(metric_steps(alpha, job_id)) >= 2, 60, "metrics reported after the rebuild")

    assert alpha.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
    assert wait_status(alpha, job_id, {"cancelled", "failed", "succeeded"}, 90)["status"] == "cancelled"
    assert_nothing_left(job_id, ray_head)
