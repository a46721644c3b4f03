"""The job entrypoint as users run it: bad input, interruption and resume, and `ray job submit`."""

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from orchestrator.core import checkpoint
from tests.conftest import Entrypoint, read_jsonl, run_entrypoint, tiny_spec, write_spec

VOLATILE = ("time", "timing/", "throughput/")


def last_error(run_dir: Path) -> dict:
    errors = [e for e in read_jsonl(run_dir / "events.jsonl") if e["type"] == "error"]
    assert errors, "no error event in events.jsonl"
    return errors[-1]


def assert_clean_failure(result, run_dir: Path, code: str, *needles: str):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "error: " in result.stderr, result.stderr[-2000:]
    message = result.stderr[result.stderr.rindex("error: ") :]
    event = last_error(run_dir)
    assert event["code"] == code
    for needle in needles:
        assert needle in message and needle in event["message"], (needle, message)


BAD_SPECS = {
    "unknown_field": ({"optim": {"learning_rate": 1}}, "invalid_spec", ["optim.learning_rate: unknown field"]),
    "wrong_type": ({"rollout": {"n": "four"}}, "invalid_spec", ["rollout.n"]),
    "missing_data": ({"data": {"train_file": "/nonexistent/train.jsonl"}}, "invalid_data", ["data file not found: /nonexistent/train.jsonl"]),
    "bad_model": ({"model": {"path": "/nonexistent/model"}}, "model_load_error", ["model.path='/nonexistent/model'"]),
    "unknown_reward": ({"rewards": [{"function": "nope.module:fn"}]}, "reward_error", ["nope.module:fn"]),
}


@pytest.fixture(scope="module")
def bad_runs(tiny_model, arith_file, tmp_path_factory):
    """case -> (run dir, its driver's future result) for every bad spec above and for a malformed data
    file. Each driver is seconds of imports on one core, so they run as many at a time as there are
    cores, in the background, from the first of these tests on."""

    def start(d: Path, train_file: Path, **overrides) -> tuple[Path, Future]:
        spec = write_spec(d / "job.yaml", tiny_spec(tiny_model, train_file, d / "run", **overrides))
        return d / "run", pool.submit(run_entrypoint, spec, timeout=120)

    with ThreadPoolExecutor(max_workers=len(os.sched_getaffinity(0))) as pool:
        runs = {case: start(tmp_path_factory.mktemp(case), arith_file, **overrides) for case, (overrides, _, _) in BAD_SPECS.items()}
        d = tmp_path_factory.mktemp("malformed_data")
        (d / "train.jsonl").write_text('{"prompt": "1+1=", "answer": 2}\n{"prompt": "2+2=", "answer": 4\n')
        runs["malformed_data"] = start(d, d / "train.jsonl")
        yield runs
        pool.shutdown(cancel_futures=True)  # the runs of deselected cases that have not started


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_bad_input_fails_cleanly(case, bad_runs):
    _, code, needles = BAD_SPECS[case]
    run_dir, run = bad_runs[case]
    result = run.result()
    assert result.returncode == 2
    assert_clean_failure(result, run_dir, code, *needles)


def test_malformed_data_line_is_named(bad_runs):
    run_dir, run = bad_runs["malformed_data"]
    data = run_dir.parent / "train.jsonl"  # its line 2 lacks the closing brace
    assert_clean_failure(run.result(), run_dir, "invalid_data", f"{data}:2: malformed JSON")


def test_reward_function_that_raises(tiny_model, arith_file, tmp_path):
    (tmp_path / "badreward.py").write_text("def score(prompts, completions, **kw):\n    raise ZeroDivisionError('no reward today')\n")
    run_dir = tmp_path / "run"
    spec = write_spec(tmp_path / "job.yaml", tiny_spec(tiny_model, arith_file, run_dir, rewards=[{"function": "badreward:score"}]))
    # On an embedded Ray, as `rlhf train` runs it: the actors see the driver's PYTHONPATH, and so the
    # reward module beside the spec (on a cluster it would have to be installed on every node).
    result = run_entrypoint(spec, timeout=300, env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    assert result.returncode == 1
    assert_clean_failure(result, run_dir, "reward_error", "'score' raised ZeroDivisionError: no reward today")
    statuses = [e["status"] for e in read_jsonl(run_dir / "events.jsonl") if e["type"] == "status"]
    assert statuses[-1] == "failed"


def comparable(metrics: list[dict]) -> dict[int, dict]:
    by_step = {m["step"]: m for m in metrics}
    return {s: {k: v for k, v in m.items() if not k.startswith(VOLATILE)} for s, m in by_step.items()}


# Checkpoints at steps 2 and 4, then at the end: a run killed after its first one has steps left.
SIX_STEPS = dict(optim={"steps": 6}, checkpoint={"every": 2, "keep_last": 5})


@pytest.fixture(scope="module")
def submitted(ray_head, tiny_model, arith_file, tmp_path_factory) -> tuple[Path, Entrypoint]:
    """(run dir, job) of a six-step job sent with `ray job submit`, started when a test first asks for
    it: the `ray job submit` test checks it, and the resume test compares against it."""
    d = tmp_path_factory.mktemp("submitted")
    spec = write_spec(d / "job.yaml", tiny_spec(tiny_model, arith_file, d / "run", **SIX_STEPS))
    return d / "run", Entrypoint(spec, submit_to=ray_head)


@pytest.mark.slow
def test_resume_after_kill_gives_the_same_metrics(ray_head, submitted, tiny_model, arith_file, tmp_path):
    # The uninterrupted run is the submitted job, which runs alongside: the head has CPUs for both jobs.
    straight_dir, straight = submitted
    interrupted_dir = tmp_path / "b"
    interrupted = write_spec(tmp_path / "b.yaml", tiny_spec(tiny_model, arith_file, interrupted_dir, **SIX_STEPS))

    # Kill the driver once the first checkpoint lands; Ray then ends the actors of its job.
    run = Entrypoint(interrupted, ray=ray_head)
    events = interrupted_dir / "events.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and run.proc.poll() is None:
        if events.exists() and any(e["type"] == "checkpoint" for e in read_jsonl(events)):
            break
        time.sleep(0.05)  # a step takes a tenth of a second: a slow look would miss the window
    run.proc.kill()
    run.proc.wait(timeout=30)
    done = [m["step"] for m in read_jsonl(interrupted_dir / "metrics.jsonl")]
    assert done and done[-1] < 6, f"the run was not interrupted mid-way (steps done: {done})"
    # The kill may land after step 2's checkpoint or after step 4's; either way the newest complete one is resumed.
    newest = checkpoint.read_state(checkpoint.latest(interrupted_dir / "checkpoints"))["step"]

    result = run_entrypoint(interrupted, "--resume", ray=ray_head)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [e["step"] for e in read_jsonl(events) if e["type"] == "resumed"] == [newest]
    assert straight.result(timeout=600).returncode == 0
    a, b = comparable(read_jsonl(straight_dir / "metrics.jsonl")), comparable(read_jsonl(interrupted_dir / "metrics.jsonl"))
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-6, abs=1e-7), f"step {step} differs after resume"


@pytest.mark.slow
def test_ray_job_submit_against_a_real_head(submitted):
    run_dir, job = submitted
    result = job.result(timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 7))
    statuses = [e["status"] for e in read_jsonl(run_dir / "events.jsonl") if e["type"] == "status"]
    assert statuses == ["starting", "running", "succeeded"]
