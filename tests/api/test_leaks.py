"""What a hostile tenant reads back: server paths, Ray's addresses, files outside its area, errors
that tell another tenant's jobs apart from none, and storage without bounds (issue 27, items 5-8).

The redaction is checked on what a driver writes, written straight to Redis and to the artifact
store (the same records and files a driver leaves); one slow test runs a real tiny pipeline job.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import tarfile
import uuid
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from ray.job_submission import JobSubmissionClient

from api import redact
from api.auth import add_key
from api.store import JobStore
from tests.api.conftest import (
    ARITHMETIC,
    InProcessApi,
    api_settings,
    in_process,
    job_body,
    run_async,
    upload,
    wait_status,
    wait_until,
)
from tests.api.test_auth import assert_envelope

STAGE = "stage"


def record_job(redis_url: str, tenant: str, spec: dict, launch: dict, events=(), error: str | None = None,
               checkpoints: list | None = None, submission_id: str | None = None, job_id: str | None = None) -> str:
    """A job record as the API and the job's driver leave one: the tenant's spec and the launch spec
    it resolved to, the driver's events, its checkpoints, and (if `error`) its failure."""
    job_id = job_id or "job-" + uuid.uuid4().hex[:24]

    async def go():
        store = JobStore(redis_url)
        try:
            # Demand no cluster can meet: the admission queue never sends it to Ray.
            await store.create(job_id, tenant, "leaky", spec, {}, None, launch_spec=launch, demand=[{"CPU": 1e9}])
            for type_, message, data in events:
                await store.add_event(job_id, type_, message, **data)
            await store.set_fields(job_id, ray_submission_id=submission_id, checkpoints=checkpoints)
            if error:
                await store.transition(job_id, "failed", f"failed: {error}", error={"code": "model_load_error", "message": error})
            else:
                await store.transition(job_id, "succeeded", "succeeded")
        finally:
            await store.close()

    run_async(go())
    return job_id


@pytest.fixture(scope="module")
def alpha_area(workdir) -> Path:
    return workdir / "artifacts" / "tenants" / "alpha"


@pytest.fixture(scope="module")
def leaky(redis_url, workdir, tiny, tiny_model, alpha_area):
    """Alpha's failed job whose driver wrote every kind of server path: the registry model's
    directory, the upload's place, a checkpoint another job of alpha's left, the run directory, a
    registered model this job did not name, the storage root, and the addresses of Redis and Ray."""
    earlier = "job-" + uuid.uuid4().hex[:24]
    earlier_policy = alpha_area / "runs" / earlier / "checkpoints" / "step_000002" / "reward_model"
    ckpt = f"ckpt-{earlier.removeprefix('job-')}-2"
    upload_path = alpha_area / "files" / f"{tiny['data']}.jsonl"
    spec = {"name": "leaky", "model": {"path": "tiny"}, "data": {"train_file": tiny["data"]}, "rewards": [{"model": ckpt}]}
    launch = {"name": "leaky", "model": {"path": str(tiny_model)}, "data": {"train_file": str(upload_path)},
              "rewards": [{"model": str(earlier_policy), "name": ckpt}], "output_dir": str(alpha_area / "runs" / "RUN")}
    run_dir = alpha_area / "runs" / "RUN"
    events = [
        (STAGE, f"stage a (grpo) runs steps 1..1 from {tiny_model}", {"stage": "a", "model_path": str(tiny_model)}),
        ("warning", f"dropped 2 prompts of {upload_path}", {"path": str(upload_path)}),
        ("error", f"rewards.0.model={str(earlier_policy)!r} does not load: OSError: {earlier_policy}/config.json", {"code": "x"}),
        ("checkpoint", f"saved step 2 to {run_dir}/checkpoints/step_000002", {"path": f"{run_dir}/checkpoints/step_000002"}),
        ("warning", f"also saw {workdir / 'no-model'} and {workdir / 'artifacts' / 'tenants' / 'beta'}", {}),
        ("warning", "could not reach redis://rlhf.job-1:s3cret@10.0.0.7:6379/0 (Ray GCS at 10.0.0.8:6380)", {}),
    ]
    error = f"model.path={str(tiny_model)!r} does not load: OSError: no file {tiny_model}/config.json"
    job_id = record_job(redis_url, "alpha", spec, launch, events, error)
    return {"id": job_id, "ckpt": ckpt}


def no_server_path(text: str, *paths) -> None:
    for path in paths:
        assert str(path) not in text, f"{path} in {text[:2000]}"


def test_events_and_errors_name_what_the_tenant_named(alpha, leaky, tiny, tiny_model, workdir):
    job_id, ckpt = leaky["id"], leaky["ckpt"]
    events = alpha.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000})
    job = alpha.get(f"/v1/jobs/{job_id}").json()
    listed = next(j for j in alpha.get("/v1/jobs", params={"limit": 100}).json()["data"] if j["id"] == job_id)
    stream = alpha.get(f"/v1/jobs/{job_id}/events", headers={"Accept": "text/event-stream"})
    for text in (events.text, json.dumps(job), json.dumps(listed), stream.text):
        no_server_path(text, workdir, tiny_model)
    by_type = {e["type"]: e for e in events.json()["data"]}
    assert by_type[STAGE]["message"] == "stage a (grpo) runs steps 1..1 from tiny"
    assert by_type[STAGE]["data"]["model_path"] == "tiny"
    assert by_type["error"]["message"] == f"rewards.0.model='{ckpt}' does not load: OSError: {ckpt}/config.json"
    assert by_type["checkpoint"]["data"]["path"] == "runs/RUN/checkpoints/step_000002"  # the tenant's own area, relative
    assert f"dropped 2 prompts of {tiny['data']}" in events.text
    assert "also saw missing and <storage>/tenants/beta" in events.text
    assert "could not reach redis://<address>/0 (Ray GCS at <address>)" in events.text and "s3cret" not in events.text
    assert job["error"]["message"] == "model.path='tiny' does not load: OSError: no file tiny/config.json"
    assert listed["error"] == job["error"]


def test_redaction_rules(tmp_path):
    from api.storage import ArtifactStore

    storage = ArtifactStore(str(tmp_path / "store"))
    area = storage.tenant_root("t")
    s3 = "s3://models/big"
    rec = {"tenant": "t", "spec": {"model": {"path": "big"}, "data": {"train_file": "file-1"}},
           "launch_spec": {"model": {"path": s3}, "data": {"train_file": f"{area}/files/file-1.jsonl"}}}
    hide = redact.for_job(rec, storage)
    cache = hashlib.sha256(s3.encode()).hexdigest()[:32] + "-big"  # where orchestrator/core/storage.local_copy puts it
    assert hide.text(f"'{s3}/config.json' and /node/cache/{cache}/config.json") == "'big/config.json' and big/config.json"
    assert hide.text(f"{area}/files/file-1.jsonl:3: bad") == "file-1:3: bad"
    assert hide.text(f"{area}/runs/job-x/m") == "runs/job-x/m"
    assert hide.text(f"{storage.root}/tenants/u") == "<storage>/tenants/u"
    assert hide.text(f"{area}-other/x") == "<storage>/tenants/t-other/x"  # a longer name is not the tenant's area
    assert hide({"a": [f"{area}/x", 1]}) == {"a": ["x", 1]}
    # An object store: its paths with and without the protocol; its bucket's name alone is a word.
    bucket = ArtifactStore("s3://store/rlhf", {"anon": True})
    hide = redact.for_job({"tenant": "t", "spec": {}, "launch_spec": {}}, bucket)
    assert hide.text("saved to s3://store/rlhf/tenants/t/runs/job-1 (store/rlhf/tenants/t/runs/job-1)") == "saved to runs/job-1 (runs/job-1)"
    assert hide.text("s3://store/rlhf/tenants/u and store/rlhf/tenants/u; the store is down") == \
        "<storage>/tenants/u and <storage>/tenants/u; the store is down"
    log = ("INFO worker.py:1841 -- Connecting to existing Ray cluster at address: 127.0.0.1:50703...\n"
           "Connected to Ray cluster. View the dashboard at \x1b[1mhttp://10.1.2.3:8265 \x1b[39m\n"
           "redis://rlhf.job-1:secret@redis-host:6379/0 address='ray-head:6379' [fe80::1]:6380 torch 2.5.1\n")
    out = redact.strip_addresses(log)
    assert "127.0.0.1" not in out and "10.1.2.3" not in out and "secret" not in out and "redis-host" not in out
    assert "ray-head" not in out and "fe80" not in out and "torch 2.5.1" in out
    assert "at address: <address>..." in out and "http://<address>" in out


def give_checkpoint(redis_url: str, area: Path, spec: dict, launch: dict, files: dict[str, bytes]) -> tuple[str, str, Path]:
    """A finished checkpoint of a job of alpha's, as its driver leaves one; (job id, checkpoint id, its directory)."""
    job_id = "job-" + uuid.uuid4().hex[:24]
    path = area / "runs" / job_id / "checkpoints" / "step_000002"
    (path / "policy").mkdir(parents=True)
    for rel, content in files.items():
        (path / rel).write_bytes(content)
    entry = {"step": 2, "path": str(path), "created_at": 1.0, "bytes": 2}
    record_job(redis_url, "alpha", spec, {**launch, "output_dir": str(area / "runs" / job_id)}, checkpoints=[entry], job_id=job_id)
    return job_id, f"ckpt-{job_id.removeprefix('job-')}-2", path


def tar_members(response: httpx.Response) -> dict[str, bytes]:
    assert response.status_code == 200, response.text
    with tarfile.open(fileobj=io.BytesIO(response.content)) as tar:
        return {m.name: (tar.extractfile(m).read() if m.isfile() else m.type) for m in tar.getmembers()}


def test_checkpoint_download_holds_no_server_path(alpha, redis_url, tiny, tiny_model, workdir, alpha_area):
    upload_path = alpha_area / "files" / f"{tiny['data']}.jsonl"
    spec = {"model": {"path": "tiny"}, "data": {"train_file": tiny["data"]}}
    launch = {"model": {"path": str(tiny_model)}, "data": {"train_file": str(upload_path)}}
    state = {"step": 2, "spec": {**launch, "output_dir": "OUT", "checkpoint": {"dir": str(alpha_area / "runs" / "x" / "checkpoints")}}}
    config = {"_name_or_path": str(tiny_model), "model_type": "qwen2", "vocab": ["http://a.b:80", "1.2.3.4"]}
    weights = os.urandom(1000)
    job_id, ckpt, _ = give_checkpoint(redis_url, alpha_area, spec, launch, {
        "state.json": json.dumps(state).encode(), "policy/config.json": json.dumps(config).encode(), "policy/model.bin": weights})
    members = tar_members(alpha.get(f"/v1/jobs/{job_id}/checkpoints/{ckpt}/content"))
    for content in members.values():
        no_server_path(content.decode("utf-8", "replace"), workdir, tiny_model)
    saved = json.loads(members[f"{ckpt}/state.json"])
    assert saved["spec"]["model"]["path"] == "tiny" and saved["spec"]["data"]["train_file"] == tiny["data"]
    assert saved["spec"]["checkpoint"]["dir"] == "runs/x/checkpoints"
    assert json.loads(members[f"{ckpt}/policy/config.json"]) == {**config, "_name_or_path": "tiny"}  # paths go, tokens stay
    assert members[f"{ckpt}/policy/model.bin"] == weights  # not JSON: as it was


def test_checkpoint_download_does_not_follow_links(alpha, redis_url, workdir, alpha_area):
    secret_dir = workdir / "outside"
    secret_dir.mkdir(exist_ok=True)
    (secret_dir / "secret.txt").write_text("SECRET-OUTSIDE")
    job_id, ckpt, path = give_checkpoint(redis_url, alpha_area, {}, {}, {"state.json": b"{}", "policy/config.json": b"{}"})
    (path / "policy" / "hostname").symlink_to("/etc/hostname")
    (path / "policy" / "outside").symlink_to(secret_dir, target_is_directory=True)
    (path / "policy" / "config-link.json").symlink_to(path / "policy" / "config.json")
    members = tar_members(alpha.get(f"/v1/jobs/{job_id}/checkpoints/{ckpt}/content"))
    assert sorted(members) == [f"{ckpt}/policy/config.json", f"{ckpt}/state.json"]
    assert not any(b"SECRET-OUTSIDE" in c or c == Path("/etc/hostname").read_bytes() for c in members.values() if isinstance(c, bytes))


def test_checkpoint_size_counts_no_link(tmp_path):
    from orchestrator.core import checkpoint

    step = tmp_path / "step_000002"
    (step / "policy").mkdir(parents=True)
    (step / "state.json").write_text(json.dumps({"step": 2, "time": 1.0}))
    (tmp_path / "big").write_bytes(b"x" * 100_000)
    (step / "policy" / "big").symlink_to(tmp_path / "big")  # would tell the size of any file on the node
    assert [c["bytes"] for c in checkpoint.listing(tmp_path)] == [len(json.dumps({"step": 2, "time": 1.0}))]


NOT_JOB_IDS = (":events", ":metrics", ":control", ":events/events", ":metrics/metrics", ":events/checkpoints", ":events/logs")


def test_ids_naming_other_keys_are_404_like_unknown_ids(alpha, beta, leaky):
    """`job-x:events` once read the job's event stream as a record: a 500 for any existing job, a 404
    for none, which told tenants apart which jobs exist."""
    theirs = leaky["id"]  # alpha's
    unknown = "job-" + uuid.uuid4().hex[:24]
    for suffix in NOT_JOB_IDS:
        for client in (beta, alpha):
            for job_id in (theirs, unknown):
                path = f"/v1/jobs/{job_id}{suffix}"
                err = assert_envelope(client.get(path), 404)
                assert err["code"] in ("job_not_found", "not_found"), (path, err)
        assert_envelope(beta.post(f"/v1/jobs/{theirs}{suffix.split('/')[0]}/cancel"), 404, "job_not_found")
    assert_envelope(beta.get(f"/v1/files/{uuid.uuid4().hex}:x"), 404, "file_not_found")


def test_rows_that_break_the_json_parser_are_named(alpha):
    cases = [
        (json.dumps({"prompt": "a"}) + "\n" + '{"prompt": "b", "n": ' + "9" * 5000 + "}\n", "big.jsonl:2"),
        (json.dumps({"prompt": "a"}) + "\n" + '{"prompt": "b", "x": ' + "[" * 100_000 + "]" * 100_000 + "}\n", "big.jsonl:2"),
    ]
    for content, where in cases:
        err = assert_envelope(upload(alpha, content, filename="big.jsonl"), 422, "invalid_file")
        assert err["message"].startswith(f"file: {where}: "), err["message"]


def test_files_with_any_name_download(alpha):
    name = "données-日本語 x.jsonl"
    rec = upload(alpha, ARITHMETIC, filename=name).json()
    assert rec["filename"] == name
    r = alpha.get(f"/v1/files/{rec['id']}/content")
    assert r.status_code == 200 and r.text == ARITHMETIC
    disposition = r.headers["content-disposition"]
    assert f"filename*=UTF-8''{quote(name, safe='')}" in disposition
    assert disposition.isascii()
    alpha.delete(f"/v1/files/{rec['id']}")


# --- storage quotas, on an API of their own with small ones ----------------------------------------

QUOTA = {"RLHF_API_MAX_FILES_PER_TENANT": "3", "RLHF_API_MAX_STORAGE_BYTES_PER_TENANT": str(len(ARITHMETIC) * 5 // 2)}


@pytest.fixture(scope="module")
def quota_keys(keys) -> dict[str, str]:
    """Tenants of their own (their usage starts at zero), known to the API from its start."""
    return {t: add_key(keys["path"], t) for t in ("hoarder", "filler")}


@pytest.fixture(scope="module")
def quota_api(redis_url, keys, quota_keys, operator):
    with in_process(api_settings(redis_url, keys["path"], operator, **QUOTA)) as api:
        yield api


def burst_upload(api: InProcessApi, key: str, contents: list[str]) -> list[httpx.Response]:
    async def go():
        async with api.async_client(key) as ac:
            return await asyncio.gather(*(ac.post("/v1/files", files={"file": ("d.jsonl", c)}, data={"purpose": "train"})
                                          for c in contents))

    return api.run(go)


def test_file_count_quota_holds_under_concurrent_uploads(quota_api, quota_keys):
    key = quota_keys["hoarder"]
    small = json.dumps({"prompt": "1+1="}) + "\n"
    codes = [r.status_code for r in burst_upload(quota_api, key, [small] * 12)]
    assert codes.count(201) == 3 and set(codes) == {201, 429}, codes
    with quota_api.client(key) as c:
        files = c.get("/v1/files").json()["data"]
        assert len(files) == 3
        err = assert_envelope(upload(c, small), 429, "storage_quota_exceeded")
        assert "max_files_per_tenant" in err["message"] and "3" in err["message"]
        assert c.delete(f"/v1/files/{files[0]['id']}").status_code == 200
        assert_envelope(c.delete(f"/v1/files/{files[0]['id']}"), 404)  # deleted once, released once
        assert upload(c, small).status_code == 201
        assert_envelope(upload(c, small), 429, "storage_quota_exceeded")


def test_storage_bytes_quota_holds_under_concurrent_uploads(quota_api, quota_keys):
    key = quota_keys["filler"]
    codes = [r.status_code for r in burst_upload(quota_api, key, [ARITHMETIC] * 8)]
    assert codes.count(201) == 2 and set(codes) == {201, 413}, codes  # 2.5 files' worth of bytes
    with quota_api.client(key) as c:
        err = assert_envelope(upload(c, ARITHMETIC), 413, "storage_quota_exceeded")
        assert "max_storage_bytes_per_tenant" in err["message"]
        first = c.get("/v1/files").json()["data"][0]
        assert c.delete(f"/v1/files/{first['id']}").status_code == 200
        assert upload(c, ARITHMETIC).status_code == 201


# --- one real job: a pipeline's events, its log and its checkpoint --------------------------------

@pytest.mark.slow
def test_a_real_pipeline_job_shows_no_server_path(served_alpha, tiny, tiny_model, workdir, ray_head):
    alpha = served_alpha
    body = job_body(tiny, workdir, "pipeline-leaks", 1, stages=[{"name": "a"}, {"name": "b"}])
    r = alpha.post("/v1/jobs", json=body)
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    job = wait_status(alpha, job_id, {"succeeded", "failed"}, 300)
    assert job["status"] == "succeeded", job
    events = alpha.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000})
    stages = [e for e in events.json()["data"] if e["type"] == STAGE]
    assert [e["message"] for e in stages] == ["stage a (grpo) runs steps 1..1 from model.path",
                                              "stage b (grpo) runs steps 2..2 from the policy of the stages before it"]
    logs = alpha.get(f"/v1/jobs/{job_id}/logs").json()["logs"]
    assert "Connected to Ray cluster" in logs and "127.0.0.1" not in logs and ray_head.dashboard.split("//")[-1] not in logs
    ckpt = alpha.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"][-1]["id"]
    members = tar_members(alpha.get(f"/v1/jobs/{job_id}/checkpoints/{ckpt}/content"))
    state = json.loads(members[f"{ckpt}/state.json"])
    assert state["spec"]["data"]["train_file"] == tiny["data"]
    for text in (events.text, logs, *(c.decode("utf-8", "replace") for c in members.values() if isinstance(c, bytes))):
        no_server_path(text, workdir, tiny_model)


@pytest.mark.slow
def test_logs_hide_ray_addresses_and_paths(served_alpha, redis_url, ray_head, tiny_model, workdir):
    """A driver's log as Ray keeps it: the log of a real Ray job that joins the cluster and prints a path."""
    alpha = served_alpha
    submission = "job-" + uuid.uuid4().hex[:24]
    spec, launch = {"model": {"path": "tiny"}}, {"model": {"path": str(tiny_model)}}
    job_id = record_job(redis_url, "alpha", spec, launch, submission_id=submission)
    client = JobSubmissionClient(ray_head.dashboard)
    client.submit_job(submission_id=submission, entrypoint=f"python -c \"import ray; ray.init(); print('loading {tiny_model}')\"")
    wait_until(lambda: client.get_job_status(submission).is_terminal(), 120, "the Ray job to end")
    logs = alpha.get(f"/v1/jobs/{job_id}/logs").json()["logs"]
    assert "loading tiny" in logs and "Connecting to existing Ray cluster at address: <address>" in logs
    no_server_path(logs, tiny_model, "127.0.0.1")
