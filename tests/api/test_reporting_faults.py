"""Reporting across Redis faults, on real jobs: a Redis of this module's own (AOF on, fsync always, as
the deploy manifests keep it), restarted under running jobs, and killed with a driver inside the
outage. Afterwards each job's history over REST is its run directory's metrics.jsonl, each step once.
A second control plane (its own Redis, the same Ray cluster and artifact store, as the session's API
is beside this module's in the full suite) looks on: it must leave this one's jobs alone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import redis

from api.storage import tenant_dirname
from orchestrator.core.records import control_key, job_key
from tests.api.conftest import (
    ARITHMETIC,
    ApiServer,
    api_env,
    job_body,
    upload,
    wait_status,
    wait_until,
)
from tests.api.test_e2e import driver_of
from tests.conftest import free_port, stop_group

pytestmark = pytest.mark.slow


class RedisServer:
    """redis-server on one port and directory, killed (SIGKILL) and started again as the same server."""

    def __init__(self, data: Path):
        self.data, self.port = data, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data), "--appendonly", "yes",
             "--appendfsync", "always", "--save", ""], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_until(redis.Redis(port=self.port).ping, 15, f"redis-server on port {self.port}")

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    stop_group(server.proc)


@pytest.fixture(scope="module")
def client(own_redis, ray_head, keys, operator, tmp_path_factory):
    port = free_port()
    server = ApiServer(api_env(own_redis.url, ray_head, keys["path"], port, operator), port, tmp_path_factory.mktemp("api") / "api.log")
    server.start()
    try:
        with server.client(keys["alpha"]) as c:
            yield c
    finally:
        server.stop()


@pytest.fixture(scope="module")
def neighbour(ray_head, keys, operator, tmp_path_factory):
    """Another control plane on the same Ray cluster and artifact store, with a Redis of its own: its
    Redis (as a client), with the API serving it meanwhile."""
    store = RedisServer(tmp_path_factory.mktemp("neighbour-redis"))
    store.start()
    port = free_port()
    server = ApiServer(api_env(store.url, ray_head, keys["path"], port, operator), port, tmp_path_factory.mktemp("neighbour") / "api.log")
    try:
        server.start()
        yield redis.Redis(port=store.port)
    finally:
        server.stop()
        stop_group(store.proc)


@pytest.fixture(scope="module")
def data(client):
    r = upload(client, ARITHMETIC)
    assert r.status_code == 201, r.text
    return {"model": "tiny", "data": r.json()["id"]}


def metric_steps(client, job_id: str) -> list[int]:
    return [m["step"] for m in client.get(f"/v1/jobs/{job_id}/metrics", params={"limit": 1000}).json()["data"]]


def run_metrics(operator: dict, job_id: str) -> Path:
    return Path(operator["RLHF_API_STORAGE_ROOT"]) / "tenants" / tenant_dirname("alpha") / "runs" / job_id / "metrics.jsonl"


def assert_history_is_the_run_directorys(client, operator: dict, job_id: str) -> None:
    served = [(m["step"], m["values"]) for m in client.get(f"/v1/jobs/{job_id}/metrics", params={"limit": 1000}).json()["data"]]
    lines = [json.loads(line) for line in run_metrics(operator, job_id).read_text().splitlines()]
    kept = [(line["step"], {k: v for k, v in line.items() if k not in ("step", "time", "stage")}) for line in lines]
    assert [s for s, _ in served] == [s for s, _ in kept], f"job {job_id}: steps over REST vs in metrics.jsonl"
    assert served == kept


def test_a_redis_restart_under_two_running_jobs_loses_none_of_their_steps(own_redis, client, data, workdir, operator):
    """ACL users are not in the AOF: the restarted Redis keeps the records and forgets the jobs' users
    until the reconciler recreates them; the drivers keep their writes meanwhile."""
    steps = 24
    ids = [client.post("/v1/jobs", json=job_body(data, workdir, f"steady-{i}", steps)).json()["id"] for i in range(2)]
    for job_id in ids:
        wait_until(lambda job_id=job_id: len(metric_steps(client, job_id)) >= 2, 240, f"two steps of job {job_id}")
    own_redis.kill()
    own_redis.start()
    for job_id in ids:
        job = wait_status(client, job_id, {"succeeded", "failed", "cancelled"}, 300)
        assert job["status"] == "succeeded" and job["step"] == steps, job
        assert_history_is_the_run_directorys(client, operator, job_id)
        assert metric_steps(client, job_id) == list(range(1, steps + 1))


def test_a_driver_killed_inside_a_redis_outage_leaves_no_step_missing(own_redis, client, data, workdir, operator, neighbour):
    """The dead driver's queued writes die with it; the resubmitted driver brings back, from the run
    directory, the steps up to its checkpoint that Redis never got. The neighbouring control plane
    neither records the job as one its Redis lost nor resubmits it: when it did, the later of the two
    resubmissions rewrote the job's launch file, and the resumed driver reported to the neighbour's
    Redis (this one's /metrics kept the steps before the outage only)."""
    steps = 24
    body = job_body(data, workdir, "blackout", steps, fault_tolerance={"max_restarts": 1}, checkpoint={"every": 2})
    job_id = client.post("/v1/jobs", json=body).json()["id"]
    wait_until(lambda: len(metric_steps(client, job_id)) >= 2, 240, f"two steps of job {job_id}")
    own_redis.kill()
    reached = len(run_metrics(operator, job_id).read_text().splitlines())
    wait_until(lambda: len(run_metrics(operator, job_id).read_text().splitlines()) >= reached + 4, 120,
               "four steps trained while Redis is down")
    driver = wait_until(lambda: driver_of(job_id), 10, f"the driver of job {job_id}")
    os.kill(driver.pid, signal.SIGKILL)
    own_redis.start()
    job = wait_status(client, job_id, {"succeeded", "failed", "cancelled"}, 300)
    assert job["status"] == "succeeded" and job["restarts"] == 1, job
    assert_history_is_the_run_directorys(client, operator, job_id)
    assert metric_steps(client, job_id) == list(range(1, steps + 1))
    assert not neighbour.exists(job_key(job_id), control_key(job_id)), "the other control plane adopted the job"
