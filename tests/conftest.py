"""Shared fixtures: a tiny local model, arithmetic data, spec files, and one local Ray for the session."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# Before torch loads OpenMP: spinning barriers make a 2-thread torch many times slower whenever
# another process (a Ray actor, a server) wants a core. The job's actors set the same.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from orchestrator.tiny_model import init_model

    return init_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def arith_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [{"prompt": f"{a}+{b}=", "answer": a + b} for a in range(8) for b in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_spec(model_dir: Path, data_file: Path, out: Path, **overrides) -> dict:
    """A job spec small enough for a test: a few steps of a few prompts. Sections in overrides are merged."""
    spec = {
        "api_version": "rlhf/v1",
        "name": out.name,
        "algorithm": {"name": "grpo"},
        "model": {"path": str(model_dir)},
        "data": {"train_file": str(data_file), "max_prompt_length": 16},
        "rollout": {"n": 4, "max_new_tokens": 4},
        "rewards": [{"function": "accuracy"}, {"function": "length_penalty", "weight": 0.1}],
        "optim": {"lr": 1e-3, "steps": 3, "prompts_per_step": 4, "seed": 0},
        "output_dir": str(out),
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return spec


def write_spec(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the in-process end-to-end tests (a driver per job, as on a cluster)."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def run_entrypoint(spec_path: Path, *args: str, timeout: float = 300, env: dict | None = None):
    import subprocess

    return subprocess.run(
        [sys.executable, "-m", "orchestrator.run", "--spec", str(spec_path), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# ------------------------------------------------------------ a real Ray head, for job submission

RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    last_err = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except Exception as err:  # noqa: BLE001 - keep polling until the deadline
            last_err = err
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}" + (f" (last error: {last_err})" if last_err else ""))


def stop_group(proc: subprocess.Popen, timeout: float = 15) -> None:
    """End a process we started in its own session, and its children, by process group."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        except ProcessLookupError:
            pass
    try:  # children left behind in the group (Ray workers)
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class RayHead:
    def __init__(self, address: str, dashboard: str):
        self.address, self.dashboard = address, dashboard


@pytest.fixture(scope="session")
def ray_head():
    gcs = free_port()
    assert gcs != 6379
    dash, client_port, agent, metrics = free_port(), free_port(), free_port(), free_port()
    import httpx

    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**os.environ, **RAY_ENV}
    cmd = [
        "ray", "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--include-dashboard", "true",
        "--ray-client-server-port", str(client_port), "--dashboard-agent-listen-port", str(agent),
        "--metrics-export-port", str(metrics), "--num-cpus", "4", "--temp-dir", temp, "--disable-usage-stats",
    ]
    log = open(Path(temp) / "ray-start.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    dashboard = f"http://127.0.0.1:{dash}"

    def up():
        if proc.poll() is not None:
            raise RuntimeError(f"`ray start` exited with {proc.returncode}; see {log.name}")
        return httpx.get(f"{dashboard}/api/version", timeout=2).status_code < 500

    wait_until(up, 90, f"the Ray dashboard at {dashboard}", interval=1)
    yield RayHead(f"127.0.0.1:{gcs}", dashboard)
    stop_group(proc, timeout=10)
    log.close()


