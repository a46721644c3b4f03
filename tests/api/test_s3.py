"""The artifact store in S3, for clusters whose nodes share no disk: a local S3-compatible server
(moto's), the API storing uploads there, and jobs that read their data and write their run
directory and checkpoints there, then start from a checkpoint by id (read back from S3)."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile

import boto3
import httpx
import pytest

from tests.api.conftest import ARITHMETIC, ApiServer, api_env, free_port, job_body, stop_group, upload, wait_status, wait_until

pytestmark = pytest.mark.slow

BUCKET = "rlhf-artifacts"


@pytest.fixture(scope="module")
def s3(workdir):
    port = free_port()
    proc = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    wait_until(lambda: httpx.get(endpoint, timeout=2).status_code < 500, 30, f"the S3 server at {endpoint}")
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    yield {"endpoint": endpoint, "client": client}
    stop_group(proc)


@pytest.fixture(scope="module")
def s3_api(s3, redis_url, ray_head, keys, workdir, operator):
    port = free_port()
    options = {"endpoint_url": s3["endpoint"], "key": "testing", "secret": "testing", "client_kwargs": {"region_name": "us-east-1"}}
    env = api_env(redis_url, ray_head, keys["path"], port, {**operator, "RLHF_API_STORAGE_ROOT": f"s3://{BUCKET}/store",
                                                           "RLHF_API_STORAGE_OPTIONS": json.dumps(options)})
    server = ApiServer(env, port, workdir / "api-s3.log")
    server.start()
    yield server
    server.stop()


def keys_under(s3, prefix: str) -> list[str]:
    pages = s3["client"].get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_upload_train_and_resume_from_a_checkpoint_in_s3(s3, s3_api, keys, workdir):
    with s3_api.client(keys["alpha"]) as alpha:
        file = upload(alpha, ARITHMETIC).json()
        assert keys_under(s3, "store/tenants/alpha/files/") == [f"store/tenants/alpha/files/{file['id']}.jsonl"]
        assert alpha.get(f"/v1/files/{file['id']}/content").text == ARITHMETIC

        body = job_body({"model": "tiny", "data": file["id"]}, workdir, "s3-job", 2, checkpoint={"every": 1, "keep_last": 1})
        # FSDP's shards need one shared filesystem: refused at submit here, naming the field, recording nothing.
        sharded = {**body, "resources": {**body["resources"], "trainer": {"replicas": 2, "strategy": "fsdp"}}, "optim": {**body["optim"], "prompts_per_step": 4}}
        refused = alpha.post("/v1/jobs", json=sharded)
        assert refused.status_code == 422 and refused.json()["error"]["param"] == "resources.trainer.strategy", refused.text
        job = alpha.post("/v1/jobs", json=body).json()
        done = wait_status(alpha, job["id"], {"succeeded", "failed", "cancelled"}, 480)
        assert done["status"] == "succeeded", done["error"]

        # The run directory is in S3: metrics and events copied there, the newest checkpoint only (keep_last 1).
        run = f"store/tenants/alpha/runs/{job['id']}/"
        stored = keys_under(s3, run)
        assert {run + "metrics.jsonl", run + "events.jsonl", run + "checkpoints/step_000002/state.json",
                run + "checkpoints/step_000002/policy/config.json", run + "checkpoints/step_000002/policy/tokenizer_config.json"} <= set(stored)
        assert not [k for k in stored if "step_000001" in k]  # pruned in S3 too
        metrics = s3["client"].get_object(Bucket=BUCKET, Key=run + "metrics.jsonl")["Body"].read().decode().splitlines()
        assert [json.loads(line)["step"] for line in metrics] == [1, 2]

        ckpts = alpha.get(f"/v1/jobs/{job['id']}/checkpoints").json()["data"]
        assert [c["step"] for c in ckpts] == [2] and ckpts[0]["bytes"] > 0, alpha.get(f"/v1/jobs/{job['id']}/logs", params={"tail": 40}).json()["logs"]
        with alpha.stream("GET", f"/v1/jobs/{job['id']}/checkpoints/{ckpts[0]['id']}/content") as r:
            assert r.status_code == 200
            names = tarfile.open(fileobj=io.BytesIO(r.read())).getnames()
        assert f"{ckpts[0]['id']}/policy/model.safetensors" in names
        events = alpha.get(f"/v1/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]
        saved = [e["message"] for e in events if e["type"] == "checkpoint"]
        assert saved[-1] == f"saved step 2 to runs/{job['id']}/checkpoints/step_000002"  # the tenant's own view of the path

        # A second job starts from that checkpoint by id: its model comes back from S3.
        second = alpha.post("/v1/jobs", json=job_body({"model": ckpts[0]["id"], "data": file["id"]}, workdir, "s3-next", 1)).json()
        done = wait_status(alpha, second["id"], {"succeeded", "failed", "cancelled"}, 480)
        assert done["status"] == "succeeded", done["error"]
        assert run.replace(job["id"], second["id"]) + "checkpoints/step_000001/state.json" in keys_under(s3, "store/tenants/alpha/runs/")
