"""Where the test suite's CPU goes: the numbers behind docs/benchmarks.md's test-suite section.

    python benchmarks/suite_cost.py                       # the README's first test command, as configured
    python benchmarks/suite_cost.py --per-file            # one process (-n 0), plus each file's CPU
    python benchmarks/suite_cost.py -- -m slow -x         # pytest arguments after --

Runs `python -m pytest` while reading every process's CPU (utime + stime) from /proc four times a
second, then prints the wall time, the machine's busy core-seconds over the run (/proc/stat), the
floor those core-seconds put on the wall time on this machine's cores, and the core-seconds by
kind of process: each role actor class (`ray::PolicyTrainer`, ...), the jobs' drivers, Ray's own
processes, pytest, the servers. A process that lives less than a sampling interval, or CPU spent in
its last interval, is missed, so the kinds add up to a little less than the machine's total.

With --per-file the tests run in one process (`-n 0`) and a small plugin reads /proc/stat around
each test: each file's core-seconds (what `FILE_COST` in tests/conftest.py orders by). Under
pytest-xdist two files run at once, so per-test numbers would mix them; hence one process.
The numbers per file include the sampler's own share (68 core-s over a 1,243 s run of the whole
suite: 5.5% of one core); the machine's total leaves it out. Other load on the machine counts too: run it on an
otherwise idle machine.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HZ = os.sysconf("SC_CLK_TCK")

# A pytest plugin, written to a temp dir for --per-file: machine busy CPU around each test.
PLUGIN = '''
import json, os, time
_OUT, _HZ, _open = os.environ["SUITE_COST_OUT"], os.sysconf("SC_CLK_TCK"), {}

def _busy():
    v = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return (sum(v) - v[3] - v[4]) / _HZ  # all but idle and iowait

def pytest_runtest_setup(item):
    _open[item.nodeid] = (_busy(), time.monotonic())

def pytest_runtest_logreport(report):
    if report.when == "teardown" and report.nodeid in _open:
        cpu, wall = _open.pop(report.nodeid)
        with open(_OUT, "a") as f:
            f.write(json.dumps({"test": report.nodeid, "cpu": _busy() - cpu, "wall": time.monotonic() - wall}) + "\\n")
'''


def machine_busy() -> float:
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / HZ


class ProcessSampler(threading.Thread):
    """Every process's CPU since the sampler started, with the command line it started with and, for
    a Ray worker, the first actor title it took (`ray::PolicyTrainer`; `ray::IDLE` before that)."""

    def __init__(self, interval: float = 0.25):
        super().__init__(daemon=True)
        self.interval, self.stopped = interval, threading.Event()
        self.seen: dict[tuple[int, int], list] = {}  # (pid, start time) -> [command line, title, CPU at start, CPU]
        self.sample(baseline=True)  # what the processes already running had used is not the suite's

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            self.sample()

    def sample(self, baseline: bool = False) -> None:
        me = os.getpid()
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == me:
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                fields = stat[stat.rindex(")") + 2 :].split()
                cpu, key = (int(fields[11]) + int(fields[12])) / HZ, (int(entry), int(fields[19]))
                row = self.seen.get(key)
                if row is None:
                    cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                    row = self.seen[key] = [cmd or stat[stat.index("(") + 1 : stat.rindex(")")], "", cpu if baseline else 0.0, cpu]
                if not row[1] or row[1].startswith("ray::IDLE"):
                    title = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
                    row[1] = title if title.startswith("ray::") else row[1]
                row[3] = cpu
            except (OSError, ValueError, IndexError):
                continue  # it ended between listing and reading

    def used(self) -> list[tuple[str, float]]:
        """(command line or actor title, CPU seconds since the start) of every process seen using CPU."""
        return [(title or cmd, cpu - base) for cmd, title, base, cpu in self.seen.values() if cpu > base]


RAY_OWN = ("gcs_server", "raylet", "dashboard", "log_monitor", "monitor.py", "runtime_env", "ray start", "ray-dashboard",
           "ray.util.client.server")
RAY_OWN_ACTORS = ("JobSupervisor", "DashboardAgent", "RuntimeEnvAgent", "_StatsActor")
OTHER_KINDS = (
    ("orchestrator.entrypoints.run", "job driver (python -m orchestrator.entrypoints.run)"), ("orchestrator.entrypoints.cli serve", "control plane (uvicorn)"),
    ("rlhf serve", "control plane (uvicorn)"), ("rlhf ", "job driver (rlhf)"),
    ("api.main", "control plane (uvicorn)"), ("uvicorn", "control plane (uvicorn)"), ("redis-server", "redis-server"),
    ("chrom", "chromium (page tests)"), ("mlflow", "MLflow server"), ("vllm", "vLLM engine"), ("VLLM", "vLLM engine"),
    ("cc1plus", "C++ compiler (vLLM/torch kernels)"),
    ("multiprocessing.spawn", "spawned Python processes (the FSDP tests' ranks, vLLM's engine core)"),
    # Last: other commands name files under /tmp/pytest-of-<user>/.
    ("-m pytest", "pytest"), ("pytest-xdist", "pytest"),
    ("exec(eval(sys.stdin.readline()))", "pytest"),  # pytest-xdist's workers, as execnet starts them
)
OTHER = "other (kernel threads, shells, tools)"


def kind(cmd: str) -> str:
    if cmd.startswith("ray::"):
        name = cmd.split()[0][len("ray::") :].rsplit(":", 1)[-1].split(".")[0]  # ray::[<actor name>:]<class>[.<method>]
        if name == "IDLE":
            return "Ray worker that never hosted an actor (ray::IDLE)"
        return "Ray's own processes (head, dashboard, agents, job supervisors)" if name in RAY_OWN_ACTORS else f"role actor {name}"
    if any(name in cmd for name in RAY_OWN):
        return "Ray's own processes (head, dashboard, agents, job supervisors)"
    if "default_worker.py" in cmd:
        return "Ray worker (untitled)"
    return next((name for pattern, name in OTHER_KINDS if pattern in cmd), OTHER)


def per_file_table(path: Path) -> list[tuple[str, float, float]]:
    cpu, wall = collections.Counter(), collections.Counter()
    for line in path.read_text().splitlines():
        row = json.loads(line)
        name = row["test"].split("::")[0]
        cpu[name] += row["cpu"]
        wall[name] += row["wall"]
    return [(name, cpu[name], wall[name]) for name, _ in cpu.most_common()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-file", action="store_true", help="one process (-n 0) and each test file's core-seconds")
    parser.add_argument("--top", type=int, default=25, help="kinds of process (and files) to list")
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest (after --)")
    args, unknown = parser.parse_known_args()
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (pytest's arguments go after --, as in: suite_cost.py --per-file -- -k name)")

    env, pytest_args = dict(os.environ), list(args.pytest_args)
    with tempfile.TemporaryDirectory(prefix="suite_cost") as tmp:
        per_test = Path(tmp) / "per_test.jsonl"
        if args.per_file:
            (Path(tmp) / "suite_cost_probe.py").write_text(PLUGIN)
            env["PYTHONPATH"] = os.pathsep.join([tmp, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
            env["SUITE_COST_OUT"] = str(per_test)
            pytest_args = ["-p", "suite_cost_probe", "-n", "0", *pytest_args]
        cmd = [sys.executable, "-m", "pytest", *pytest_args]
        print("running:", " ".join(cmd), flush=True)
        sampler = ProcessSampler()
        busy0, t0, own0 = machine_busy(), time.monotonic(), time.process_time()
        sampler.start()
        code = subprocess.call(cmd, cwd=ROOT, env=env)
        sampler.stopped.set()
        sampler.join()
        sampler.sample()
        # Less this script's own CPU (almost all of it the sampler's: 5.5% of a core over a whole suite).
        wall, own = time.monotonic() - t0, time.process_time() - own0
        busy = machine_busy() - busy0 - own
        files = per_file_table(per_test) if per_test.exists() else []

    cores = len(os.sched_getaffinity(0))
    kinds: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for cmd, cpu in sampler.used():
        k = kinds[kind(cmd)]
        k[0], k[1] = k[0] + 1, k[1] + cpu
    attributed = sum(cpu for _, cpu in kinds.values())
    print(f"\npytest exit code {code}; wall {wall:.0f} s; machine busy {busy:.0f} core-s on {cores} cores "
          f"({busy / (wall * cores):.0%} of them; not counting this script's own {own:.0f}); "
          f"those core-s alone need >= {busy / cores:.0f} s of wall time here")
    print(f"\n{'core-s':>8} {'procs':>6} {'each':>6}  kind of process ({attributed:.0f} core-s seen per process)")
    for name, (n, cpu) in sorted(kinds.items(), key=lambda kv: -kv[1][1])[: args.top]:
        print(f"{cpu:8.1f} {n:6d} {cpu / n:6.2f}  {name}")
    others = sorted(((cpu, cmd) for cmd, cpu in sampler.used() if kind(cmd) == OTHER), reverse=True)[:5]
    if others:
        shown = [(cpu, " ".join(cmd.split()[1:]) if "python" in cmd.split()[0] else cmd) for cpu, cmd in others]
        print("  of which: " + "; ".join(f"{cmd[:70]} ({cpu:.1f})" for cpu, cmd in shown))
    if files:
        print(f"\n{'core-s':>8} {'wall s':>7}  test file (one process; {sum(c for _, c, _ in files):.0f} core-s in tests)")
        for name, cpu, wall_s in files[: args.top]:
            print(f"{cpu:8.1f} {wall_s:7.1f}  {name}")
    return code


if __name__ == "__main__":
    sys.exit(main())
