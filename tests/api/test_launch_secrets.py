"""What a launched job exposes on its node, and where a tenant's spec may send data (issue 27, item 9).

- No process of a job carries the job's Redis password or its launch spec on its command line:
  Ray writes a runtime_env's env_vars into every worker's command line as it starts it
  (`setup_worker.py --serialized-runtime-env-context=...`), so they travel in a launch file instead.
- `trackers.wandb.mode: online` is an operator setting over REST.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from ray.job_submission import JobSubmissionClient

from tests.api.conftest import (
    api_settings,
    in_process,
    job_body,
    wait_admitted,
    wait_status,
)


class CommandLines:
    """Every command line seen on this machine while it runs, read from /proc as fast as it can:
    a worker's startup command line lives about a second before the worker replaces it."""

    def __init__(self):
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._scan, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)

    def _scan(self):
        while not self._stop.is_set():
            for pid in os.listdir("/proc"):
                if pid.isdigit():
                    try:
                        self.seen.add(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
                    except OSError:  # gone meanwhile
                        pass
            self._stop.wait(0.01)


def job_password(ray_head, workdir: Path, job_id: str) -> str:
    """The job's Redis password, from wherever the control plane handed it to the job: the Ray job's
    env_vars (before) or the launch file in its run directory (now)."""
    env = JobSubmissionClient(ray_head.dashboard).get_job_info(job_id).runtime_env.get("env_vars") or {}
    url = env.get("RLHF_REDIS_URL")
    if url is None:
        url = json.loads((workdir / "artifacts" / "tenants" / "alpha" / "runs" / job_id / ".launch.json").read_text())["env"]["RLHF_REDIS_URL"]
    return unquote(urlsplit(url).password or "")


@pytest.mark.slow
def test_no_process_of_a_job_has_its_password_or_spec_on_its_command_line(served_alpha, tiny, workdir, ray_head):
    alpha = served_alpha
    with CommandLines() as lines:
        r = alpha.post("/v1/jobs", json=job_body(tiny, workdir, "cmdline", 2))
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        wait_admitted(alpha, job_id)
        password = job_password(ray_head, workdir, job_id)
        job = wait_status(alpha, job_id, {"succeeded", "failed"}, 300)
    assert job["status"] == "succeeded", job["error"]
    assert len(password) >= 32
    workers = [c for c in lines.seen if "setup_worker.py" in c or "default_worker.py" in c]
    assert workers, "no Ray worker's command line was seen while the job ran"
    # The resolved spec names the upload by its server path; its file id is nowhere else.
    leaks = [c[:300] for c in lines.seen if password in c or tiny["data"] in c]
    assert not leaks, leaks
    env = JobSubmissionClient(ray_head.dashboard).get_job_info(job_id).runtime_env["env_vars"]
    assert not {"RLHF_REDIS_URL", "RLHF_SPEC_JSON"} & set(env) and password not in json.dumps(env)
    launch = workdir / "artifacts" / "tenants" / "alpha" / "runs" / job_id / ".launch.json"
    assert launch.stat().st_mode & 0o777 == 0o600  # the owner only (the API's and the driver's user)


def test_wandb_online_is_an_operator_setting(alpha, tiny, workdir, redis_url, keys, operator):
    body = job_body(tiny, workdir, "wandb", 2, trackers={"wandb": {"project": "p", "entity": "someone-else", "mode": "online"}})
    r = alpha.post("/v1/jobs", json=body)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["param"] == "trackers.wandb.mode" and "RLHF_API_WANDB_ONLINE" in error["message"], error
    offline = {**body, "trackers": {"wandb": {"project": "p", "mode": "offline"}}, "output_dir": "x"}
    assert alpha.post("/v1/jobs", json=offline).json()["error"]["param"] == "output_dir"  # past the tracker check

    # An operator who allows it: the same spec passes the check (refused here only for its output_dir, so that nothing runs).
    with in_process(api_settings(redis_url, keys["path"], operator, RLHF_API_WANDB_ONLINE="true")) as api, api.client(keys["alpha"]) as c:
        r = c.post("/v1/jobs", json={**body, "output_dir": "x"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "output_dir", r.text


def test_a_launch_file_a_job_rewrote_is_not_read_back(tmp_path):
    """A record rebuilt from the launch file would be launched again: the job's own processes can write
    its run directory, so only the content whose digest Ray's metadata holds counts."""
    import hashlib
    import json as _json

    from api.launcher import RayLauncher
    from api.settings import Settings

    launcher = RayLauncher(Settings(storage_root=str(tmp_path)))
    job = "job-" + "a" * 24
    path = launcher.launch_file("alpha", job)
    data = _json.dumps({"spec": {"name": "x"}, "env": {"RLHF_REDIS_URL": "redis://u:p@127.0.0.1:1/0"}}).encode()
    launcher._write_launch_file(path, data)
    digest = hashlib.sha256(data).hexdigest()
    assert launcher._read_launch_env("alpha", job, digest)["RLHF_SPEC_JSON"] == '{"name": "x"}'
    tampered = _json.dumps({"spec": {"name": "x", "rewards": [{"function": "os:system"}]}, "env": {}}).encode()
    launcher._write_launch_file(path, tampered)
    assert launcher._read_launch_env("alpha", job, digest) == {}
    assert launcher._read_launch_env("alpha", job, None) == {}
