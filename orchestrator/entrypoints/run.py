"""The job entrypoint: `python -m orchestrator.entrypoints.run --spec job.yaml [--resume]`.

This is what `ray job submit` runs on a cluster and what `rlhf train` runs on an embedded Ray.
Bad input ends with one clear line on stderr, an `error` event in events.jsonl and a non-zero
exit code (2 for bad input, 1 for a failure while training, 130 for a cancelled job).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

from orchestrator.runtime import stopping
from orchestrator.core.data import DataError
from orchestrator.core.spec import JobSpec, SpecError, load_spec, read_spec_file
from orchestrator.stages.driver import PhaseTimeout
from orchestrator.runtime.recovery import (
    RayClusterLost,
    RestartsExhausted,
    cluster_lost_error,
    cluster_restarted,
)
from orchestrator.runtime.stopping import Cancelled, StopRequested
from workers.common import ModelLoadError
from workers.reward import RewardError

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_CANCELLED = 0, 1, 2, 130


def guess_run_dir(spec_path: str | Path) -> Path:
    """The run directory of a spec that may not validate: its output_dir or name if readable."""
    try:
        raw = read_spec_file(spec_path)
    except SpecError:
        raw = None
    raw = raw if isinstance(raw, dict) else {}
    if isinstance(raw.get("output_dir"), str):
        return Path(raw["output_dir"])
    name = raw.get("name") if isinstance(raw.get("name"), str) and raw.get("name", "").replace("-", "").replace("_", "").replace(".", "").isalnum() else "job"
    return Path("runs") / name


def spec_from_env(arg: str | Path) -> str | Path:
    """`--spec env:NAME` reads the spec (JSON) from an environment variable; `--spec launch:NAME`
    from the launch file whose path (or URL) is in that variable: how the control plane hands a
    validated spec and the job's Redis credentials to its driver. (Not in environment variables of
    the Ray job: Ray puts those on the command line of every worker process it starts for the job.)"""
    if str(arg).startswith("launch:"):
        return spec_from_launch_file(str(arg))
    if not str(arg).startswith("env:"):
        return arg
    name = str(arg)[len("env:") :]
    text = os.environ.get(name)
    if text is None:
        raise SpecError(f"--spec {arg}: environment variable {name} is not set")
    return _private_spec_file(text)


def spec_from_launch_file(arg: str) -> Path:
    """The launch file's spec (written to a private temporary file), and its `env` (the job's Redis
    URL) into this process's environment, where the reporters find it."""
    from orchestrator.core import storage

    name = arg[len("launch:") :]
    location = os.environ.get(name)
    if not location:
        raise SpecError(f"--spec {arg}: environment variable {name} is not set")
    try:
        fs, path = storage.filesystem(location)
        with fs.open(path, "rb") as f:
            content = json.loads(f.read())
        spec, env = content["spec"], content.get("env") or {}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SpecError(f"--spec {arg}: the launch file {location} cannot be read: {type(err).__name__}: {err}") from None
    os.environ.update({k: str(v) for k, v in env.items() if k.startswith("RLHF_")})
    return _private_spec_file(json.dumps(spec))


def _private_spec_file(text: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix="rlhf-spec-")) / "spec.json"  # (mkdtemp: a directory only this user reads)
    path.write_text(text)
    return path


def job_id_for(spec: JobSpec) -> str:
    return os.environ.get("RLHF_JOB_ID") or spec.name


def describe_error(err: BaseException) -> tuple[str, str]:
    """(error code, one-line message) for an exception, unwrapping Ray's wrappers to the user's error."""
    from ray.exceptions import RayActorError, RayTaskError

    if isinstance(err, RayTaskError) and getattr(err, "cause", None) is not None:
        return describe_error(err.cause)
    if cluster_restarted(err):  # met outside a stage's recovery (e.g. while releasing its actors)
        return "ray_job_lost", str(cluster_lost_error(err))
    if isinstance(err, RayActorError):
        text = str(err)
        for cls in (ModelLoadError, RewardError, DataError):
            marker = f"{cls.__name__}: "
            if marker in text:
                line = text[text.rindex(marker) + len(marker) :].splitlines()[0]
                return _CODES[cls], line
        return "actor_died", text.strip().splitlines()[0]
    for cls, code in _CODES.items():
        if isinstance(err, cls):
            return code, str(err)
    return "internal_error", f"{type(err).__name__}: {err}"


_CODES = {SpecError: "invalid_spec", DataError: "invalid_data", ModelLoadError: "model_load_error", RewardError: "reward_error",
          PhaseTimeout: "timeout", RestartsExhausted: "actor_died", RayClusterLost: "ray_job_lost"}


def reporters_from_env(job_id: str, history: Path | None = None) -> list[Any]:
    """Reporters configured by the launcher's environment (the control plane sets RLHF_REDIS_URL).
    `history`: the run directory's metrics.jsonl, which a resumed job's Redis history is completed from."""
    out: list[Any] = []
    url = os.environ.get("RLHF_REDIS_URL")
    if url:
        from orchestrator.reporting.redis_reporter import RedisReporter

        out.append(RedisReporter(url, job_id, history))
    return out


def run_job(spec_path: str | Path, resume: bool = False, progress: bool = False, extra_reporters: list | None = None) -> int:
    from orchestrator.stages.pipeline import plan_stages, run_stages
    from orchestrator.reporting.reporters import FileReporter, MultiReporter
    from orchestrator.reporting.trackers import tracker_reporters

    try:
        spec_path = spec_from_env(spec_path)
        spec = load_spec(spec_path)
    except SpecError as err:
        run_dir = guess_run_dir(spec_path)
        reporter = MultiReporter(FileReporter(run_dir), *reporters_from_env(os.environ.get("RLHF_JOB_ID", run_dir.name)))
        try:
            return _fail(reporter, err, EXIT_BAD_INPUT)
        finally:
            reporter.close()  # sends what is queued for Redis

    job_id = job_id_for(spec)
    spec, mirror = local_run_dir(spec, job_id)
    try:
        lock = hold_run_dir(spec.run_dir)
    except RunDirBusy as err:  # nothing is written there: it is another live job's
        reporter = MultiReporter(*reporters_from_env(job_id))
        try:
            return _fail(reporter, err, EXIT_BAD_INPUT)
        finally:
            reporter.close()
    file_reporter = FileReporter(spec.run_dir)
    # Experiment trackers first: a warning about one (its server down) then reaches the run dir and
    # Redis before the job's final status does.
    trackers = tracker_reporters(spec, job_id, lambda message, **data: reporter.event("warning", message, **data))
    reporter = MultiReporter(*trackers, file_reporter, *mirror, *reporters_from_env(job_id, file_reporter.metrics_path), *(extra_reporters or []))
    previous = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    stopping.reset()
    stopping.install()
    try:
        for note in file_reporter.repairs:
            reporter.event("warning", note)
        reporter.event("status", "starting", status="starting", job_id=job_id)
        try:
            tokenizer, stages = plan_stages(spec)
        except Exception as err:
            if stopping.cancelled():
                raise Cancelled(stopping.cancelled()) from None
            return _fail(reporter, err, EXIT_BAD_INPUT)
        run_stages(stages, tokenizer, job_id, reporter, resume, progress)
        return EXIT_OK
    except StopRequested as stop:
        how = f"resume with: rlhf train {spec_path} --resume" if not str(spec_path).startswith("env:") else "resume it with --resume"
        reporter.event("status", f"cancelled: stopped by {stop.signal_name} after step {stop.step}, with a checkpoint; {how}",
                       status="cancelled", step=stop.step)
        print(f"stopped after step {stop.step}; {how}", file=sys.stderr)
        return EXIT_CANCELLED
    except Cancelled as err:
        reporter.event("status", f"cancelled: {err}", status="cancelled")
        return EXIT_CANCELLED
    except KeyboardInterrupt:
        reporter.event("status", "cancelled: interrupted", status="cancelled")
        return EXIT_CANCELLED
    except Exception as err:
        if stopping.cancelled():  # the signal's exception, wrapped on its way out of Ray (a SystemError from ray.get)
            reporter.event("status", f"cancelled: {stopping.cancelled()}", status="cancelled")
            return EXIT_CANCELLED
        return _fail(reporter, err, EXIT_FAILED)
    finally:
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])
        reporter.close()
        lock.close()


class RunDirBusy(SpecError):
    """The run directory belongs to a job that is running now."""


def hold_run_dir(run_dir: Path):
    """Hold `<run_dir>/.lock` (an flock, gone with the process) for the job's life: two live jobs
    never write one run directory. Returns the open lock file."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = open(run_dir / ".lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise RunDirBusy(f"output_dir {str(run_dir)!r} is in use by a running job ({holder}); give this job another "
                         "output_dir, or stop that one first") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}")
    lock.flush()
    return lock


def local_run_dir(spec: JobSpec, job_id: str) -> tuple[JobSpec, list]:
    """A run directory that is a URL (`s3://...`): the job writes its metrics and events in a local
    scratch directory, copied to the URL at each checkpoint and at the end (`RunDirMirror`); its
    checkpoints go to `<url>/checkpoints` directly. What the URL already holds is fetched first, so
    that `--resume` on another node has the history."""
    from orchestrator.core import storage
    from orchestrator.reporting.reporters import RunDirMirror

    if not spec.output_dir or not storage.is_url(spec.output_dir):
        return spec, []
    url = spec.output_dir.rstrip("/")
    scratch = Path(os.environ.get("RLHF_SCRATCH_DIR") or Path(tempfile.gettempdir()) / "rlhf-runs") / job_id
    scratch.mkdir(parents=True, exist_ok=True)
    for name in RunDirMirror.FILES:
        if storage.exists(storage.join(url, name)):
            shutil.copyfile(storage.local_copy(storage.join(url, name)), scratch / name)
    section = spec.checkpoint.model_copy(update={"dir": spec.checkpoint.dir or storage.join(url, "checkpoints")})
    return spec.model_copy(update={"output_dir": str(scratch), "checkpoint": section}), [RunDirMirror(scratch, url)]


def _fail(reporter, err: BaseException, code: int) -> int:
    kind, message = describe_error(err)
    detail = "".join(traceback.format_exception(err)) if kind in ("internal_error", "actor_died") else None
    reporter.event("error", message, code=kind, **({"traceback": detail} if detail else {}))
    reporter.event("status", f"failed: {message}", status="failed", error={"code": kind, "message": message})
    print(f"error: {message}", file=sys.stderr)
    if detail and os.environ.get("RLHF_DEBUG"):
        print(detail, file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.entrypoints.run", description="Run one post-training job (the Ray job entrypoint).")
    parser.add_argument("--spec", required=True, help="Job spec, YAML or JSON (or `env:NAME`: JSON in that environment variable).")
    parser.add_argument("--resume", action="store_true", help="Continue from the last checkpoint in the spec's checkpoint dir.")
    parser.add_argument("--progress", action="store_true", help="Show a progress bar.")
    args = parser.parse_args(argv)
    return run_job(args.spec, resume=args.resume, progress=args.progress)


if __name__ == "__main__":
    sys.exit(main())
