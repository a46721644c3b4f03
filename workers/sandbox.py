"""Untrusted Python, run in a sandbox: the code of a model's tool call, or the code a unit-test reward grades.

Each call gets a fresh, empty working directory (a size-capped tmpfs at /work) in a new bubblewrap
container (https://github.com/containers/bubblewrap): its own user, PID, network, IPC, UTS and mount
namespaces; a root filesystem holding only /usr and the Python runtime, read-only, with
site-packages hidden; --die-with-parent. Resource limits (CPU seconds, address space, processes,
file size, open files, no core dumps) are set by `prlimit` before anything runs, and a wall-clock
deadline kills the whole process group.

Run as root (as these machines run), two things change, and the sandbox answers both:
- RLIMIT_NPROC never binds a process whose real uid is root, in a user namespace or not (the
  kernel exempts INIT_USER in copy_process). So a root caller drops to a dedicated uid for each call
  (claimed from a range with a lock file, so no two running calls share it) before it starts
  bubblewrap, which then makes an unprivileged user namespace. The process count is that uid's
  alone, and after the call every process of that uid is killed (`kill -9 -1` as that uid), so
  nothing it forked outlives the call.
- That uid cannot traverse /root, where this machine's Python runtime lives: the sandbox runs the
  system's /usr/bin/python3 (standard library only; installed packages are hidden under empty tmpfs).
- The code is its PID namespace's process 1 (--as-pid-1), so bubblewrap's parent waits for it and
  the call's CPU time is measured; a PID 1 ignores SIGXCPU, so the CPU limit ends it with the hard
  limit's SIGKILL one second later.

`Sandbox.properties` says which isolation properties hold on this machine (tests/test_sandbox.py
tries each with hostile code); without bubblewrap the sandbox still runs, with limits and (as
root) the dedicated uid, and says that network and filesystem isolation do not hold.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

_UID_BASE, _UID_COUNT = 200_000, 1024  # dedicated uids, far above any login user's
_LOCK_DIR = os.path.join(tempfile.gettempdir(), "rlhf-sandbox-uids")
_BWRAP_PROCS = 2  # bubblewrap's own processes in the count: its parent and the namespace's init


@dataclass(frozen=True)
class Limits:
    """What one call may use; past a limit the code is stopped and the result names the limit."""

    cpu_s: int = 5  # CPU seconds (RLIMIT_CPU: SIGXCPU, then SIGKILL a second later)
    memory_mb: int = 512  # address space (RLIMIT_AS): an allocation past it is a MemoryError
    processes: int = 16  # processes and threads the code may run at once, itself included
    file_size_mb: int = 8  # the largest file it may write, stdout and stderr included (RLIMIT_FSIZE)
    open_files: int = 64  # RLIMIT_NOFILE
    wall_s: float = 10.0  # wall-clock seconds before the whole process group is killed
    workdir_mb: int = 32  # size of the tmpfs working directory
    output_chars: int = 8192  # stdout and stderr kept in the result, each


@dataclass
class SandboxResult:
    stdout: str
    stderr: str
    exit_code: int | None  # negative: killed by that signal; None when the wall clock ran out
    timed_out: bool
    killed_by: str | None  # "wall", "cpu", "memory", "processes", "file_size", "open_files", or None
    wall_s: float
    cpu_s: float  # user + system CPU of the code and everything it waited for
    truncated: bool = False  # stdout or stderr was cut to `Limits.output_chars`
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out and self.killed_by is None


# Python ignores SIGXFSZ and turns EAGAIN/EMFILE into exceptions: their messages name the limit.
_LIMIT_MESSAGES = (
    ("memory", ("MemoryError",)),
    ("processes", ("BlockingIOError: [Errno 11]", "can't start new thread", "Resource temporarily unavailable")),
    ("file_size", ("[Errno 27] File too large",)),
    ("open_files", ("[Errno 24] Too many open files",)),
)


def _killed_by(timed_out: bool, exit_code: int | None, stderr: str, cpu_s: float, lim: Limits) -> str | None:
    if timed_out:
        return "wall"
    # The code is its namespace's PID 1 under bubblewrap, which drops SIGXCPU: the hard limit's SIGKILL ends it.
    if exit_code in (-signal.SIGXCPU, 128 + signal.SIGXCPU) or (
            exit_code in (-signal.SIGKILL, 128 + signal.SIGKILL) and cpu_s >= lim.cpu_s):
        return "cpu"
    if exit_code in (-signal.SIGXFSZ, 128 + signal.SIGXFSZ):
        return "file_size"
    if exit_code == 0:
        return None
    for name, needles in _LIMIT_MESSAGES:
        if any(n in stderr for n in needles):
            return name
    return None


class Sandbox:
    """Runs untrusted Python, one call at a time per thread (calls from several threads are fine)."""

    def __init__(self, limits: Limits | None = None, use_bwrap: bool = True, threads: int | None = None):
        # (`threads`: what the driver gives every role's actor; the code runs in a subprocess, one thread is enough here)
        self.limits = limits or Limits()
        self.bwrap = shutil.which("bwrap") if use_bwrap else None
        self.as_root = os.geteuid() == 0
        self.python, self.runtime, self.hidden = _interpreter()
        if self.bwrap and not self._bwrap_works():
            self.bwrap = None

    def properties(self) -> dict[str, bool]:
        """Which isolation properties hold here (see the module docstring and docs/agents.md)."""
        ns = self.bwrap is not None
        return {
            "no_network": ns,  # a network namespace with only a down loopback
            "no_host_files": ns,  # a root of /usr and the runtime alone; no /etc, /home, /root, project or job files
            "fresh_workdir": True,  # a new tmpfs (bwrap) or temp dir per call
            "own_pid_namespace": ns,  # cannot see or signal the caller or other jobs
            "dedicated_uid": self.as_root,  # not root outside the sandbox, so the process limit binds
            "process_limit": self.as_root,  # RLIMIT_NPROC counts a dedicated uid's processes alone
            "cpu_limit": True,
            "memory_limit": True,
            "file_size_limit": True,
            "wall_limit": True,
            "seccomp": False,  # no syscall filter: the namespaces and limits above are the boundary
        }

    def _bwrap_works(self) -> bool:
        with self._uid() as uid:
            res = self._run_argv(["-c", "print(1)"], uid, {}, Limits(wall_s=10))
        return res.stdout.strip() == "1"

    # ------------------------------------------------------------------ one call

    def run(self, code: str, files: dict[str, str] | None = None, stdin: str = "",
            limits: Limits | None = None) -> SandboxResult:
        """Run `code` as /work/main.py (or main.py in a temp dir without bubblewrap), with `files`
        (name -> text) beside it."""
        files = {"main.py": code, **(files or {})}
        with self._uid() as uid:
            return self._run_argv(["main.py"], uid, files, limits or self.limits, stdin)

    def _run_argv(self, argv: list[str], uid: int | None, files: dict[str, str], lim: Limits, stdin: str = "") -> SandboxResult:
        with tempfile.TemporaryDirectory(prefix="sandbox-io-") as io_dir:
            # Code, stdin and the outputs live in a directory of the caller's, never in the sandbox.
            paths = {}
            for name, text in files.items():
                if "/" in name or name.startswith("."):
                    raise ValueError(f"sandbox file name {name!r}: a plain name only")
                paths[name] = os.path.join(io_dir, "in-" + name)
                with open(paths[name], "w") as f:
                    f.write(text)
            fds: list[int] = []
            cwd = "/"
            try:
                if self.bwrap:
                    fds = [os.open(paths[name], os.O_RDONLY) for name in files]
                    cmd, cwd = self._bwrap_argv(fds, list(files), argv, lim), "/"
                else:
                    cwd = tempfile.mkdtemp(prefix="sandbox-work-")
                    for name in files:
                        shutil.copy(paths[name], os.path.join(cwd, name))
                    cmd = [self.python, "-I", "-S", *argv]
                    if uid is not None:
                        for path in [cwd, *(os.path.join(cwd, n) for n in files)]:
                            os.chown(path, uid, uid)
                return self._spawn(self._wrap(cmd, uid, lim), cwd, fds, stdin, io_dir, lim, uid)
            finally:
                for fd in fds:
                    os.close(fd)
                if not self.bwrap and cwd != "/":
                    shutil.rmtree(cwd, ignore_errors=True)

    def _bwrap_argv(self, file_fds: list[int], names: list[str], argv: list[str], lim: Limits) -> list[str]:
        cmd = [self.bwrap, "--unshare-all", "--die-with-parent", "--new-session", "--unshare-user", "--as-pid-1",
               "--disable-userns", "--cap-drop", "ALL", "--clearenv",
               "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/work", "--setenv", "TMPDIR", "/work",
               "--setenv", "PYTHONDONTWRITEBYTECODE", "1", "--setenv", "PYTHONIOENCODING", "utf-8",
               "--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib",
               "--symlink", "usr/lib64", "/lib64", "--proc", "/proc", "--dev", "/dev"]
        if self.runtime:
            cmd += ["--ro-bind", self.runtime, self.runtime]
        for path in self.hidden:  # installed packages (this project's among them) stay out: an empty tmpfs over each
            cmd += ["--size", str(1 << 20), "--tmpfs", path]
        cmd += ["--size", str(lim.workdir_mb << 20), "--perms", "0777", "--tmpfs", "/work"]
        for fd, name in zip(file_fds, names):
            cmd += ["--perms", "0644", "--file", str(fd), f"/work/{name}"]
        # The root is bubblewrap's own tmpfs: read-only, so /work is the one place the code can write.
        cmd += ["--remount-ro", "/", "--chdir", "/work", "--", self.python, "-I", "-S", *argv]
        return cmd

    def _wrap(self, cmd: list[str], uid: int | None, lim: Limits) -> list[str]:
        nproc = lim.processes + (_BWRAP_PROCS if self.bwrap else 0)
        limits = [f"--cpu={lim.cpu_s}:{lim.cpu_s + 1}", f"--as={lim.memory_mb << 20}", f"--fsize={lim.file_size_mb << 20}",
                  f"--nofile={lim.open_files}", "--core=0"]
        if uid is not None:
            limits.append(f"--nproc={nproc}")
            drop = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all"]
            cmd = drop + cmd
        return ["prlimit", *limits, "--", *cmd]

    def _spawn(self, cmd: list[str], cwd: str, fds: list[int], stdin: str, io_dir: str, lim: Limits,
               uid: int | None) -> SandboxResult:
        out_path, err_path = os.path.join(io_dir, "stdout"), os.path.join(io_dir, "stderr")
        start = time.perf_counter()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.PIPE, stdout=out, stderr=err, pass_fds=fds,
                                    start_new_session=True, env={"PATH": "/usr/bin:/bin"})
        try:
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.write(stdin.encode()[: 1 << 20])
            proc.stdin.close()
        except OSError:
            pass
        status, usage, timed_out = self._wait(proc, start + lim.wall_s)
        wall = time.perf_counter() - start
        self._kill_all(proc, uid)
        exit_code = None if timed_out else (os.waitstatus_to_exitcode(status) if status is not None else None)
        stdout, cut_out = _read_head(out_path, lim.output_chars)
        stderr, cut_err = _read_head(err_path, lim.output_chars)
        cpu = (usage.ru_utime + usage.ru_stime) if usage else 0.0
        return SandboxResult(stdout, stderr, exit_code, timed_out, _killed_by(timed_out, exit_code, stderr, cpu, lim), wall,
                             cpu, cut_out or cut_err)

    @staticmethod
    def _wait(proc: subprocess.Popen, deadline: float):
        """(wait status, rusage, timed out): wait4 on the child, so the CPU of this call alone is counted."""
        delay = 0.001
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                return status, usage, False
            if time.perf_counter() >= deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                pid, status, usage = os.wait4(proc.pid, 0)
                proc.returncode = os.waitstatus_to_exitcode(status)
                return status, usage, True
            time.sleep(delay)
            delay = min(delay * 2, 0.02)

    @staticmethod
    def _kill_all(proc: subprocess.Popen, uid: int | None) -> None:
        """Nothing of the call survives it: its process group, and (with a dedicated uid) every process
        of that uid, whatever session or group it moved to."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        # `kill -9 -1` as the uid reaches its processes in any session; repeated while any still runs,
        # since one forked between the scan and the signal would be missed.
        for _ in range(50 if uid is not None else 0):
            if not live_processes(uid):
                return
            subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "kill", "-9", "-1"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10, check=False)
            time.sleep(0.01)

    @contextlib.contextmanager
    def _uid(self) -> Iterator[int | None]:
        """A dedicated uid no other running call holds (as root), else None (the caller's own uid)."""
        if not self.as_root:
            yield None
            return
        os.makedirs(_LOCK_DIR, mode=0o700, exist_ok=True)
        start = secrets.randbelow(_UID_COUNT)
        for i in range(_UID_COUNT):
            uid = _UID_BASE + (start + i) % _UID_COUNT
            fd = os.open(os.path.join(_LOCK_DIR, str(uid)), os.O_CREAT | os.O_RDWR, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
                    continue
                raise
            try:
                yield uid
            finally:
                os.close(fd)
            return
        raise RuntimeError(f"all {_UID_COUNT} sandbox uids are in use")


def live_processes(uid: int | None = None) -> list[int]:
    """PIDs of the processes (zombies aside) that run as `uid`, or as any sandbox uid when None."""
    lo, hi = (uid, uid + 1) if uid is not None else (_UID_BASE, _UID_BASE + _UID_COUNT)
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
            owner = os.stat(f"/proc/{pid}").st_uid
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if lo <= owner < hi and state != b"Z":
            out.append(int(pid))
    return out


def _interpreter() -> tuple[str, str | None, list[str]]:
    """(the sandbox's python, a runtime directory to bind beside /usr or None, site directories to hide).

    The system's /usr/bin/python3 when there is one: /usr is bound anyway, and a dedicated uid can
    reach it (this machine's own runtime lives under /root, which only root may traverse)."""
    if os.access("/usr/bin/python3", os.X_OK):
        hidden = glob.glob("/usr/lib/python3*/*-packages") + glob.glob("/usr/local/lib/python3*/*-packages")
        return "/usr/bin/python3", None, sorted(p for p in hidden if os.path.isdir(p))
    paths = sysconfig.get_paths()
    hidden = [p for p in {paths["purelib"], paths["platlib"]} if os.path.isdir(p)]
    return os.path.realpath(sys.executable), sys.base_prefix, hidden


def _read_head(path: str, chars: int) -> tuple[str, bool]:
    with open(path, "rb") as f:
        data = f.read(chars * 4 + 1)
        more = bool(f.read(1))
    text = data.decode("utf-8", "replace")
    return text[:chars], more or len(text) > chars


# ---------------------------------------------------------------------- uses: a tool, a reward

def run_python(sandbox: Sandbox | SandboxPool, code: str) -> str:
    """The `python` tool: what the code printed (and its error, or the limit that stopped it), as the
    text of a tool message."""
    res = sandbox.run(code)
    parts = [res.stdout.rstrip()] if res.stdout.strip() else []
    if res.killed_by:
        parts.append(f"[stopped: {res.killed_by} limit]")
    elif res.exit_code != 0 and res.stderr.strip():
        parts.append(res.stderr.strip().splitlines()[-1])
    return "\n".join(parts) or "(no output)"


# Each test runs in a child of the harness, after the candidate's code: the child earns a pass only by
# writing the token to the pipe after the test's statements ran; `os._exit(0)` or `sys.exit()` in the
# code is no pass. The code shares a process with the token, so code written to find it can forge a
# pass: a limit named in docs/agents.md.
_HARNESS = """\
import json, os, signal, sys
TESTS = json.load(open("tests.json"))
token = sys.stdin.readline().strip().encode()
code = compile(open("solution.py").read(), "solution.py", "exec")
passed = 0
for i, test in enumerate(TESTS):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        signal.setitimer(signal.ITIMER_REAL, PER_TEST_S)
        scope = {"__name__": "__main__"}
        exec(code, scope)
        exec(compile(test, f"test_{i}", "exec"), scope)
        os.write(w, token)
        os._exit(0)
    os.close(w)
    got = os.read(r, 64)
    os.close(r)
    os.waitpid(pid, 0)
    passed += got == token
print(json.dumps({"passed": passed, "total": len(TESTS)}))
"""


def unit_test_reward(sandbox: Sandbox | SandboxPool, code: str, tests: list[str], per_test_s: float = 2.0) -> float:
    """The fraction of `tests` (each Python statements, e.g. `assert f(2) == 4`) that pass against `code`;
    0.0 for code that fails or is stopped."""
    if not tests:
        return 0.0
    token = secrets.token_hex(16)
    res = sandbox.run(_HARNESS.replace("PER_TEST_S", repr(float(per_test_s))),
                      files={"solution.py": code, "tests.json": json.dumps(list(tests))}, stdin=token + "\n")
    for line in reversed(res.stdout.splitlines()):
        with contextlib.suppress(ValueError, TypeError, KeyError):
            out = json.loads(line)
            return min(int(out["passed"]), len(tests)) / len(tests)
    return 0.0


# ---------------------------------------------------------------------- a pool of Ray actors

def _timed_get(refs: list, timeout_s: float) -> list:
    """The refs' values, all within `timeout_s` (a TimeoutError past it): workers wait with a deadline too."""
    deadline = time.monotonic() + timeout_s
    return [ref.future().result(timeout=max(0.0, deadline - time.monotonic())) for ref in refs]


class SandboxPool:
    """`size` Ray actors, each a `Sandbox`; calls go round-robin. `run` waits for one call; `run_many`
    submits every call, then waits once. An actor that dies is replaced by Ray (max_restarts)."""

    def __init__(self, size: int = 2, limits: Limits | None = None, num_cpus: float = 0.25, use_bwrap: bool = True):
        import ray

        actor = ray.remote(Sandbox).options(num_cpus=num_cpus, max_restarts=3, max_task_retries=0)
        self.actors = [actor.remote(limits, use_bwrap) for _ in range(size)]
        self._next = 0

    @classmethod
    def of(cls, actors: list) -> SandboxPool:
        """A pool over actors started elsewhere (a job's `sandbox` role, in its placement group)."""
        pool = cls.__new__(cls)
        pool.actors, pool._next = list(actors), 0
        return pool

    def _pick(self):
        a = self.actors[self._next % len(self.actors)]
        self._next += 1
        return a

    def submit(self, code: str, files: dict[str, str] | None = None, stdin: str = "", limits: Limits | None = None):
        """An object ref to the call's SandboxResult."""
        return self._pick().run.remote(code, files, stdin, limits)

    def run(self, code: str, files: dict[str, str] | None = None, stdin: str = "", limits: Limits | None = None,
            timeout_s: float | None = None) -> SandboxResult:
        lim = limits or Limits()
        return _timed_get([self.submit(code, files, stdin, limits)], timeout_s or lim.wall_s + 30)[0]

    def run_many(self, codes: list[str], limits: Limits | None = None, timeout_s: float = 300) -> list[SandboxResult]:
        return _timed_get([self.submit(c, limits=limits) for c in codes], timeout_s)

    def properties(self) -> dict[str, bool]:
        return _timed_get([self.actors[0].properties.remote()], 60)[0]

    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []


