"""Where a job's status, events and per-step metrics go.

Every reporter takes the same three calls. The run directory always gets `events.jsonl` and
`metrics.jsonl`; other reporters (a progress bar, Redis for the control plane, Ray's metrics
for the dashboard) are added beside it.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Protocol

from orchestrator.core.records import json_safe


class Reporter(Protocol):
    def event(self, type: str, message: str = "", **data: Any) -> None: ...

    def metrics(self, step: int, values: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class FileReporter:
    """Appends to `<run_dir>/events.jsonl` and `<run_dir>/metrics.jsonl`, one JSON object a line."""

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.events_path = self.dir / "events.jsonl"
        self.metrics_path = self.dir / "metrics.jsonl"
        # A crash in the middle of a write leaves a torn last line: cut it, and say so (`repairs`).
        self.repairs = [note for path in (self.events_path, self.metrics_path) if (note := _cut_torn_line(path))]
        self._seq = sum(1 for _ in self.events_path.open()) if self.events_path.exists() else 0

    def event(self, type: str, message: str = "", **data: Any) -> None:
        self._seq += 1
        record = {"seq": self._seq, "time": time.time(), "type": type, "message": message, **data}
        with self.events_path.open("a") as f:
            f.write(json.dumps(json_safe(record), default=str) + "\n")

    def metrics(self, step: int, values: dict[str, float]) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(json_safe({"step": step, "time": time.time(), **values})) + "\n")

    def rewind(self, after_step: int) -> None:
        """Drop metric lines past `after_step` (a resumed or restarted run writes them again)."""
        if not self.metrics_path.exists():
            return
        kept = [line for line in self.metrics_path.read_text().splitlines() if line.strip() and _step_of(line) <= after_step]
        self.metrics_path.write_text("".join(line + "\n" for line in kept))

    def close(self) -> None:
        pass


def _cut_torn_line(path: Path) -> str | None:
    """Truncate a JSONL file after its last complete line; what was cut, if anything."""
    if not path.exists():
        return None
    with path.open("rb+") as f:
        data = f.read()
        if not data or data.endswith(b"\n"):
            return None
        keep = data.rfind(b"\n") + 1
        f.truncate(keep)
    return f"dropped a torn last line of {path.name} ({len(data) - keep} bytes, from a write the last run did not finish)"


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")  # an unreadable line goes with the steps to be redone


class RunDirMirror:
    """Copies a local run directory's metrics and events to its URL (core/storage.py) after each
    checkpoint, at the end and at close: a URL run directory lags the local one by at most a checkpoint."""

    FILES = ("metrics.jsonl", "events.jsonl", "trajectories.jsonl")

    def __init__(self, local: str | Path, url: str):
        self.local, self.url = Path(local), url

    def event(self, type: str, message: str = "", **data: Any) -> None:
        if type in ("checkpoint", "status") and (type == "checkpoint" or data.get("status") in ("succeeded", "failed", "cancelled")):
            self.flush()

    def metrics(self, step: int, values: dict[str, float]) -> None:
        pass

    def flush(self) -> None:
        from orchestrator.core import storage

        for name in self.FILES:
            if (self.local / name).exists():
                storage.upload(self.local / name, storage.join(self.url, name))

    def close(self) -> None:
        self.flush()


class ProgressReporter:
    """A tqdm bar over the job's steps with live reward and KL."""

    def __init__(self, total: int, initial: int = 0):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
        self.eval: float | None = None  # the latest held-out score, shown until the next one

    def event(self, type: str, message: str = "", **data: Any) -> None:
        if type in ("warning", "error", "checkpoint", "stage", "weight_sync"):
            self.bar.write(f"[{type}] {message}")
        if type == "stage" and data.get("stage"):
            self.bar.set_description(str(data["stage"]))

    def metrics(self, step: int, values: dict[str, float]) -> None:
        for key in ("eval/reward/mean", "eval/accuracy", "eval/rewards/accuracies"):  # RL and SFT; rm; dpo
            self.eval = values.get(key, self.eval)
        shown = {"loss": values.get("loss"), "reward": values.get("reward/mean"), "kl": values.get("kl"),
                 "len": values.get("response_length/mean"), "eval": self.eval}
        self.bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items() if v is not None}, refresh=False)
        self.bar.update(step - self.bar.n)

    def rewind(self, after_step: int) -> None:
        self.bar.n = after_step
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


class RayMetricsReporter:
    """Exports the latest value of a few headline metrics as Ray gauges, so they show in the Ray
    dashboard's metrics view (and any Prometheus scraping Ray, as `ray_rlhf_*`), tagged with the job,
    its tenant (RLHF_TENANT, set by the control plane; `-` when run from the CLI) and the stage now
    running. deploy/grafana/rlhf.json charts them."""

    HEADLINE = ("reward/mean", "kl", "entropy", "policy_loss", "value_loss", "response_length/mean", "throughput/tokens_per_s", "timing/step")
    TAGS = ("job", "tenant", "stage")

    def __init__(self, job_id: str, tenant: str | None = None, stage: str | None = None):
        from ray.util.metrics import Gauge

        self.tags = {"job": job_id, "tenant": tenant or os.environ.get("RLHF_TENANT") or "-", "stage": stage or "-"}
        self.gauges = {
            name: Gauge("rlhf_" + name.replace("/", "_"), description=f"Latest {name} of an RLHF job.", tag_keys=self.TAGS)
            for name in self.HEADLINE
        }
        self.step = Gauge("rlhf_step", description="Last finished training step.", tag_keys=self.TAGS)

    def event(self, type: str, message: str = "", **data: Any) -> None:
        if data.get("stage"):  # a stage's events carry its name (pipeline.StageReporter)
            self.tags = {**self.tags, "stage": str(data["stage"])}

    def metrics(self, step: int, values: dict[str, float]) -> None:
        self.step.set(step, tags=self.tags)
        for name, gauge in self.gauges.items():
            value = values.get(name)
            if value is not None and math.isfinite(value):
                gauge.set(value, tags=self.tags)

    def close(self) -> None:
        pass


class MultiReporter:
    def __init__(self, *reporters: Reporter):
        self.reporters = [r for r in reporters if r is not None]

    def add(self, reporter: Reporter) -> None:
        self.reporters.append(reporter)

    def event(self, type: str, message: str = "", **data: Any) -> None:
        for r in self.reporters:
            r.event(type, message, **data)

    def metrics(self, step: int, values: dict[str, float]) -> None:
        for r in self.reporters:
            r.metrics(step, values)

    def rewind(self, after_step: int) -> None:
        """Forget the metrics of steps past `after_step`, in every reporter that keeps a history it can
        edit (the run directory, Redis): those steps are about to be redone. Experiment trackers keep
        both attempts."""
        for r in self.reporters:
            if hasattr(r, "rewind"):
                r.rewind(after_step)

    def close(self) -> None:
        for r in self.reporters:
            r.close()
