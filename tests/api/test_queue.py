"""The admission queue on the real API, Redis and Ray head (4 logical CPUs): jobs wait in the
control plane, with their position and reason, until their placement group fits; a waiting job is
cancelled without Ray; a job that could never fit is a 422; restarting the API keeps the queue."""

from __future__ import annotations

import pytest
from ray.job_submission import JobSubmissionClient

from tests.api.conftest import ARITHMETIC, job_body, upload, wait_admitted, wait_status, wait_until
from tests.api.test_auth import assert_envelope

pytestmark = pytest.mark.slow

TERMINAL = {"succeeded", "failed", "cancelled"}


def test_jobs_wait_for_room_in_order_and_a_waiting_job_never_reaches_ray(served, keys, ray_head, workdir):
    api = served  # real jobs: the API as `rlhf serve` on the Ray head
    ray = JobSubmissionClient(ray_head.dashboard)
    with api.client(keys["queuer"]) as c:
        data = upload(c, ARITHMETIC).json()["id"]
        tiny = {"model": "tiny", "data": data}

        never = job_body(tiny, workdir, "huge", 2, resources={"trainer": {"num_cpus": 64}})
        err = assert_envelope(c.post("/v1/jobs", json=never), 422, "never_fits")
        assert err["param"] == "resources" and "the job asks for 65 CPUs in all; the cluster has 4" in err["message"]
        assert assert_envelope(c.post("/v1/jobs", json={**job_body(tiny, workdir, "vip", 2), "priority": 5}), 422)["param"] == "priority"

        # Two long jobs take 3 of the head's 4 CPUs (1.5 each: a trainer of 0.5 that also samples, with
        # the rollout's 0.5, and a driver that computes the rewards, with the reward's 0.5); two more wait.
        cpus = {}
        long_jobs = [c.post("/v1/jobs", json=job_body(tiny, workdir, f"long{i}", 100000, resources=cpus)).json()["id"] for i in range(2)]
        short = {"model": "missing", "data": data}  # fails in preflight once admitted
        waiting = [c.post("/v1/jobs", json=job_body(short, workdir, f"short{i}", 2, resources=cpus)).json()["id"] for i in range(2)]
        for job_id in long_jobs:
            wait_admitted(c, job_id)

        def queued(job_id):
            job = c.get(f"/v1/jobs/{job_id}").json()
            return job["queue"] if job["status"] == "queued" else None

        first = wait_until(lambda: queued(waiting[0]), 30, "the first waiting job's place in the queue")
        assert first["position"] == 1 and first["reason"].startswith("waiting for 0.5 more CPUs (the job asks for 1.5 CPUs")
        second = wait_until(lambda: queued(waiting[1]), 30, "the second waiting job's place in the queue")
        assert second == {"position": 2, "reason": f"behind job {waiting[0]}, which waits for resources"}
        events = c.get(f"/v1/jobs/{waiting[0]}/events").json()["data"]
        assert [e["type"] for e in events] == ["status", "queued"] and events[1]["message"].startswith("waiting for admission: ")

        # Cancelling a waiting job ends it at once, and Ray never hears of it.
        cancelled = c.post(f"/v1/jobs/{waiting[1]}/cancel").json()
        assert cancelled["status"] == "cancelled" and cancelled["queue"] is None
        with pytest.raises(RuntimeError, match="does not exist"):
            ray.get_job_info(waiting[1])

        # The queue lives in Redis: an API restart keeps it.
        api.kill()
        api.start()
        assert queued(waiting[0])["position"] == 1

        # Room frees up: the waiting job is admitted (and fails in preflight, as its model is missing).
        c.post(f"/v1/jobs/{long_jobs[0]}/cancel")
        wait_admitted(c, waiting[0], timeout=120)
        assert wait_status(c, waiting[0], TERMINAL, 180)["status"] == "failed"
        c.post(f"/v1/jobs/{long_jobs[1]}/cancel")
        for job_id in long_jobs:
            assert wait_status(c, job_id, TERMINAL, 120)["status"] == "cancelled"
