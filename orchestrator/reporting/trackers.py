"""Experiment trackers (TensorBoard, MLflow, Weights & Biases) as Reporters of the driver.

A job's spec turns them on (`trackers:`); each then gets every step's metrics, the job's config
and its stage. A tracker never fails or stalls the job: every library call runs on the tracker's
own thread, behind a bounded queue, with the spec's `trackers.timeout_s` on each network call and
no retries; when a call fails the job gets one `warning` event, the tracker's steps are dropped
for `RETRY_AFTER_S`, and then it is tried again. Warnings are emitted on the driver's thread (at
its next report, and before the job's final status), never from the tracker's thread.

The libraries are imported lazily, on the tracker's thread: `pip install rlhf-service[trackers]`.
"""

from __future__ import annotations

import json
import math
import os
import queue
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from orchestrator.core.records import TERMINAL
from orchestrator.core.spec import JobSpec

RETRY_AFTER_S = 10.0  # after a failure, a tracker's steps are dropped this long, then it is tried again
QUEUE_SIZE = 10_000  # steps and events waiting for a slow tracker; beyond it they are dropped (and counted)

Warn = Callable[..., None]  # warn(message, **data): a `warning` event through the job's reporters


@dataclass(frozen=True)
class RunInfo:
    """What a tracker names its run after and logs as its config."""

    job_id: str
    job_name: str
    tenant: str | None  # known when the control plane launched the job (RLHF_TENANT)
    stage: str  # the stage now running; a job without stages has one, named after its algorithm
    config: dict[str, Any]  # the validated spec, JSON-safe
    run_dir: Path
    timeout_s: float
    resume_step: int = 0  # a resumed driver logs again from resume_step + 1


class Tracker(Protocol):
    name: str

    def start(self, run: RunInfo) -> None: ...

    def log(self, step: int, values: dict[str, float]) -> None: ...

    def stage(self, name: str, step: int) -> None: ...

    def finish(self, status: str) -> None: ...


# --------------------------------------------------------------------------- the three trackers


class TensorBoardTracker:
    """Event files in `<run_dir>/tensorboard`, one scalar per metric (TensorBoard's own writer)."""

    name = "tensorboard"

    def start(self, run: RunInfo) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard hides what a crashed run logged past its last checkpoint.
        self.writer = SummaryWriter(str(run.run_dir / "tensorboard"), purge_step=run.resume_step + 1 if run.resume_step else None)
        self.writer.add_text("job", f"job `{run.job_id}` ({run.job_name}), tenant `{run.tenant or '-'}`", run.resume_step)
        self.writer.add_text("config", "```json\n" + json.dumps(run.config, indent=1) + "\n```", run.resume_step)
        self.writer.flush()

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # readers (TensorBoard, tests) see each step as it ends

    def stage(self, name: str, step: int) -> None:
        self.writer.add_text("stage", name, step)

    def finish(self, status: str) -> None:
        self.writer.add_text("status", status)
        self.writer.close()


MLFLOW_STATUS = {"succeeded": "FINISHED", "failed": "FAILED", "cancelled": "KILLED"}  # a job's end as an MLflow run's


class MlflowTracker:
    """One MLflow run per job, named after the job id, tagged with job, tenant and stage; the spec as
    params. A restarted driver finds its job's run by the `rlhf.job_id` tag and goes on logging to it."""

    name = "mlflow"
    PARAM_LIMIT = 500  # characters of a param value older MLflow servers accept

    def __init__(self, tracking_uri: str, experiment: str | None, tags: dict[str, str]):
        self.tracking_uri, self.experiment, self.tags = tracking_uri, experiment, tags

    def start(self, run: RunInfo) -> None:
        # MLflow's HTTP client reads these per request: one attempt bounded by trackers.timeout_s,
        # instead of its default of 7 retries with backoff, 120 s each.
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, math.ceil(run.timeout_s)))
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.tracking_uri)
        name = self.experiment or run.job_name
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            try:
                experiment_id = client.create_experiment(name)
            except MlflowException:  # another job created it first
                experiment_id = client.get_experiment_by_name(name).experiment_id
        else:
            experiment_id = experiment.experiment_id
        found = client.search_runs([experiment_id], filter_string=f"tags.`rlhf.job_id` = '{run.job_id}'", max_results=1)
        tags = {**self.tags, "rlhf.job_id": run.job_id, "rlhf.job_name": run.job_name, "rlhf.stage": run.stage}
        if run.tenant:
            tags["rlhf.tenant"] = run.tenant
        if found:
            self.run_id = found[0].info.run_id
            client.set_tag(self.run_id, "rlhf.stage", run.stage)
        else:
            self.run_id = client.create_run(experiment_id, run_name=run.job_id, tags=tags).info.run_id
            params = [Param(k, v[: self.PARAM_LIMIT]) for k, v in flatten(run.config).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
                client.log_batch(self.run_id, params=params[i : i + 100])
        self.client = client

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def stage(self, name: str, step: int) -> None:
        self.client.set_tag(self.run_id, "rlhf.stage", name)

    def finish(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=MLFLOW_STATUS.get(status, "FAILED"))


class WandbTracker:
    """One W&B run per job (id and name from the job id), the spec as its config. Offline, the run is
    written under `<run_dir>/wandb`; `wandb sync` uploads it later."""

    name = "wandb"

    def __init__(self, project: str, entity: str | None, mode: str, tags: list[str]):
        self.project, self.entity, self.mode, self.tags = project, entity, mode, tags

    def start(self, run: RunInfo) -> None:
        import wandb

        tags = [*self.tags, f"stage:{run.stage}"] + ([f"tenant:{run.tenant}"] if run.tenant else [])
        self.run = wandb.init(
            project=self.project, entity=self.entity, mode=self.mode, dir=str(run.run_dir), name=run.job_id,
            id=re.sub(r"[^A-Za-z0-9_-]", "-", run.job_id), resume="allow" if self.mode == "online" else None,
            group=run.job_name, job_type=run.stage, tags=[t[:64] for t in tags], reinit="create_new",
            config={**run.config, "rlhf": {"job_id": run.job_id, "tenant": run.tenant}},
            settings=wandb.Settings(silent=True, console="off", init_timeout=max(run.timeout_s, 30.0), x_disable_stats=True),
        )

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def stage(self, name: str, step: int) -> None:
        self.run.tags = tuple(t for t in self.run.tags if not t.startswith("stage:")) + (f"stage:{name}",)

    def finish(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "succeeded" else 1)


# --------------------------------------------------------------------------- one thread per tracker


class TrackerReporter:
    """The Reporter protocol around one Tracker: calls queue up for the tracker's own thread, which
    starts the tracker at the job's first step. Never raises; failures become `warning` events."""

    def __init__(self, tracker: Tracker, run: RunInfo, warn: Warn):
        self.tracker, self.run, self._warn = tracker, run, warn
        self._ops: queue.Queue = queue.Queue(QUEUE_SIZE)
        self._warnings: list[str] = []
        self._lock = threading.Lock()
        self._started = self._failing = self._finishing = False
        self._retry_at = 0.0
        self._dropped = 0
        self._step = run.resume_step
        self._thread = threading.Thread(target=self._work, name=f"rlhf-tracker-{tracker.name}", daemon=True)
        self._thread.start()

    # Reporter protocol, on the driver's thread.
    def event(self, type: str, message: str = "", **data: Any) -> None:
        if type == "resumed" and not self._started:
            self._put(("resumed", int(data.get("step", 0))))
        elif type == "stage" and data.get("stage"):
            self._put(("stage", str(data["stage"])))
        elif type == "status" and data.get("status") in TERMINAL:
            # Finish before the final status goes out, so that a warning about it comes first.
            self._finish(str(data["status"]))
        self._flush_warnings()

    def metrics(self, step: int, values: dict[str, float]) -> None:
        finite = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        self._put(("log", step, finite))
        self._flush_warnings()

    def close(self) -> None:
        self._finish("failed")  # no-op if the job's final status already finished it
        self._flush_warnings()

    # Internals.
    def _finish(self, status: str) -> None:
        if self._finishing:
            return
        self._finishing = True
        self._put(("finish", status), block=True)
        deadline = 2 * self.run.timeout_s + 10  # a failing finish, plus a slow start still in flight
        self._thread.join(deadline)
        if self._thread.is_alive():
            self._note(f"tracker {self.tracker.name} did not finish within {deadline:.0f} s; the job goes on without it")

    def _put(self, op: tuple, block: bool = False) -> None:
        try:
            self._ops.put(op, block=block, timeout=1.0 if block else None)
        except queue.Full:
            self._dropped += 1

    def _note(self, message: str) -> None:
        with self._lock:
            self._warnings.append(message)

    def _flush_warnings(self) -> None:
        with self._lock:
            pending, self._warnings = self._warnings, []
        for message in pending:  # (the warning comes back to this reporter as an event: nothing is pending then)
            self._warn(message, tracker=self.tracker.name)

    def _work(self) -> None:
        while True:
            op = self._ops.get()
            kind = op[0]
            if kind == "resumed":
                self.run = replace(self.run, resume_step=op[1])
                continue
            if kind == "stage" and not self._started:
                self.run = replace(self.run, stage=op[1])
                continue
            if kind == "finish" and not self._started:
                return  # no step was ever logged: no run to finish
            if kind == "log" and time.monotonic() < self._retry_at:
                self._dropped += 1
                continue
            self._call(op)
            if kind == "finish":
                return

    def _call(self, op: tuple) -> None:
        kind = op[0]
        try:
            if not self._started:
                self.tracker.start(self.run)
                self._started = True
            if kind == "log":
                self.tracker.log(op[1], op[2])
                self._step = op[1]
            elif kind == "stage":
                self.tracker.stage(op[1], self._step + 1)
            elif kind == "finish":
                self.tracker.finish(op[1])
        except Exception as err:  # noqa: BLE001 - a tracker's failure must never reach the job
            if not self._failing or kind == "finish":
                what = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}"
                self._note(f"tracker {self.tracker.name} failed ({kind}): {what}; the job goes on, its steps are not "
                           f"logged to {self.tracker.name} until it answers again (tried every {RETRY_AFTER_S:.0f} s)")
            self._failing, self._retry_at = True, time.monotonic() + RETRY_AFTER_S
            if kind == "log":
                self._dropped += 1
            return
        if self._failing:
            self._note(f"tracker {self.tracker.name} answers again; {self._dropped} steps were not logged to it")
            self._failing, self._dropped = False, 0


# --------------------------------------------------------------------------- assembly


def tracker_reporters(spec: JobSpec, job_id: str, warn: Warn, tenant: str | None = None) -> list[TrackerReporter]:
    """A TrackerReporter for each tracker the spec turns on (none: an empty list, nothing imported)."""
    t = spec.trackers
    trackers: list[Tracker] = []
    if t.tensorboard:
        trackers.append(TensorBoardTracker())
    if t.mlflow.tracking_uri:
        trackers.append(MlflowTracker(t.mlflow.tracking_uri, t.mlflow.experiment, dict(t.mlflow.tags)))
    if t.wandb.project:
        trackers.append(WandbTracker(t.wandb.project, t.wandb.entity, t.wandb.mode, list(t.wandb.tags)))
    if not trackers:
        return []
    run = RunInfo(
        job_id=job_id, job_name=spec.name, tenant=tenant or os.environ.get("RLHF_TENANT") or None,
        stage=spec.stages[0].name if spec.stages else spec.algorithm.name, config=spec.model_dump(mode="json"),
        run_dir=spec.run_dir.resolve(), timeout_s=t.timeout_s,
    )
    return [TrackerReporter(tracker, run, warn) for tracker in trackers]


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"optim.lr": "0.001", ...}: nested sections as dotted keys, lists and nulls as JSON."""
    out: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, str) else json.dumps(value)
    return out
