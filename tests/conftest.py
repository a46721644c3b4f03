"""Shared fixtures: a tiny local model, arithmetic data, spec files, and one Ray head for the session.

Every test that needs Ray uses that one head (`ray start --head` on loopback): the in-process
end-to-end tests as a driver of it, the entrypoint tests through RAY_ADDRESS, the control plane
through its dashboard. Starting a Ray is the slow part of a small job on two cores.
"""

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
# The session's Ray head checks tokens (~/.ray/auth_token); this process joins it as a driver, and
# Ray reads the mode once, before any test imports it.
os.environ.setdefault("RAY_AUTH_MODE", "token")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from orchestrator.entrypoints.tiny_model import init_model

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


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# ------------------------------------------------------------ one real Ray head for the whole session

# The `rlhf serve` processes of the session (tests/api/conftest.py ApiServer). Here, in the module that every copy of
# that conftest imports by one name: pytest loads it as `api.conftest`, the tests import it as `tests.api.conftest`.
API_SERVERS: list = []

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


def _ensure_ray_token() -> None:
    """~/.ray/auth_token, made once under a lock: a head started without one writes its own, and two
    sessions starting heads at once (pytest-xdist's workers) would each write a different token."""
    import fcntl

    from ray._private.authentication.authentication_token_setup import _get_default_token_path, generate_and_save_token

    path = _get_default_token_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / "auth_token.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists() or not path.read_text().strip():
            generate_and_save_token()


class RayHead:
    """`ray start --head --block` on free loopback ports, with its dashboard (job submission) and
    4 logical CPUs. Started by `pytest_sessionstart`, waited for by the `ray_head` fixture."""

    def __init__(self):
        gcs = free_port()
        assert gcs != 6379
        dash, client_port, agent, metrics = free_port(), free_port(), free_port(), free_port()
        self.address, self.dashboard = f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}"
        temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths have a length limit
        cmd = [
            "ray", "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--include-dashboard", "true",
            "--ray-client-server-port", str(client_port), "--dashboard-agent-listen-port", str(agent),
            "--metrics-export-port", str(metrics), "--num-cpus", "4", "--temp-dir", temp, "--disable-usage-stats",
        ]
        _ensure_ray_token()
        self.log = open(Path(temp) / "ray-start.log", "w")
        self.proc = subprocess.Popen(cmd, env={**os.environ, **RAY_ENV}, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_up(self, timeout: float = 90) -> RayHead:
        import httpx

        def up():
            if self.proc.poll() is not None:
                raise RuntimeError(f"`ray start` exited with {self.proc.returncode}; see {self.log.name}")
            return httpx.get(f"{self.dashboard}/api/version", timeout=2).status_code < 500

        wait_until(up, timeout, f"the Ray dashboard at {self.dashboard}")
        return self

    def stop(self) -> None:
        # `ray start --block` stops its processes one by one on SIGTERM (about 2 s); a SIGTERM to the
        # whole group at once leaves it hanging until the timeout.
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            pass
        stop_group(self.proc)
        self.log.close()


_RAY_HEAD = pytest.StashKey[RayHead]()


def _xdist_controller(config) -> bool:
    """Whether this process only hands tests to pytest-xdist's workers (each runs its own session)."""
    return config.pluginmanager.getplugin("dsession") is not None


def pytest_sessionstart(session):
    # The head takes seconds to start; collecting the tests (importing torch, transformers and vLLM)
    # keeps one core busy for longer, so the head starts now, beside the collection.
    if not _xdist_controller(session.config):
        session.config.stash[_RAY_HEAD] = RayHead()


# Core-seconds each heavy file took in one serial run (`python benchmarks/suite_cost.py --per-file`:
# /proc/stat around each test, an AMD EPYC with 2 cores, 2026-11-28; 2,039 in all). Only their order
# matters: see below.
FILE_COST = {
    "test_fsdp.py": 357, "api/test_recovery.py": 241, "test_entrypoint.py": 196, "test_interruptions.py": 191,
    "test_e2e.py": 152, "test_preference_e2e.py": 118, "api/test_e2e.py": 118, "api/test_s3.py": 85,
    "test_pipeline.py": 84, "test_trackers.py": 81, "test_vllm_cpu.py": 77, "api/test_ui.py": 55, "api/test_queue.py": 48,
    "api/test_openapi.py": 48, "test_lora.py": 45, "api/test_jobs.py": 32, "test_workers.py": 29,
}
SLOW_TEST_COST = 30  # a file not in the table: this much per real-job (`slow`) test, 0 per other test


# The tiers. `python -m pytest` (the README's command, the fast tier) runs the unit tests, the API
# tests and the SMOKE tests; `python -m pytest -m slow` runs every real-job test. Files and tests
# marked `slow` in their own module are slow too; these start a driver, an engine or a role's
# process without a `slow` mark of their own. CI runs both tiers.
SLOW = (
    "test_entrypoint.py",  # a driver process on an embedded Ray for each test
    "test_vllm_cpu.py",  # vLLM's engine
    "test_demo.py",
    "api/test_ui.py::test_sign_in_watch_a_job_live_and_cancel_it",
    "api/test_jobs.py::test_idempotency",  # two drivers that fail in preflight
    "test_workers.py::test_a_role_starts_without_importing_scikit_learn_or_scipy",  # a role's own process
)
# One GRPO job on real Ray, and one job over REST end to end: in both tiers.
SMOKE = ("test_e2e.py::test_grpo_end_to_end", "api/test_e2e.py::test_tiny_grpo_job_over_rest")


def _tier_marks(items, tests_dir: Path) -> None:
    for item in items:
        path = item.path.relative_to(tests_dir).as_posix() if item.path.is_relative_to(tests_dir) else str(item.path)
        name = f"{path}::{item.originalname}"
        if path in SLOW or name in SLOW:
            item.add_marker(pytest.mark.slow)
        if name in SMOKE:
            item.add_marker(pytest.mark.smoke)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    _tier_marks(items, Path(__file__).parent)
    # Costliest files first, each file's tests in their own order: under pytest-xdist (`--dist
    # loadfile`) a worker that finishes a file takes the next, so the long files start early and the
    # short ones fill the end (longest-first packing), instead of one long file running alone at the
    # end. Serially it changes nothing but order.
    tests_dir = Path(__file__).parent
    cost: dict[Path, float] = {}
    for item in items:
        name = item.path.relative_to(tests_dir).as_posix() if item.path.is_relative_to(tests_dir) else str(item.path)
        if name in FILE_COST:
            cost[item.path] = FILE_COST[name]
        else:
            cost[item.path] = cost.get(item.path, 0) + SLOW_TEST_COST * (item.get_closest_marker("slow") is not None)
    first_seen = {path: i for i, path in reversed(list(enumerate(item.path for item in items)))}
    items.sort(key=lambda item: (-cost[item.path], first_seen[item.path]))


def pytest_collection_finish(session):
    if _RAY_HEAD not in session.config.stash:
        return
    if not any("ray_head" in getattr(item, "fixturenames", ()) for item in session.items):
        session.config.stash[_RAY_HEAD].stop()  # none of the selected tests needs it


def pytest_sessionfinish(session):
    head = session.config.stash.get(_RAY_HEAD, None)
    if head is not None and not head.log.closed:
        head.stop()


@pytest.fixture(scope="session")
def ray_head(pytestconfig) -> RayHead:
    return pytestconfig.stash[_RAY_HEAD].wait_up()


@pytest.fixture(scope="session")
def ray_session(ray_head):
    """This process as a driver on the session's Ray head, for the in-process end-to-end tests."""
    import ray

    ray.init(address=ray_head.address, log_to_driver=False)
    yield ray
    ray.shutdown()


def entrypoint_env(ray: RayHead | None = None, env: dict | None = None) -> dict[str, str]:
    """The environment of a driver subprocess: on the session's Ray head (RAY_ADDRESS, as `ray job
    submit` sets it) if `ray` is given, else on an embedded Ray it starts itself, as `rlhf train` does."""
    out = {**os.environ, **(env or {})}
    out.pop("RAY_ADDRESS", None)
    if ray is not None:
        out.update(RAY_ENV, RAY_ADDRESS=ray.address)
    return out


class Entrypoint:
    """`python -m orchestrator.entrypoints.run` started now and checked later, so that several can run at once
    (its output goes to temporary files, which no pipe buffer can block). With `submit_to` it runs
    as users run it on a cluster: `ray job submit --working-dir <repo> -- python -m orchestrator.entrypoints.run ...`."""

    def __init__(self, spec_path: Path, *args: str, env: dict | None = None, ray: RayHead | None = None,
                 submit_to: RayHead | None = None):
        cmd = [sys.executable, "-m", "orchestrator.entrypoints.run", "--spec", str(spec_path), *args]
        if submit_to is not None:
            cmd = ["ray", "job", "submit", "--address", submit_to.dashboard, "--working-dir", str(ROOT), "--", "python", *cmd[1:]]
            env = {**RAY_ENV, **(env or {})}
        self.out, self.err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.out, stderr=self.err, text=True, env=entrypoint_env(ray, env))
        self._result: subprocess.CompletedProcess | None = None

    def result(self, timeout: float = 300) -> subprocess.CompletedProcess:
        if self._result is None:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
            with self.out, self.err:
                self.out.seek(0), self.err.seek(0)
                self._result = subprocess.CompletedProcess(self.proc.args, self.proc.returncode, self.out.read(), self.err.read())
        return self._result


def run_entrypoint(spec_path: Path, *args: str, timeout: float = 300, env: dict | None = None, ray: RayHead | None = None):
    return Entrypoint(spec_path, *args, env=env, ray=ray).result(timeout)


# -- every module leaves the session's Ray head as it found it ------------------------------------------------------

def ray_leftovers(head: RayHead) -> list[str]:
    """What holds CPUs on the head: live actors that need any, placement groups, running Ray jobs (the state API and
    the job API over the dashboard, from this process without joining the cluster)."""
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors, list_placement_groups

    actors = [a for a in list_actors(address=head.dashboard, limit=10000, timeout=10, detail=True)
              if a.state in ("ALIVE", "PENDING_CREATION", "RESTARTING") and float((a.required_resources or {}).get("CPU", 0)) > 0]
    groups = [g for g in list_placement_groups(address=head.dashboard, limit=10000, timeout=10)
              if g.state in ("CREATED", "PENDING", "RESCHEDULING")]
    jobs = [j for j in JobSubmissionClient(head.dashboard).list_jobs() if j.submission_id and j.status in ("PENDING", "RUNNING")]
    return ([f"actor {a.class_name} {a.name or a.actor_id} (namespace {a.ray_namespace}, {a.state})" for a in actors]
            + [f"placement group {g.name or g.placement_group_id} ({g.state})" for g in groups]
            + [f"Ray job {j.submission_id} ({j.status})" for j in jobs])


_CLEAR = """
import sys, ray
from ray.job_submission import JobSubmissionClient
from ray.util.placement_group import PlacementGroup
from ray.util.state import list_actors, list_placement_groups
address, dashboard = sys.argv[1], sys.argv[2]
client = JobSubmissionClient(dashboard)
for j in client.list_jobs():
    if j.status in ("PENDING", "RUNNING"):
        client.stop_job(j.submission_id)
ray.init(address=address, log_to_driver=False)
for a in list_actors(address=dashboard, limit=10000, timeout=10):
    if a.state != "DEAD" and a.name:
        ray.kill(ray.get_actor(a.name, namespace=a.ray_namespace), no_restart=True)
for g in list_placement_groups(address=dashboard, limit=10000, timeout=10):
    if g.state != "REMOVED":
        ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(g.placement_group_id))))
"""


def clear_ray_head(head: RayHead) -> None:
    """Stop the head's running Ray jobs, kill its named actors, remove its placement groups (unnamed actors die with
    their owners)."""
    subprocess.run([sys.executable, "-c", _CLEAR, head.address, head.dashboard], env={**os.environ, **RAY_ENV, "RAY_ADDRESS": head.address},
                   capture_output=True, timeout=120)


@pytest.fixture(scope="module", autouse=True)
def _ray_head_left_as_found(request):
    """A module that used the Ray head leaves nothing on it that holds CPUs: a leak (a detached pool, a job's placement
    group) would make every later module on this worker wait for room and fail far from its cause. What is left after a
    grace period is removed and named, as an error of this module."""
    yield
    head = request.config.stash.get(_RAY_HEAD, None)
    used = any("ray_head" in getattr(item, "fixturenames", ()) for item in request.session.items
               if getattr(item, "module", None) is request.module)
    if head is None or head.log.closed or not used or request.config.getoption("--collect-only"):
        return
    deadline = time.monotonic() + 60
    while (left := ray_leftovers(head)) and time.monotonic() < deadline:
        time.sleep(2)
    if left:
        clear_ray_head(head)
        pytest.fail(f"{request.module.__name__} left on the Ray head after 60 s: {'; '.join(left)}", pytrace=False)
