"""Submitting (validation, idempotency), listing, getting and cancelling, and tenant isolation."""

import pytest

from tests.api.conftest import ARITHMETIC, job_body, make_record, upload, wait_status
from tests.api.test_auth import assert_envelope


@pytest.mark.parametrize(
    "change,param",
    [
        (lambda b: b["optim"].update(lr=-1), "optim.lr"),
        (lambda b: b["optim"].update(lrr=1), "optim.lrr"),
        (lambda b: b.update(rewards=[]), "rewards"),
        (lambda b: b.pop("model"), "model"),
        (lambda b: b["rollout"].update(n="many"), "rollout.n"),
        (lambda b: b.update(metadata={"k": 5}), "metadata.k"),
        # Over REST a tracker URI is the operator's to allow: the driver would write to it from the cluster.
        (lambda b: b.update(trackers={"mlflow": {"tracking_uri": "file:///etc"}}), "trackers.mlflow.tracking_uri"),
        # An environment is a built-in name: an unknown one, or an import path (code of the tenant's choosing), is refused.
        (lambda b: b["rollout"].update(agent={"environment": "shell"}), "rollout.agent.environment"),
        (lambda b: b["rollout"].update(agent={"environment": "os:system"}), "rollout.agent.environment"),
        (lambda b: b.update(stages=[{"name": "g", "rollout": {"agent": {"environment": "os:system"}}}]), "stages.0.rollout.agent.environment"),
        # An environment's kwargs reach its constructor: only those it declares (verifiers reads a system_prompt *file*).
        (lambda b: b["rollout"].update(agent={"environment": "verifiers", "kwargs": {"system_prompt": "/etc/passwd"}}), "rollout.agent.kwargs"),
        (lambda b: b["rollout"].update(agent={"environment": "python_calculator", "kwargs": {"limits": {"cpu_s": 3600}}}), "rollout.agent.kwargs"),
    ],
)
def test_spec_error_is_422_naming_the_field(alpha, tiny, workdir, change, param):
    body = job_body(tiny, workdir, "bad", 2)
    change(body)
    r = alpha.post("/v1/jobs", json=body)
    err = assert_envelope(r, 422, "invalid_spec")
    assert err["param"] == param
    assert param in err["message"]


def test_spec_error_from_a_cross_field_rule(alpha, tiny, workdir):
    body = job_body(tiny, workdir, "bad", 2)
    body["optim"]["mini_batch_size"] = 5
    err = assert_envelope(alpha.post("/v1/jobs", json=body), 422, "invalid_spec")
    assert "optim.mini_batch_size" in err["message"]


def test_idempotency(served_alpha, served_beta, tiny, workdir):
    alpha, beta = served_alpha, served_beta  # real jobs (they fail in preflight): the API on Ray
    # A registered model whose directory does not exist: the driver fails in preflight, cheaply.
    body = job_body(tiny, workdir, "idem", 2, model={"path": "missing"})
    first = alpha.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k-1"})
    assert first.status_code == 201, first.text
    job = first.json()
    assert job["status"] == "queued" and job["ray_submission_id"] == job["id"]
    assert job["dashboard_url"].endswith(f"/#/jobs/{job['id']}")
    again = alpha.post("/v1/jobs", json=dict(reversed(list(body.items()))), headers={"Idempotency-Key": "k-1"})
    assert again.status_code == 201 and again.json()["id"] == job["id"]
    assert again.headers["idempotent-replayed"] == "true"
    other = alpha.post("/v1/jobs", json={**body, "name": "idem2"}, headers={"Idempotency-Key": "k-1"})
    assert assert_envelope(other, 409, "idempotency_key_reused")["param"] == "Idempotency-Key"
    # Keys are per tenant: the same key from another tenant makes another job (with beta's own upload).
    theirs_body = {**body, "data": {**body["data"], "train_file": upload(beta, ARITHMETIC).json()["id"]}}
    theirs = beta.post("/v1/jobs", json=theirs_body, headers={"Idempotency-Key": "k-1"})
    assert theirs.status_code == 201 and theirs.json()["id"] != job["id"]
    # Each ends on its own, failed in preflight (no cancel racing the driver's own report).
    for c, j in ((alpha, job), (beta, theirs.json())):
        done = wait_status(c, j["id"], {"succeeded", "failed", "cancelled"}, 180)
        assert (done["status"], (done["error"] or {}).get("code")) == ("failed", "model_load_error"), done
        assert done["finished_at"] is not None


def test_pagination_and_status_filter(api, keys, redis_url):
    ids = [make_record(redis_url, "pager", f"p{i}") for i in range(7)]
    make_record(redis_url, "pager", "done", status="succeeded")
    with api.client(keys["pager"]) as c:
        seen, after = [], None
        for _ in range(10):
            page = c.get("/v1/jobs", params={"limit": 3, "status": "queued", **({"after": after} if after else {})}).json()
            seen += [j["id"] for j in page["data"]]
            assert page["last_id"] == (page["data"][-1]["id"] if page["data"] else None)
            if not page["has_more"]:
                break
            after = page["last_id"]
        assert seen == list(reversed(ids))  # newest first, each exactly once
        all_jobs = c.get("/v1/jobs", params={"limit": 100}).json()
        assert len(all_jobs["data"]) == 8 and not all_jobs["has_more"]
        done = c.get("/v1/jobs", params={"status": "succeeded"}).json()["data"]
        assert [j["name"] for j in done] == ["done"]
        assert assert_envelope(c.get("/v1/jobs", params={"limit": 0}), 422, "invalid_parameter")["param"] == "limit"
        assert assert_envelope(c.get("/v1/jobs", params={"status": "bogus"}), 422)["param"] == "status"
        assert_envelope(c.get("/v1/jobs", params={"after": "job-unknown"}), 400, "invalid_cursor")


def test_tenant_isolation_on_every_endpoint(alpha, beta, redis_url):
    job_id = make_record(redis_url, "alpha", "mine")
    assert alpha.get(f"/v1/jobs/{job_id}").status_code == 200
    for method, path in [
        ("GET", ""), ("POST", "/cancel"), ("GET", "/events"), ("GET", "/metrics"), ("GET", "/checkpoints"), ("GET", "/logs"),
    ]:
        r = beta.request(method, f"/v1/jobs/{job_id}{path}")
        assert_envelope(r, 404, "job_not_found")
    assert job_id not in [j["id"] for j in beta.get("/v1/jobs", params={"limit": 100}).json()["data"]]
    assert_envelope(beta.get("/v1/jobs", params={"after": job_id}), 400, "invalid_cursor")
    # The record is untouched by the other tenant's cancel.
    assert alpha.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"


def test_terminal_jobs_cannot_be_cancelled_or_changed(alpha, redis_url):
    from api.store import JobStore
    from tests.api.conftest import run_async

    job_id = make_record(redis_url, "alpha", "ended", status="failed")
    job = alpha.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "failed" and job["error"] == {"code": "x", "message": "boom"}
    assert_envelope(alpha.post(f"/v1/jobs/{job_id}/cancel"), 409, "job_terminal")

    async def try_change():
        store = JobStore(redis_url)
        try:
            return await store.transition(job_id, "running", "late"), await store.transition(job_id, "succeeded", "late")
        finally:
            await store.close()

    assert run_async(try_change()) == ((False, "failed"), (False, "failed"))
    assert alpha.get(f"/v1/jobs/{job_id}").json()["status"] == "failed"
    events = alpha.get(f"/v1/jobs/{job_id}/events").json()["data"]
    assert [e["data"]["status"] for e in events] == ["queued", "failed"]


def test_history_pagination_and_sse_of_an_ended_job(alpha, redis_url):
    from orchestrator.reporting.redis_reporter import RedisReporter

    job_id = make_record(redis_url, "alpha", "hist")
    rep = RedisReporter(redis_url, job_id)
    rep.event("status", "starting", status="starting")
    rep.event("status", "running", status="running", total_steps=5)
    for step in range(1, 6):
        rep.metrics(step, {"reward/mean": step / 10, "kl": float("nan")})
    rep.event("status", "succeeded", status="succeeded", step=5)
    rep.close()
    page1 = alpha.get(f"/v1/jobs/{job_id}/metrics", params={"limit": 2}).json()
    assert [m["step"] for m in page1["data"]] == [1, 2] and page1["has_more"]
    page2 = alpha.get(f"/v1/jobs/{job_id}/metrics", params={"limit": 10, "after": page1["last_id"]}).json()
    assert [m["step"] for m in page2["data"]] == [3, 4, 5] and not page2["has_more"]
    assert page2["data"][0]["values"] == {"reward/mean": 0.3, "kl": None}
    job = alpha.get(f"/v1/jobs/{job_id}").json()
    assert (job["status"], job["step"], job["total_steps"], job["metrics"]["reward/mean"]) == ("succeeded", 5, 5, 0.5)
    # SSE from Last-Event-ID: the rest, then `end`.
    with alpha.stream("GET", f"/v1/jobs/{job_id}/metrics", headers={"Accept": "text/event-stream", "Last-Event-ID": page1["last_id"]}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        from api.client import parse_sse

        items = list(parse_sse(r.iter_lines()))
    assert [i.get("event") for i in items][-1] == "end"
    import json

    assert [json.loads(i["data"])["step"] for i in items[:-1]] == [3, 4, 5]
    assert_envelope(alpha.get(f"/v1/jobs/{job_id}/events", params={"after": "not-an-id"}), 422)


def test_a_checkpoint_list_that_cannot_be_read_keeps_the_last_one(alpha, redis_url, tmp_path, capfd):
    import json

    from orchestrator.reporting.redis_reporter import RedisReporter

    job_id = make_record(redis_url, "alpha", "ckpts")
    ckpts = tmp_path / "checkpoints"
    (ckpts / "step_000001").mkdir(parents=True)
    (ckpts / "step_000001" / "state.json").write_text(json.dumps({"step": 1, "time": 1.0}))
    rep = RedisReporter(redis_url, job_id)
    rep.event("checkpoint", "saved step 1", step=1, path=str(ckpts / "step_000001"))
    # Step 2's state.json cannot be read (a directory: an OSError, as a flaky object store gives).
    (ckpts / "step_000002" / "state.json").mkdir(parents=True)
    rep.event("checkpoint", "saved step 2", step=2, path=str(ckpts / "step_000002"))
    rep.close()
    assert [c["step"] for c in alpha.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"]] == [1]
    assert f"could not list the checkpoints beside {ckpts / 'step_000002'} (IsADirectoryError" in capfd.readouterr().err
    events = alpha.get(f"/v1/jobs/{job_id}/events").json()["data"]
    assert [e["data"]["step"] for e in events if e["type"] == "checkpoint"] == [1, 2]


def test_a_job_failed_for_an_unreachable_ray_is_listed_to_stop_before_its_record_says_failed(redis_url):
    """Else a crash (or a reader) between the two writes sees a failed record whose Ray job nobody
    will stop once Ray is back."""
    from types import SimpleNamespace

    from api.reconciler import ORPHANS_KEY, Reconciler, Transition
    from api.store import JobStore
    from tests.api.conftest import run_async

    job_id = make_record(redis_url, "alpha", "unreachable", status="running")

    async def fail_it():
        store = JobStore(redis_url)
        listed_at_transition = []
        transition = store.transition

        async def watched(*args, **kwargs):
            listed_at_transition.append(await store.redis.sismember(ORPHANS_KEY, job_id))
            return await transition(*args, **kwargs)

        store.transition = watched
        try:
            await Reconciler(store, None, SimpleNamespace(reconcile_interval_s=1.0)).act(
                job_id, Transition("failed", "failed: Ray unreachable", {"code": "ray_unreachable", "message": "gone"}))
            return listed_at_transition, (await store.get(job_id))["status"], await store.redis.srem(ORPHANS_KEY, job_id)
        finally:
            await store.close()

    assert run_async(fail_it()) == ([1], "failed", 1)
