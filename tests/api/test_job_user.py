"""A job's own Redis user (`JobStore.job_user`) reaches its job's three keys and nothing else, and
what a job writes there moves no decision of the control plane. Real redis-server, the real API
(its reconciler brings the shared indexes in line and recreates lost users), and the driver's real
reporter holding the job's credentials."""

from __future__ import annotations

import json
import time

import pytest
import redis

from api.store import JOB_USER_PREFIX, JobStore
from orchestrator.core.records import (
    ACTIVE_KEY,
    COUNTS_KEY,
    control_key,
    effective_status,
    events_key,
    job_key,
    metrics_key,
    tenant_jobs_key,
    tenant_status_key,
)
from orchestrator.reporting.redis_reporter import RedisReporter
from tests.api.conftest import (
    api_settings,
    in_process,
    make_record,
    run_async,
    tenant_client,
    wait_until,
)


def admitted_job(redis_url: str, tenant: str, name: str) -> tuple[str, str]:
    """A job record as the admission queue leaves it (launch spec, admitted, its own Redis user): (job id,
    the Redis URL its processes get)."""
    import uuid

    job_id = "job-" + uuid.uuid4().hex[:24]

    async def go():
        store = JobStore(redis_url)
        try:
            await store.create(job_id, tenant, name, {"name": name}, {}, None, launch_spec={"name": name, "output_dir": f"/runs/{job_id}"},
                               demand=[{"CPU": 1.0}], priority=0)
            await store.set_fields(job_id, admitted_at=time.time())
            return await store.job_user(job_id)
        finally:
            await store.close()

    user, password = run_async(go())
    return job_id, redis_url.replace("redis://", f"redis://{user}:{password}@")


@pytest.fixture(scope="module")
def reconciling(redis_url, keys, operator):
    """The API in this process with its reconciler (no Ray): it brings the shared indexes in line and recreates lost users."""
    with in_process(api_settings(redis_url, keys["path"], operator, reconcile=True)) as api:
        yield api


alpha, beta = tenant_client("reconciling", "alpha"), tenant_client("reconciling", "beta")


@pytest.fixture()
def mine(redis_url):
    return admitted_job(redis_url, "alpha", "mine")


def listed(client, status: str) -> list[str]:
    return [j["id"] for j in client.get("/v1/jobs", params={"status": status, "limit": 100}).json()["data"]]


@pytest.mark.parametrize(("reported", "indexed", "effective"), [
    ("running", "starting", "running"), ("succeeded", "running", "succeeded"), ("failed", "cancelling", "failed"),
    ("queued", "running", "running"),  # taken back: not by the job
    ("running", "cancelling", "cancelling"), ("running", "failed", "failed"), ("succeeded", "cancelled", "cancelled"),
    ("bogus", "running", "running"), (None, "queued", "queued"),
    ("running", None, "running"),  # (no control hash: a driver's writes alone)
])
def test_a_reported_status_counts_only_as_a_forward_move(reported, indexed, effective):
    assert effective_status(reported, indexed) == effective


def test_a_jobs_user_reaches_its_own_keys_only(mine, redis_url):
    job_id, url = mine
    theirs = make_record(redis_url, "beta", "theirs")
    job = redis.Redis.from_url(url, decode_responses=True)
    denied = [
        # the keyspace: every tenant's job and file ids
        ("SCAN", "0"), ("KEYS", "*"), ("RANDOMKEY",), ("DBSIZE",),
        # what the control plane shares: the active set (removing a queued job there left it queued for good), counters, indexes
        ("SMEMBERS", ACTIVE_KEY), ("SREM", ACTIVE_KEY, theirs), ("HINCRBY", COUNTS_KEY, "running", 1),
        ("ZRANGE", tenant_status_key("alpha", "queued"), 0, -1), ("DEL", tenant_status_key("alpha", "queued")),
        ("ZREM", tenant_status_key("beta", "queued"), theirs), ("ZADD", tenant_jobs_key("beta"), 1, job_id),
        # another job, its own control hash, and scripts (a script's endless loop would hold Redis from every tenant)
        ("HGETALL", job_key(theirs)), ("HSET", job_key(theirs), "status", "failed"), ("XADD", events_key(theirs), "*", "data", "{}"),
        ("HSET", control_key(job_id), "tenant", "beta"), ("HGETALL", control_key(job_id)),
        ("EVAL", "return 1", 0), ("FUNCTION", "LIST"), ("CONFIG", "GET", "maxmemory"), ("ACL", "LIST"), ("FLUSHALL",),
    ]
    allowed = []
    for command in denied:
        try:
            job.execute_command(*command)
            allowed.append(command[0])
        except redis.exceptions.NoPermissionError:
            pass
    assert allowed == []
    # Its own keys, as the reporter uses them:
    assert job.hget(job_key(job_id), "tenant") == "alpha"
    assert job.xadd(metrics_key(job_id), {"data": json.dumps({"step": 1, "time": 1.0, "values": {}})})
    assert len(job.xrange(metrics_key(job_id))) == 1


def test_the_reporter_with_a_jobs_user_reports_and_the_control_plane_indexes_it(mine, alpha, capfd):
    job_id, url = mine
    assert job_id in listed(alpha, "queued")
    rep = RedisReporter(url, job_id)
    try:
        rep.event("status", "starting", status="starting", job_id=job_id)
        rep.event("status", "running", status="running", total_steps=3)
        for step in (1, 2, 3):
            rep.metrics(step, {"reward/mean": step / 10})
        rep.event("restart", "an actor died", restart=1)
        rep.rewind(2)
        rep.metrics(3, {"reward/mean": 0.5})
    finally:
        rep.close()
    assert "could not write" not in capfd.readouterr().err
    # The shared indexes follow what the job reported (the API's reconciler settles them): listing by status works.
    wait_until(lambda: job_id in listed(alpha, "running") and job_id not in listed(alpha, "queued"), 30, "the job listed as running")
    job = alpha.get(f"/v1/jobs/{job_id}").json()
    assert (job["status"], job["step"], job["total_steps"], job["restarts"]) == ("running", 3, 3, 1)
    assert job["metrics"] == {"reward/mean": 0.5}
    metrics = alpha.get(f"/v1/jobs/{job_id}/metrics").json()["data"]
    assert [(m["step"], m["values"]) for m in metrics] == [(1, {"reward/mean": 0.1}), (2, {"reward/mean": 0.2}), (3, {"reward/mean": 0.5})]
    events = alpha.get(f"/v1/jobs/{job_id}/events").json()["data"]
    assert [e["data"]["status"] for e in events if e["type"] == "status"] == ["queued", "starting", "running"]

    rep = RedisReporter(url, job_id)
    try:
        rep.event("status", "running", status="running")  # late: not applied, no event
        rep.event("status", "succeeded", status="succeeded", step=3)
    finally:
        rep.close()
    wait_until(lambda: job_id in listed(alpha, "succeeded"), 30, "the job listed as succeeded")
    assert job_id not in listed(alpha, "running")
    events = alpha.get(f"/v1/jobs/{job_id}/events").json()["data"]
    assert [e["data"]["status"] for e in events if e["type"] == "status"] == ["queued", "starting", "running", "succeeded"]


def test_what_a_job_writes_into_its_record_moves_no_decision_of_the_control_plane(mine, redis_url, alpha, beta):
    job_id, url = mine

    async def run_it():
        store = JobStore(redis_url)
        try:
            await store.transition(job_id, "running", "running")
        finally:
            await store.close()

    run_async(run_it())
    job = redis.Redis.from_url(url, decode_responses=True)
    # Everything its user may write into its own hash: the tenant, the spec it is resubmitted with,
    # what admission counts, its Ray job, its restarts; a status taken back; numbers that are not.
    job.hset(job_key(job_id), mapping={
        "tenant": "beta", "launch_spec": json.dumps({"name": "evil", "output_dir": "/etc"}), "demand": "[]", "priority": 100,
        "admitted_at": "", "ray_submission_id": "job-someone-else", "seq": 1, "status": "queued", "restarts": -5,
        "step": "many", "metrics": "{not json", "created_at": "[",
    })
    assert beta.get(f"/v1/jobs/{job_id}").status_code == 404
    assert job_id not in listed(beta, "running") and job_id not in listed(beta, "queued")
    shown = alpha.get(f"/v1/jobs/{job_id}")
    assert shown.status_code == 200, shown.text
    assert (shown.json()["status"], shown.json()["priority"], shown.json()["ray_submission_id"]) == ("running", 0, job_id)
    assert job_id in listed(alpha, "running")

    async def read():
        store = JobStore(redis_url)
        try:
            return await store.get(job_id)
        finally:
            await store.close()

    rec = run_async(read())
    assert rec["tenant"] == "alpha" and rec["launch_spec"] == {"name": "mine", "output_dir": f"/runs/{job_id}"}
    assert rec["demand"] == [{"CPU": 1.0}] and rec["admitted_at"] is not None and rec["restarts"] == 0
    assert rec["step"] is None and rec["metrics"] is None  # garbage reads as unset: no reader fails on it


def test_a_job_user_redis_lost_comes_back_with_the_password_the_job_holds(mine, redis_url, reconciling):
    job_id, url = mine
    admin = redis.Redis.from_url(redis_url)
    job = redis.Redis.from_url(url)
    assert job.ping()
    admin.execute_command("ACL", "DELUSER", JOB_USER_PREFIX + job_id)  # as a Redis restarted from its AOF forgets it
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis.from_url(url).ping()

    def pings():
        try:
            return redis.Redis.from_url(url).ping()
        except redis.exceptions.AuthenticationError:
            return False

    wait_until(pings, 30, f"the API's reconciler to recreate the Redis user of job {job_id}")
    with pytest.raises(redis.exceptions.NoPermissionError):  # as narrow as before
        redis.Redis.from_url(url).execute_command("SCAN", "0")


def test_the_shipped_redis_keeps_job_users_across_a_restart(tmp_path):
    """docker-compose.yml's Redis (an ACL file beside the AOF, as deploy/k8s/redis.yaml has too), run
    here: a job's user is back with the restarted Redis, before any reconciler round."""
    import subprocess

    import yaml

    from tests.conftest import ROOT, free_port, stop_group

    command = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["redis"]["command"]
    assert command[0] == "redis-server" and "--aclfile" in command
    args = [str(tmp_path / a.removeprefix("/data/")) if a.startswith("/data/") else a for a in command[1:]]
    (tmp_path / "users.acl").touch()  # (the entrypoint's touch)
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"

    def start():
        proc = subprocess.Popen(["redis-server", *args, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_until(redis.Redis(port=port).ping, 15, f"redis-server on port {port}")
        return proc

    server = start()
    try:
        job_id, job_url = admitted_job(url, "alpha", "kept")
        server.terminate()
        server.wait(15)
        server = start()
        assert redis.Redis.from_url(job_url).hget(job_key(job_id), "tenant") == b"alpha"
        with pytest.raises(redis.exceptions.NoPermissionError):
            redis.Redis.from_url(job_url).execute_command("DBSIZE")
    finally:
        stop_group(server)


@pytest.mark.slow  # (a Ray job of its own, and an API of its own)
def test_a_job_that_says_it_ended_while_its_ray_job_runs_on_is_stopped(redis_url, ray_head, keys, operator, tmp_path):
    """A job's own `succeeded` takes it out of the active set; its Ray job still holds what it held:
    counted by admission until Ray's job ends, and stopped past `ended_job_grace_s`."""
    from ray.job_submission import JobSubmissionClient

    from tests.api.conftest import ApiServer, api_env
    from tests.conftest import free_port

    job_id, url = admitted_job(redis_url, "alpha", "liar")
    ray = JobSubmissionClient(ray_head.dashboard)
    ray.submit_job(entrypoint="sleep 600", submission_id=job_id)
    port = free_port()
    server = ApiServer(api_env(redis_url, ray_head, keys["path"], port, operator, RLHF_API_ENDED_JOB_GRACE_S="3"), port, tmp_path / "api.log")
    server.start()
    try:
        wait_until(lambda: ray.get_job_status(job_id).value == "RUNNING", 60, f"Ray job {job_id} running")
        rep = RedisReporter(url, job_id)
        rep.event("status", "running", status="running")
        rep.event("status", "succeeded", status="succeeded")
        rep.close()
        wait_until(lambda: ray.get_job_status(job_id).value == "STOPPED", 90, f"Ray job {job_id} stopped")
        with server.client(keys["alpha"]) as c:
            job = c.get(f"/v1/jobs/{job_id}").json()
            events = c.get(f"/v1/jobs/{job_id}/events").json()["data"]
        assert job["status"] == "succeeded"  # (a terminal status never changes)
        warnings = [e["message"] for e in events if e["type"] == "warning"]
        assert len(warnings) == 1 and warnings[0].startswith("the job reported it succeeded, but its Ray job ran on for "), events
        assert warnings[0].endswith(" s (ended_job_grace_s=3): stopped")
    finally:
        server.stop()
        if ray.get_job_status(job_id).value in ("PENDING", "RUNNING"):
            ray.stop_job(job_id)


def test_a_record_from_before_the_control_hash_is_adopted_and_its_user_narrowed(redis_url, alpha, beta):
    """A job recorded by the API before this layout (everything in one hash, its Redis user reaching
    the shared keys) reads as it did, for its tenant only; its user is narrowed, its password kept."""
    import uuid

    job_id = "job-" + uuid.uuid4().hex[:24]
    admin = redis.Redis.from_url(redis_url, decode_responses=True)
    seq, now = admin.incr("rlhf:jobs:seq"), repr(time.time())
    admin.hset(job_key(job_id), mapping={
        "id": job_id, "tenant": "alpha", "name": "old", "status": "running", "seq": seq, "created_at": now, "updated_at": now,
        "admitted_at": now, "step": 3, "spec": json.dumps({"name": "old"}), "metadata": "{}", "ray_submission_id": job_id,
        "launch_spec": json.dumps({"name": "old"}), "demand": json.dumps([{"CPU": 1.0}])})
    admin.zadd(tenant_jobs_key("alpha"), {job_id: seq})
    admin.zadd(tenant_status_key("alpha", "running"), {job_id: seq})
    admin.hincrby(COUNTS_KEY, "running", 1)
    admin.sadd(ACTIVE_KEY, job_id)
    admin.execute_command("ACL", "SETUSER", JOB_USER_PREFIX + job_id, "on", ">old-password", f"~{job_key(job_id)}", f"~{ACTIVE_KEY}", "+@all")
    old_user = redis.Redis.from_url(redis_url.replace("redis://", f"redis://{JOB_USER_PREFIX}{job_id}:old-password@"))
    assert old_user.scard(ACTIVE_KEY) >= 1  # (what it could do)

    shown = alpha.get(f"/v1/jobs/{job_id}")
    assert shown.status_code == 200, shown.text
    assert (shown.json()["status"], shown.json()["step"], shown.json()["name"]) == ("running", 3, "old")
    assert beta.get(f"/v1/jobs/{job_id}").status_code == 404
    assert job_id in listed(alpha, "running")
    with pytest.raises(redis.exceptions.NoPermissionError):
        old_user.scard(ACTIVE_KEY)
    assert old_user.hget(job_key(job_id), "step") == b"3"  # the password its processes hold still works


def test_two_api_processes_admit_each_job_once_and_its_driver_reports_with_its_credentials(ray_head, keys, operator, tmp_path):
    """Several API processes on one Redis each run an admission round. Both used to submit the same waiting job: the
    second gave its Redis user a new password and rewrote the launch file under the driver the first had started, whose
    reports then failed to authenticate (CI: a job that succeeded showed no checkpoints), and both filled the same room.
    Now one round admits at a time and a submission is claimed first. Two jobs of 3 CPUs on 4, two processes at once:
    one job is submitted, once, and its driver (a spec that fails validation) reports its failure with its own user."""
    from tests.api.test_reporting_faults import RedisServer
    from tests.conftest import stop_group

    own = RedisServer(tmp_path)  # a Redis of its own: admission counts every active job of the Redis it admits from
    own.start()
    try:
        two_processes_admit(own.url, ray_head, keys, operator)
    finally:
        stop_group(own.proc)


def two_processes_admit(redis_url, ray_head, keys, operator) -> None:
    import asyncio
    import uuid

    from ray.job_submission import JobSubmissionClient

    from api.admission import Capacity
    from api.launcher import RayLauncher
    from api.reconciler import Reconciler

    settings = api_settings(redis_url, keys["path"], operator, ray=ray_head)
    tenant = "two-" + uuid.uuid4().hex[:8]
    ids = ["job-" + uuid.uuid4().hex[:24] for _ in range(2)]

    async def go():
        stores = [JobStore(redis_url), JobStore(redis_url)]
        try:
            for job_id in ids:
                await stores[0].create(job_id, tenant, "twice", {"name": "twice"}, {}, None, launch_spec={"name": "twice"},
                                       demand=[{"CPU": 3.0}], priority=0)
            reconcilers = [Reconciler(s, RayLauncher(settings), settings) for s in stores]
            for r in reconcilers:  # the room both see: 4 CPUs free (the head's, whatever else this session runs)
                r._capacity = (time.monotonic() + 1e6, Capacity({"CPU": 4.0, "GPU": 0.0}, {"CPU": 4.0, "GPU": 0.0}))
            await asyncio.gather(*(r.admit(ids) for r in reconcilers))
            return [await stores[0].get(i) for i in ids], [[e for _, e in (await stores[0].history(i, "events", None, 100))[0] if e["type"] == "admitted"] for i in ids]
        finally:
            for s in stores:
                await s.close()

    recs, admitted = run_async(go())
    assert sorted(len(a) for a in admitted) == [0, 1], admitted  # one job, one admission
    first = 0 if admitted[0] else 1
    assert recs[1 - first]["status"] == "queued" and "waiting for" in recs[1 - first]["queue"]["reason"], recs[1 - first]
    ray = JobSubmissionClient(ray_head.dashboard)
    wait_until(lambda: str(ray.get_job_status(ids[first])) in ("FAILED", "SUCCEEDED", "STOPPED"), 120, "the admitted job's driver to end")

    def reported():
        rec = run_async(_get(redis_url, ids[first]))
        return rec if rec["status"] == "failed" else None

    rec = wait_until(reported, 30, f"job {ids[first]}'s driver to report its failure to Redis with its own user")
    assert rec["error"]["code"] == "invalid_spec", rec["error"]
    run_async(_delete(redis_url, ids[1 - first]))


async def _get(redis_url: str, job_id: str) -> dict:
    store = JobStore(redis_url)
    try:
        return await store.get(job_id)
    finally:
        await store.close()


async def _delete(redis_url: str, job_id: str) -> None:
    store = JobStore(redis_url)
    try:
        await store.delete(job_id)
    finally:
        await store.close()
