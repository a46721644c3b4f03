"""The operator's side: the registry file, tenant areas, upload checks, and what the API makes of a Redis or a Ray that fails it."""

import json
import subprocess

import pytest

from api.registry import Registry, RegistryError
from api.storage import ArtifactStore, tenant_dirname
from orchestrator.core.rows import DataError, check_upload


def test_registry_file_errors_name_the_entry(tmp_path):
    path = tmp_path / "registry.yaml"
    cases = [
        ("models:\n  good: {path: /m}\n  bad: {path: /m, trust_remote_code: maybe}\n", r"registry.yaml: models.bad.trust_remote_code"),
        ("environments:\n  calculator: orchestrator.core.environments:CalculatorEnv\n",
         r"environments.calculator: a built-in environment has this name"),
        ("environments:\n  mine: 'os.system'\n", r"environments.mine: 'os.system' is not an import path 'pkg.module:Class'"),
        ("reward_functions:\n  mine: 'not an import path'\n", r"reward_functions.mine: 'not an import path' is not an import path"),
        ("models:\n  'a/b': {path: /m}\n", r"'a/b' is not a valid name"),
    ]
    for text, message in cases:
        path.write_text(text)
        with pytest.raises(RegistryError, match=message):
            Registry.load(path)
    with pytest.raises(RegistryError, match="registry file not found"):
        Registry.load(tmp_path / "missing.yaml")
    assert Registry.load(None).models == {}


def test_registry_models_per_tenant(tmp_path):
    path = tmp_path / "registry.yaml"
    path.write_text("models:\n  open: {path: /a}\n  closed: {path: /b, tenants: [acme]}\n")
    registry = Registry.load(path)
    assert registry.model_for("open", "anyone").path == "/a"
    assert registry.model_for("closed", "anyone") is None
    assert registry.model_for("closed", "acme").path == "/b"
    assert sorted(registry.visible_models("acme")) == ["closed", "open"]


def test_tenant_areas_never_collide_or_escape(tmp_path):
    names = ["acme", "../acme", "acme/..", "ac me", ".hidden", "", "a" * 200, "acme_"]
    dirs = [tenant_dirname(n) for n in names]
    assert len(set(dirs)) == len(dirs)
    assert all("/" not in d and d not in (".", "..") and not d.startswith(".") for d in dirs)
    assert tenant_dirname("acme") == "acme"
    store = ArtifactStore(str(tmp_path / "root"))
    assert store.run_path("../x", "job-1").startswith(store.root + "/tenants/")
    hidden = store.hide({"message": f"saved to {store.tenant_root('acme')}/runs/job-1/x", "n": 1}, "acme")
    assert hidden == {"message": "saved to runs/job-1/x", "n": 1}


def test_upload_checks_parquet_and_counts_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = tmp_path / "p.parquet"
    pq.write_table(pa.table({"chosen": ["a", "b"], "rejected": ["c", "d"]}), good)
    assert check_upload(good, "preference", "mine.parquet") == 2
    with pytest.raises(DataError, match=r"mine.parquet row 0: missing column 'prompt'"):
        check_upload(good, "train", "mine.parquet")
    broken = tmp_path / "b.parquet"
    broken.write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="mine.parquet: not a readable Parquet file"):
        check_upload(broken, "train", "mine.parquet")
    chat = tmp_path / "c.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}) + "\n")
    assert check_upload(chat, "sft") == 1


def test_a_spec_too_big_to_carry_to_the_driver_is_refused_at_submit():
    from api.errors import APIError
    from api.routers.jobs import MAX_SPEC_ENV_BYTES, check_carriable

    check_carriable({"name": "x" * (MAX_SPEC_ENV_BYTES - 100)})
    with pytest.raises(APIError) as err:
        check_carriable({"name": "x" * MAX_SPEC_ENV_BYTES})
    assert err.value.status == 413 and err.value.code == "spec_too_large"


def test_the_api_refuses_a_redis_that_keeps_nothing_on_disk(tmp_path, keys):
    import subprocess
    import sys

    import redis

    from tests.api.conftest import RAY_ENV, free_port, stop_group, wait_until

    port, api_port = free_port(), free_port()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--appendonly", "no", "--save", ""],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until(redis.Redis(port=port).ping, 15, "a volatile redis-server")
        env = {**__import__("os").environ, **RAY_ENV, "RLHF_API_REDIS_URL": f"redis://127.0.0.1:{port}/0", "RLHF_API_PORT": str(api_port),
               "RLHF_API_API_KEYS_FILE": str(keys["path"]), "RLHF_API_STORAGE_ROOT": str(tmp_path / "store")}
        out = subprocess.run([sys.executable, "-m", "orchestrator.entrypoints.cli", "serve"], env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode != 0
        assert "keeps nothing on disk (appendonly no, save '')" in out.stdout + out.stderr
    finally:
        stop_group(server)


def test_a_job_whose_ray_stays_unreachable_fails_at_the_deadline(tmp_path, keys):
    """An API whose Ray is gone (nothing listens at its address), on a Redis of its own holding one
    admitted, running job: past the deadline the job is failed as `ray_unreachable` (not `running` for
    as long as Ray stays away), and is listed to be stopped once Ray answers again."""
    import asyncio
    import os

    import redis

    from api.reconciler import ORPHANS_KEY
    from api.store import JobStore
    from tests.api.conftest import RAY_ENV, ApiServer, free_port, stop_group, wait_until

    port = free_port()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path), "--appendonly", "yes"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        wait_until(redis.Redis(port=port).ping, 15, "redis-server")

        async def running_job():
            store = JobStore(url)
            await store.create("job-gone", "acme", "gone", {"name": "gone"}, {}, None, launch_spec={"name": "gone"}, demand=[], priority=0)
            await store.set_fields("job-gone", admitted_at=1.0)
            await store.transition("job-gone", "running", "running")
            await store.close()

        asyncio.run(running_job())
        api_port = free_port()
        env = {**os.environ, **RAY_ENV, "RLHF_API_REDIS_URL": url, "RLHF_API_PORT": str(api_port), "RLHF_API_API_KEYS_FILE": str(keys["path"]),
               "RLHF_API_RAY_ADDRESS": f"http://127.0.0.1:{free_port()}", "RLHF_API_RAY_UNREACHABLE_DEADLINE_S": "2",
               "RLHF_API_RECONCILE_INTERVAL_S": "0.5", "RLHF_API_STORAGE_ROOT": str(tmp_path / "store")}
        api = ApiServer(env, api_port, tmp_path / "api.log")
        api.start()
        try:
            client = redis.Redis(port=port, decode_responses=True)
            wait_until(lambda: client.hget("rlhf:job:job-gone", "status") == "failed", 60, "the job to be failed")
            error = json.loads(client.hget("rlhf:job:job-gone", "error"))
            assert error["code"] == "ray_unreachable" and error["message"].startswith("Ray did not answer about this job for ")
            assert client.smembers(ORPHANS_KEY) == {"job-gone"}
        finally:
            api.stop()
    finally:
        stop_group(server)


@pytest.mark.parametrize("env, needle", [
    ({"RLHF_API_QUOTAS": '{"team-a": {"cpu": 2}}'}, "error: invalid settings: RLHF_API_QUOTAS (quotas.team-a.cpu): Extra inputs are not permitted"),
    ({"RLHF_API_REGISTRY_FILE": "/nonexistent/registry.yaml"}, "error: registry file not found: /nonexistent/registry.yaml"),
])
def test_rlhf_serve_names_a_bad_setting_in_one_line(tmp_path, keys, env, needle):
    import os
    import sys

    full = {**os.environ, "RLHF_API_API_KEYS_FILE": str(keys["path"]), "RLHF_API_STORAGE_ROOT": str(tmp_path / "store"), **env}
    out = subprocess.run([sys.executable, "-m", "orchestrator.entrypoints.cli", "serve"], env=full, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and needle in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]
