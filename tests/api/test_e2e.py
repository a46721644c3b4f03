"""Real jobs on the real Ray head, through the REST API: run to success over SSE, restart the API
mid-job and cancel, and a driver killed from outside."""

import io
import json
import math
import os
import signal
import subprocess
import sys
import tarfile

import httpx
import psutil
import pytest
import redis

from api.client import parse_sse
from orchestrator.core.records import job_key
from tests.api.leftovers import leftovers
from tests.api.conftest import ARITHMETIC, job_body, make_record, upload, wait_admitted, wait_status, wait_until
from tests.api.test_auth import assert_envelope

pytestmark = pytest.mark.slow


# Real jobs: the API as `rlhf serve` on the session's Ray head.
@pytest.fixture()
def alpha(served_alpha):
    return served_alpha


@pytest.fixture()
def beta(served_beta):
    return served_beta


def sse(client: httpx.Client, path: str, last_event_id: str | None = None, timeout: float = 180):
    """All SSE items of a stream until it ends (or `timeout` passes: then the test fails)."""
    headers = {"Accept": "text/event-stream", **({"Last-Event-ID": last_event_id} if last_event_id else {})}
    items = []
    with client.stream("GET", path, headers=headers, timeout=httpx.Timeout(10, read=timeout)) as r:
        assert r.status_code == 200
        for item in parse_sse(r.iter_lines()):
            items.append(item)
            if item.get("event") == "end":
                break
    return items


def test_tiny_grpo_job_over_rest(alpha, beta, tiny, workdir, served, keys, ray_head, redis_url):
    api = served
    r = alpha.post("/v1/jobs", json={**job_body(tiny, workdir, "e2e", 4), "metadata": {"suite": "e2e"}})
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]

    assert wait_admitted(alpha, job_id)["message"].startswith("admitted after ")
    # The job's processes hold a Redis user of the job's own: another tenant's record is out of its reach.
    # (It reaches them in the launch file of its run directory, never on a command line: tests/api/test_launch_secrets.py.)
    job_url = json.loads((workdir / "artifacts" / "tenants" / "alpha" / "runs" / job_id / ".launch.json").read_text())["env"]["RLHF_REDIS_URL"]
    assert f"rlhf.{job_id}:" in job_url and redis_url.split("//")[1] in job_url
    as_job = redis.Redis.from_url(job_url)
    theirs = make_record(redis_url, "beta", "theirs")
    with pytest.raises(redis.exceptions.NoPermissionError):
        as_job.hgetall(job_key(theirs))
    with pytest.raises(redis.exceptions.NoPermissionError):
        as_job.keys("*")
    assert as_job.hget(job_key(job_id), "tenant") == b"alpha"

    items = sse(alpha, f"/v1/jobs/{job_id}/events")
    assert items[-1] == {"event": "end", "data": json.dumps({"status": "succeeded"})}, [i.get("data", "")[:500] for i in items[-4:]]
    events = [json.loads(i["data"]) for i in items[:-1]]
    statuses = [e["data"]["status"] for e in events if e["type"] == "status"]
    assert statuses[0] == "queued" and statuses[-1] == "succeeded" and "running" in statuses
    assert {"placement", "actors_ready", "checkpoint"} <= {e["type"] for e in events}

    job = alpha.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["step"] == 4 and job["total_steps"] == 4
    assert job["created_at"] <= job["started_at"] <= job["finished_at"]
    assert job["metadata"] == {"suite": "e2e"} and job["error"] is None

    metrics = alpha.get(f"/v1/jobs/{job_id}/metrics").json()["data"]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(math.isfinite(m["values"]["reward/mean"]) for m in metrics)
    assert job["metrics"] == metrics[-1]["values"]

    # Checkpoints by id, no server path; the run is in alpha's own area, under the job id.
    ckpts = alpha.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"]
    assert [c["step"] for c in ckpts] == [2, 4] and all(c["bytes"] > 0 for c in ckpts)
    assert [c["id"] for c in ckpts] == [f"ckpt-{job_id.removeprefix('job-')}-{s}" for s in (2, 4)] and "path" not in ckpts[0]
    assert (workdir / "artifacts" / "tenants" / "alpha" / "runs" / job_id / "checkpoints" / "step_000004" / "state.json").is_file()
    assert not any(str(workdir) in json.dumps(e) for e in events)  # event messages name paths inside the tenant's area only
    with alpha.stream("GET", f"/v1/jobs/{job_id}/checkpoints/{ckpts[-1]['id']}/content") as r:
        assert r.status_code == 200 and r.headers["content-type"] == "application/x-tar"
        with tarfile.open(fileobj=io.BytesIO(r.read())) as tar:
            names = tar.getnames()
    assert f"{ckpts[-1]['id']}/policy/config.json" in names and f"{ckpts[-1]['id']}/state.json" in names

    logs = alpha.get(f"/v1/jobs/{job_id}/logs", params={"tail": 1000}).json()["logs"]
    assert "orchestrator.entrypoints.run --spec launch:RLHF_LAUNCH_FILE" in logs

    # The CLI over the same API: `watch` of an ended job prints its status, exit code 0.
    env = {**os.environ, "RLHF_API_URL": api.url, "RLHF_API_KEY": keys["alpha"]}
    out = subprocess.run([sys.executable, "-m", "orchestrator.entrypoints.cli", "jobs", "watch", job_id], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and f"{job_id}: succeeded" in out.stdout, out.stderr
    out = subprocess.run([sys.executable, "-m", "orchestrator.entrypoints.cli", "jobs", "list"], env=env, capture_output=True, text=True, timeout=60)
    assert job_id in out.stdout
    text = alpha.get("/metrics").text
    assert 'rlhf_jobs{status="succeeded"}' in text
    # The job has ended: its Redis user goes at the reconciler's next sweep.
    admin = redis.Redis.from_url(redis_url)
    users = lambda: {u.decode() if isinstance(u, bytes) else u for u in admin.acl_users()}  # noqa: E731
    wait_until(lambda: f"rlhf.{job_id}" not in users(), 30, "the ended job's Redis user to be deleted")
    assert_nothing_left(job_id, ray_head)
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis.from_url(job_url).ping()

    # A second job starts from the first one's checkpoint, by id; another tenant cannot name it.
    from_ckpt = job_body(tiny, workdir, "from-ckpt", 1, model={"path": ckpts[-1]["id"]}, checkpoint={"every": 0})
    beta_file = upload(beta, ARITHMETIC).json()["id"]
    refused = assert_envelope(beta.post("/v1/jobs", json={**from_ckpt, "data": {"train_file": beta_file, "max_prompt_length": 16}}), 422, "invalid_spec")
    assert refused["param"] == "model.path"
    r = alpha.post("/v1/jobs", json=from_ckpt)
    assert r.status_code == 201, r.text
    second = r.json()
    assert second["spec"]["model"]["path"] == ckpts[-1]["id"]  # the spec as the tenant wrote it
    done = wait_status(alpha, second["id"], {"succeeded", "failed", "cancelled"}, 180)
    assert done["status"] == "succeeded", done["error"]
    started = [e for e in alpha.get(f"/v1/jobs/{second['id']}/events", params={"limit": 1000}).json()["data"] if e["type"] == "placement"]
    assert started, "the second job placed its actors"


def test_restart_api_mid_job_then_cancel(alpha, tiny, workdir, served, ray_head):
    api = served
    r = alpha.post("/v1/jobs", json=job_body(tiny, workdir, "long", 100000))
    job_id = r.json()["id"]
    wait_status(alpha, job_id, {"running"}, 150)
    wait_until(lambda: len(alpha.get(f"/v1/jobs/{job_id}/metrics").json()["data"]) >= 2, 60, "two steps of metrics")
    before = alpha.get(f"/v1/jobs/{job_id}/metrics", params={"limit": 1000}).json()["data"]

    api.kill()  # SIGKILL: no shutdown hooks
    api.start()

    job = alpha.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "running"
    after = alpha.get(f"/v1/jobs/{job_id}/metrics", params={"limit": 1000}).json()["data"]
    assert after[: len(before)] == before  # the whole history is still there
    # The live stream resumes where the client left off.
    with alpha.stream("GET", f"/v1/jobs/{job_id}/metrics", headers={"Accept": "text/event-stream", "Last-Event-ID": before[-1]["id"]},
                      timeout=httpx.Timeout(10, read=60)) as s:
        first = next(i for i in parse_sse(s.iter_lines()) if i.get("id"))
    assert json.loads(first["data"])["step"] == before[-1]["step"] + 1

    # While it runs, the listing sees its driver and actor processes, its actors and its placement group.
    alive = leftovers(job_id, ray_head.dashboard)
    assert any(x.startswith("pid") and "orchestrator.entrypoints.run" in x for x in alive), alive
    assert any(x.startswith("actor PolicyTrainer ALIVE") for x in alive) and any(x.startswith("placement group") for x in alive), alive

    cancelled = alpha.post(f"/v1/jobs/{job_id}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["id"] == job_id
    items = sse(alpha, f"/v1/jobs/{job_id}/events", timeout=90)
    assert json.loads(items[-1]["data"]) == {"status": "cancelled"}
    # The reply may come before or after the driver has stopped (a race); the order of the record's
    # status changes may not: the API's `cancelling` precedes the driver's `cancelled`.
    events = [json.loads(i["data"]) for i in items[:-1]]
    statuses = [e["data"]["status"] for e in events if e["type"] == "status"]
    assert statuses[-3:] == ["running", "cancelling", "cancelled"], statuses
    job = alpha.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "cancelled" and job["finished_at"]
    assert_envelope(alpha.post(f"/v1/jobs/{job_id}/cancel"), 409, "job_terminal")
    assert_nothing_left(job_id, ray_head)


def assert_nothing_left(job_id: str, ray_head) -> None:
    """Within a bounded time after the job ended: none of its processes, live actors or placement groups."""
    found: list[str] = []

    def clean():
        found[:] = leftovers(job_id, ray_head.dashboard)
        return not found

    try:
        wait_until(clean, 60, f"job {job_id} to leave nothing behind")
    except TimeoutError:
        raise AssertionError(f"job {job_id} left behind: {found}") from None


def driver_of(job_id: str):
    """The driver's own Python process. Ray runs the entrypoint under `/bin/sh -c "python -m ..."`:
    a SIGKILL to that shell would fail the Ray job but leave the driver training on."""
    for p in psutil.process_iter(["cmdline"]):
        try:
            if "orchestrator.entrypoints.run" in (p.info["cmdline"] or []) and p.environ().get("RLHF_JOB_ID") == job_id:
                return p
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def test_driver_killed_from_outside_ends_failed(alpha, tiny, workdir, ray_head):
    # No restart allowed: the loss fails the job (tests/api/test_recovery.py has the resubmission).
    r = alpha.post("/v1/jobs", json=job_body(tiny, workdir, "victim", 100000, fault_tolerance={"max_restarts": 0}))
    job_id = r.json()["id"]
    wait_status(alpha, job_id, {"starting", "running"}, 120)
    proc = wait_until(lambda: driver_of(job_id), 60, f"the driver process of {job_id}")
    os.kill(proc.pid, signal.SIGKILL)
    job = wait_status(alpha, job_id, {"failed", "succeeded", "cancelled"}, 90)
    assert job["status"] == "failed"
    assert job["error"]["code"] == "driver_failed"
    assert "exit code" in job["error"]["message"]
    events = alpha.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
    assert events[-1]["data"]["status"] == "failed"
    assert_nothing_left(job_id, ray_head)
