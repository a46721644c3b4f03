"""Experiment trackers from the driver, against the real things: TensorBoard event files read back
with TensorBoard's own reader, a W&B offline run read back from its file, a real MLflow tracking
server (`mlflow server` on SQLite, on a free loopback port) receiving a job's metrics step by step,
and that server stopped mid-job: a `warning` event, and the job succeeds.

The jobs run in this process (`run_job`, as `rlhf train` does) on the session's Ray head.
"""

from __future__ import annotations

import os
import re
import socket
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from orchestrator.entrypoints.run import run_job
from tests.conftest import (
    free_port,
    read_jsonl,
    stop_group,
    tiny_spec,
    wait_until,
    write_spec,
)

pytestmark = pytest.mark.slow
for _lib in ("mlflow", "tensorboard", "wandb"):
    pytest.importorskip(_lib, reason="pip install -e '.[test,trackers]'")

HEADLINE = ("reward/mean", "entropy", "response_length/mean", "timing/step")


class MlflowServer:
    """`mlflow server` with a SQLite backend, in its own process group."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / "mlflow-server.log"
        cmd = [
            sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
        ]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job-runner process
        self.proc = subprocess.Popen(cmd, stdout=self.log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def wait_ready(self) -> None:
        def up():
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            return httpx.get(f"{self.url}/health", timeout=2).status_code == 200

        wait_until(up, 180, f"mlflow server at {self.url}", interval=0.25)

    def stop(self) -> None:
        stop_group(self.proc)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """Started when the module's first test starts, so that it boots while that test's job runs."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    yield server
    server.stop()


JOBS: list[tuple[str, int]] = []  # (job id, steps) of the jobs this module ran in this process, newest last


def run_tracked_job(tmp_path, tiny_model, arith_file, monkeypatch, trackers: dict, steps: int = 3, extra=None, job_id=None):
    job_id = job_id or f"job-{uuid.uuid4().hex[:12]}"
    JOBS.append((job_id, steps))
    monkeypatch.setenv("RLHF_JOB_ID", job_id)  # as the control plane sets them
    monkeypatch.setenv("RLHF_TENANT", "team-a")
    spec = tiny_spec(tiny_model, arith_file, tmp_path / "run", optim={"steps": steps}, trackers=trackers)
    code = run_job(write_spec(tmp_path / "job.yaml", spec), extra_reporters=extra)
    run_dir = tmp_path / "run"
    events = read_jsonl(run_dir / "events.jsonl")
    assert code == 0, [e for e in events if e["type"] in ("error", "warning")]
    return job_id, run_dir, read_jsonl(run_dir / "metrics.jsonl"), events


# --------------------------------------------------------------------------- TensorBoard and W&B


def wandb_records(path: Path):
    """The records of a W&B run file: a 7-byte header (`:W&B`, magic, version), then LevelDB's log
    format (32 KiB blocks of chunks, each `crc32 | length (2, LE) | type (1)`: full, first, middle, last)."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", path
    pos, record = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        record = chunk if kind in (1, 2) else record + chunk
        if kind in (1, 4):
            parsed = wandb_internal_pb2.Record()
            parsed.ParseFromString(record)
            yield parsed


def test_tensorboard_and_wandb_offline_get_every_step(ray_session, tiny_model, arith_file, tmp_path, monkeypatch, mlflow_server):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trackers = {"tensorboard": True, "wandb": {"project": "rlhf-tests", "mode": "offline", "tags": ["suite:trackers"]}}
    job_id, run_dir, metrics, events = run_tracked_job(tmp_path, tiny_model, arith_file, monkeypatch, trackers)
    assert not [e for e in events if e["type"] == "warning"]
    assert [m["step"] for m in metrics] == [1, 2, 3]

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    for key in HEADLINE:
        got = [(s.step, s.value) for s in acc.Scalars(key)]
        assert got == [(m["step"], pytest.approx(m[key], rel=1e-6)) for m in metrics], key
    assert {"config/text_summary", "job/text_summary"} <= set(acc.Tags()["tensors"])
    config = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"train_file"' in config and str(arith_file) in config

    (run_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    # run.finish() returns once wandb-core has the exit; its writer may still be flushing the file.
    records = wait_until(lambda: (rs := list(wandb_records(run_file))) and rs[-1].WhichOneof("record_type") == "exit" and rs,
                         30, "W&B's writer to close the offline run file")
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.display_name == job_id and run.run_id == job_id and run.project == "rlhf-tests"
    assert {"suite:trackers", "tenant:team-a", "stage:grpo"} <= set(run.tags)
    assert any(c.key == "optim" for c in run.config.update)
    history = [{i.key or "/".join(i.nested_key): i.value_json for i in r.history.item} for r in records if r.WhichOneof("record_type") == "history"]
    assert [int(h["_step"]) for h in history] == [1, 2, 3]
    assert [float(h["reward/mean"]) for h in history] == [pytest.approx(m["reward/mean"], rel=1e-6) for m in metrics]


# --------------------------------------------------------------------------- MLflow


def find_run(client, job_id: str):
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], filter_string=f"tags.`rlhf.job_id` = '{job_id}'", max_results=2
    )
    assert len(runs) == 1, runs
    return runs[0]


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_mlflow_gets_each_step_under_the_jobs_run(ray_session, tiny_model, arith_file, tmp_path, monkeypatch, mlflow_server):
    from mlflow.tracking import MlflowClient

    mlflow_server.wait_ready()
    client = MlflowClient(mlflow_server.url)
    seen_live: list[int] = []

    class Live:
        """At each step, the previous step is in MLflow already (it is logged as the job goes, not at its end)."""

        def event(self, type, message="", **data):
            pass

        def metrics(self, step, values):
            if step > 1:
                wait_until(lambda: step - 1 in [s for s, _ in history(client, find_run(client, job_id).info.run_id, "reward/mean")],
                           60, f"step {step - 1} in MLflow")
                seen_live.append(step - 1)

        def close(self):
            pass

    job_id = f"job-{uuid.uuid4().hex[:12]}"
    trackers = {"mlflow": {"tracking_uri": mlflow_server.url, "experiment": "rlhf-tests", "tags": {"suite": "trackers"}}}
    _, _, metrics, events = run_tracked_job(tmp_path, tiny_model, arith_file, monkeypatch, trackers, extra=[Live()], job_id=job_id)
    assert not [e for e in events if e["type"] == "warning"]
    assert seen_live == [1, 2]

    run = find_run(client, job_id)
    assert run.info.run_name == job_id and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "rlhf-tests"
    tags = run.data.tags
    assert (tags["rlhf.job_id"], tags["rlhf.tenant"], tags["rlhf.stage"], tags["suite"]) == (job_id, "team-a", "grpo", "trackers")
    assert run.data.params["optim.lr"] == "0.001" and run.data.params["algorithm.name"] == "grpo"
    for key in HEADLINE:
        assert history(client, run.info.run_id, key) == [(m["step"], pytest.approx(m[key], rel=1e-6)) for m in metrics], key


def test_mlflow_server_stopped_mid_job_gives_a_warning_and_the_job_succeeds(
    ray_session, tiny_model, arith_file, tmp_path, monkeypatch, mlflow_server
):
    """The module's last test: it stops the module's server."""
    from mlflow.tracking import MlflowClient

    mlflow_server.wait_ready()
    client = MlflowClient(mlflow_server.url)

    class StopServerAtStep2:
        def event(self, type, message="", **data):
            pass

        def metrics(self, step, values):
            if step == 2:  # once step 2 reached MLflow (the tracker logs from its own thread), stop the server
                wait_until(lambda: len(history(client, find_run(client, job_id).info.run_id, "reward/mean")) == 2, 60, "step 2 in MLflow")
                mlflow_server.stop()

        def close(self):
            pass

    trackers = {"mlflow": {"tracking_uri": mlflow_server.url, "experiment": "rlhf-tests"}, "timeout_s": 2}
    job_id = f"job-{uuid.uuid4().hex[:12]}"
    _, _, metrics, events = run_tracked_job(tmp_path, tiny_model, arith_file, monkeypatch, trackers, steps=4, extra=[StopServerAtStep2()], job_id=job_id)
    assert mlflow_server.proc.poll() is not None
    warnings = [e for e in events if e["type"] == "warning" and e.get("tracker") == "mlflow"]
    assert warnings and "tracker mlflow failed" in warnings[0]["message"], [e["message"] for e in events]
    final = [e for e in events if e["type"] == "status"][-1]
    assert final["status"] == "succeeded" and final["seq"] > warnings[-1]["seq"]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]


def test_a_tracker_server_that_never_answers_stalls_no_step(tiny_model, arith_file, tmp_path):
    """A socket that accepts connections (its backlog) and never answers: the driver's calls return at
    once, the tracker gives up after `timeout_s` with no retries, and the job gets a warning."""
    import mlflow.tracking  # noqa: F401  (imported here, so that the tracker's thread times only the call)

    from orchestrator.core.spec import parse_spec
    from orchestrator.reporting.trackers import tracker_reporters

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        trackers = {"mlflow": {"tracking_uri": f"http://127.0.0.1:{silent.getsockname()[1]}"}, "timeout_s": 1}
        spec = parse_spec(tiny_spec(tiny_model, arith_file, tmp_path / "run", trackers=trackers))
        warnings = []
        (reporter,) = tracker_reporters(spec, "job-silent", lambda message, **data: warnings.append((message, data)))
        start = time.monotonic()
        for step in range(1, 101):
            reporter.metrics(step, {"reward/mean": 0.5, "kl": float("nan")})
        assert time.monotonic() - start < 0.5  # the driver never waits for a tracker
        reporter.event("status", "succeeded", status="succeeded")  # the job's end waits a bounded time
        waited = time.monotonic() - start
    assert waited < 2 * 1 + 10, waited
    assert len(warnings) == 1 and warnings[0][1] == {"tracker": "mlflow"}, warnings
    assert "tracker mlflow failed (log)" in warnings[0][0] and "the job goes on" in warnings[0][0]


# --------------------------------------------------------------------------- Ray gauges


def test_ray_gauges_are_tagged_with_job_tenant_and_stage(ray_session, tiny_model, arith_file, tmp_path, monkeypatch):
    """The headline gauges of the module's last job (this process was its driver; a driver process runs
    one job), as Ray's metrics agent exports them to Prometheus, carry the job id, the tenant and the
    stage as labels."""
    if not JOBS:
        run_tracked_job(tmp_path, tiny_model, arith_file, monkeypatch, {})
    job_id, steps = JOBS[-1]
    node = ray_session.nodes()[0]
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    pattern = re.compile(r'^ray_rlhf_(step|reward_mean)\{([^}]*)\} (\S+)$', re.MULTILINE)

    def series():
        found = {}
        for name, labels, value in pattern.findall(httpx.get(url, timeout=5).text):
            tags = dict(re.findall(r'(\w+)="([^"]*)"', labels))
            if tags.get("job") == job_id:
                found[name] = (tags, float(value))
        return found if len(found) == 2 else None

    try:
        found = wait_until(series, 60, f"the gauges of {job_id} at {url}", interval=1)
    except TimeoutError:
        print("\n".join(line for line in httpx.get(url, timeout=5).text.splitlines() if line.startswith("ray_rlhf_step")))
        raise
    for name, (tags, _) in found.items():
        assert (tags["tenant"], tags["stage"]) == ("team-a", "grpo"), (name, tags)
    assert 1 <= found["step"][1] <= steps  # (Ray exports a gauge's value every few seconds: it may lag)
