"""What an interrupted run leaves, and what a resume makes of it: a graceful stop on SIGTERM with a
checkpoint, a run directory held by a live job, torn JSONL lines, half-written checkpoints and a
spec that changed since the checkpoint."""

from __future__ import annotations

import os
import signal

import pytest

from orchestrator.core import checkpoint
from orchestrator.core.spec import SpecError
from orchestrator.stages.pipeline import resume_changes
from orchestrator.reporting.reporters import FileReporter
from tests.conftest import Entrypoint, read_jsonl, run_entrypoint, tiny_spec, wait_until, write_spec


def test_a_torn_last_line_is_cut_and_named(tmp_path):
    (tmp_path / "events.jsonl").write_text('{"seq": 1, "type": "status"}\n{"seq": 2, "ty')
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n')
    reporter = FileReporter(tmp_path)
    assert reporter.repairs == ["dropped a torn last line of events.jsonl (14 bytes, from a write the last run did not finish)"]
    reporter.event("warning", "next")
    assert [e["seq"] for e in read_jsonl(tmp_path / "events.jsonl")] == [1, 2]
    reporter.rewind(1)
    assert [m["step"] for m in read_jsonl(tmp_path / "metrics.jsonl")] == [1]
    assert FileReporter(tmp_path).repairs == []


def test_incomplete_checkpoints_are_found(tmp_path):
    (tmp_path / "step_000002" / "policy").mkdir(parents=True)
    (tmp_path / "step_000002" / "state.json").write_text("{}")
    (tmp_path / "step_000004" / "policy").mkdir(parents=True)
    assert checkpoint.complete(tmp_path) == [tmp_path / "step_000002"]
    assert checkpoint.incomplete(tmp_path) == [tmp_path / "step_000004"]


def test_resume_changes_say_what_changed_and_refuse_what_cannot():
    saved = {"algorithm": {"name": "grpo"}, "model": {"path": "/m", "dtype": "float32"}, "optim": {"lr": 0.1, "steps": 10},
             "checkpoint": {"dir": "/a"}}
    assert resume_changes(saved, {**saved, "optim": {"lr": 0.1, "steps": 20}, "checkpoint": {"dir": "/b"}}) == []
    assert resume_changes(saved, {**saved, "optim": {"lr": 0.2, "steps": 10}}) == ["optim.lr: 0.1 -> 0.2"]
    with pytest.raises(SpecError, match=r"algorithm.name was 'grpo' at the checkpoint, now 'ppo'"):
        resume_changes(saved, {**saved, "algorithm": {"name": "ppo"}})
    with pytest.raises(SpecError, match=r"model.path was '/m'"):
        resume_changes(saved, {**saved, "model": {"path": "/other", "dtype": "float32"}})
    # A later stage's model is the stage before it, whatever its spec says.
    assert resume_changes(saved, {**saved, "model": {"path": "/other", "dtype": "float32"}}, first_stage=False) == []


@pytest.mark.slow
def test_sigterm_stops_at_a_step_with_a_checkpoint_and_resumes(tiny_model, arith_file, tmp_path):
    run_dir = tmp_path / "run"
    # Long enough to outlast the second job's start; the resume then asks for only two more steps.
    spec = write_spec(tmp_path / "job.yaml", tiny_spec(tiny_model, arith_file, run_dir, optim={"steps": 500}))
    job = Entrypoint(spec)
    wait_until(lambda: len(read_jsonl(run_dir / "metrics.jsonl")) >= 2 if (run_dir / "metrics.jsonl").exists() else False,
               180, "two steps of metrics")

    # A second job on the same run directory, while the first runs: refused, and writes nothing there.
    second = run_entrypoint(spec, timeout=120)
    assert second.returncode == 2 and "is in use by a running job (pid" in second.stderr, second.stderr[-2000:]
    assert [e["status"] for e in read_jsonl(run_dir / "events.jsonl") if e["type"] == "status"] == ["starting", "running"]

    os.kill(job.proc.pid, signal.SIGTERM)
    result = job.result(timeout=120)
    assert result.returncode == 130, result.stderr[-3000:]
    events = read_jsonl(run_dir / "events.jsonl")
    final = events[-1]
    assert final["type"] == "status" and final["status"] == "cancelled", final
    stopped = final["step"]
    assert f"stopped by SIGTERM after step {stopped}, with a checkpoint; resume with: rlhf train {spec} --resume" in final["message"]
    assert checkpoint.latest(run_dir / "checkpoints") == run_dir / "checkpoints" / f"step_{stopped:06d}"
    assert stopped < 500 and [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl")] == list(range(1, stopped + 1))

    # Then a crash's leftovers: a torn line in each file, a checkpoint whose save did not finish; and a new lr.
    with open(run_dir / "events.jsonl", "a") as f:
        f.write('{"seq": 99, "type": "sta')
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 99, "lo')
    (run_dir / "checkpoints" / "step_000099" / "policy").mkdir(parents=True)
    write_spec(spec, tiny_spec(tiny_model, arith_file, run_dir, optim={"steps": stopped + 2, "lr": 2e-3}))
    resumed = run_entrypoint(spec, "--resume", timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    events = read_jsonl(run_dir / "events.jsonl")  # every line parses
    warnings = [e["message"] for e in events if e["type"] == "warning"]
    assert "dropped a torn last line of events.jsonl (24 bytes, from a write the last run did not finish)" in warnings
    assert any(w.startswith("dropped a torn last line of metrics.jsonl") for w in warnings)
    assert any("ignored" in w and "step_000099" in w and "did not finish" in w for w in warnings), warnings
    assert f"--resume: the spec changed since step {stopped}: optim.lr: 0.001 -> 0.002" in warnings
    assert [e["step"] for e in events if e["type"] == "resumed"] == [stopped]
    assert [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl")] == list(range(1, stopped + 3))
    assert events[-1]["status"] == "succeeded"


@pytest.mark.slow
def test_a_reward_that_hangs_fails_the_job_at_the_timeout(tiny_model, arith_file, tmp_path):
    (tmp_path / "hang.py").write_text("import time\n\ndef score(prompts, completions, **kw):\n    time.sleep(3600)\n")
    run_dir = tmp_path / "run"
    spec = write_spec(tmp_path / "job.yaml", tiny_spec(tiny_model, arith_file, run_dir, rewards=[{"function": "hang:score"}],
                                                      fault_tolerance={"call_timeout_s": 3}))
    result = run_entrypoint(spec, timeout=300, env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    assert result.returncode == 1, result.stderr[-3000:]
    error = [e for e in read_jsonl(run_dir / "events.jsonl") if e["type"] == "error"][-1]
    assert error["code"] == "timeout"
    assert error["message"] == "the reward phase of step 1 did not finish within fault_tolerance.call_timeout_s=3 s"
    assert "Traceback" not in result.stderr and f"error: {error['message']}" in result.stderr


@pytest.mark.slow
def test_sigterm_under_the_control_plane_cancels_at_once(tiny_model, arith_file, tmp_path):
    """As `ray job stop` does to a job the API launched (RLHF_JOB_ID set): the driver ends `cancelled`
    at once. (When the signal lands inside ray.get, Ray turns the handler's exception into a
    SystemError, which run_job also reads as the cancel; this test does not choose where it lands.)"""
    run_dir = tmp_path / "run"
    spec = write_spec(tmp_path / "job.yaml", tiny_spec(tiny_model, arith_file, run_dir, optim={"steps": 500}))
    job = Entrypoint(spec, env={"RLHF_JOB_ID": "job-sigterm"})
    wait_until(lambda: len(read_jsonl(run_dir / "metrics.jsonl")) >= 2 if (run_dir / "metrics.jsonl").exists() else False,
               180, "two steps of metrics")
    os.kill(job.proc.pid, signal.SIGTERM)
    result = job.result(timeout=120)
    final = read_jsonl(run_dir / "events.jsonl")[-1]
    assert (result.returncode, final["type"], final["status"]) == (130, "status", "cancelled"), (final, result.stderr[-2000:])
    assert final["message"] == "cancelled: received signal 15"


def test_rewards_in_the_driver_are_waited_for_like_an_actor_call(tiny_model, arith_file, tmp_path):
    """`Orchestrator.wait` on work of the driver's own thread: its value or its error, with no timeout
    set (null), and a PhaseTimeout naming the phase when it hangs past call_timeout_s."""
    import threading
    from types import SimpleNamespace

    from orchestrator.core.spec import parse_spec
    from orchestrator.stages.driver import Orchestrator, PhaseTimeout, in_daemon_thread

    def driver(timeout):
        spec = parse_spec(tiny_spec(tiny_model, arith_file, tmp_path / "run", fault_tolerance={"call_timeout_s": timeout}))
        return SimpleNamespace(spec=spec, current_step=4)

    assert Orchestrator.wait(driver(None), in_daemon_thread(lambda a, b: a + b, 2, 3), "reward") == 5
    with pytest.raises(ZeroDivisionError):
        Orchestrator.wait(driver(None), in_daemon_thread(lambda: 1 / 0), "reward")
    release = threading.Event()
    hung = in_daemon_thread(release.wait)
    with pytest.raises(PhaseTimeout, match=r"^the reward phase of step 4 did not finish within fault_tolerance.call_timeout_s=0.2 s$"):
        Orchestrator.wait(driver(0.2), hung, "reward")
    release.set()
    assert hung.result(timeout=5) is True
