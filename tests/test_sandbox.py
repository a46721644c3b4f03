"""The sandbox against hostile code: each attack is contained and reported, and the next call runs.

The plain-class tests are fast (about 0.1 s a call); the Ray pool's are slow-tier. What holds where
bubblewrap is missing is what `Sandbox.properties()` says: the namespace tests skip, the limits run.
"""

from __future__ import annotations

import os
import socket
import threading

import pytest

from workers.sandbox import (
    Limits,
    Sandbox,
    SandboxPool,
    live_processes,
    run_python,
    unit_test_reward,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = Limits(cpu_s=1, wall_s=4, processes=8)


@pytest.fixture(scope="module")
def box() -> Sandbox:
    return Sandbox(QUICK)


def needs(box: Sandbox, prop: str) -> None:
    if not box.properties()[prop]:
        pytest.skip(f"{prop} does not hold on this machine (no bubblewrap or not root)")


def test_runs_code_and_reports(box):
    res = box.run("import sys; print(6 * 7); print('warn', file=sys.stderr); sys.exit(3)")
    assert (res.stdout, res.stderr.strip(), res.exit_code, res.timed_out, res.killed_by) == ("42\n", "warn", 3, False, None)
    assert res.wall_s > 0
    assert box.run("print(1)").ok


def test_endless_loop_is_stopped_by_cpu_or_wall(box):
    res = box.run("while True: pass", limits=Limits(cpu_s=1, wall_s=1.2))
    assert res.killed_by in ("cpu", "wall") and not res.ok
    assert box.run("print('next')").stdout == "next\n"


def test_sleeper_is_stopped_by_wall_clock(box):
    res = box.run("import time; time.sleep(60)", limits=Limits(wall_s=0.5))
    assert res.timed_out and res.killed_by == "wall" and res.exit_code is None
    assert 0.5 <= res.wall_s < 30


def test_memory_hog(box):
    res = box.run("x = bytearray(2 * 1024 ** 3); print('got it')")
    assert res.killed_by == "memory" and "got it" not in res.stdout


def test_fork_bomb_is_bounded_and_nothing_survives(box):
    needs(box, "process_limit")
    res = box.run("import os, time\nwhile True:\n    os.fork()\n")
    assert res.killed_by == "processes", res.stderr[-300:]
    assert live_processes() == []
    # a bomb that detaches (setsid) and sleeps past the call is killed with it too
    res = box.run("import os, time\nfor _ in range(4):\n    if os.fork() == 0:\n        os.setsid(); time.sleep(60)\nprint('forked')")
    assert res.stdout == "forked\n" and live_processes() == []


def test_file_size_and_output_are_capped(box):
    res = box.run("open('big', 'wb').write(b'x' * (20 << 20))")
    assert res.killed_by == "file_size"
    res = box.run("print('y' * 10_000_000)")
    assert res.truncated and len(res.stdout) == QUICK.output_chars


def test_cannot_read_host_files(box, tmp_path):
    needs(box, "no_host_files")
    secret = tmp_path / "secret.txt"
    secret.write_text("job secret")
    for path in ["/etc/shadow", "/etc/passwd", os.path.join(ROOT, "README.md"), str(secret)]:
        res = box.run(f"print(open({path!r}).read()[:20])")
        assert res.exit_code != 0 and "job secret" not in res.stdout and "rlhf" not in res.stdout, (path, res)
    listing = box.run("import os; print(sorted(os.listdir('/')))").stdout
    assert eval(listing) == ["bin", "dev", "lib", "lib64", "proc", "usr", "work"]
    assert box.run("import numpy").exit_code != 0  # installed packages are hidden too
    # no host process is visible: the code is its namespace's only process
    assert box.run("import os; print([p for p in os.listdir('/proc') if p.isdigit()])").stdout == "['1']\n"


def test_cannot_write_outside_its_directory(box, tmp_path):
    needs(box, "no_host_files")
    target = tmp_path / "planted"
    for path in ["/usr/planted", "/planted", "/tmp/planted", str(target)]:
        res = box.run(f"open({path!r}, 'w').write('x')")
        assert res.exit_code != 0, path
    assert not target.exists()
    assert box.run("open('mine', 'w').write('ok'); print(open('mine').read())").stdout == "ok\n"


def test_fresh_directory_per_call(box):
    box.run("open('left_behind', 'w').write('x')")
    assert box.run("import os; print(sorted(os.listdir('.')))").stdout == "['main.py']\n"


def test_no_network(box):
    needs(box, "no_network")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    accepted = []
    def accept():
        try:
            accepted.append(server.accept())
        except OSError:  # closed at the end of the test, nothing having connected
            pass

    threading.Thread(target=accept, daemon=True).start()
    try:
        res = box.run(f"import socket; s = socket.create_connection(('127.0.0.1', {port}), timeout=2); print('connected')")
        assert "connected" not in res.stdout and "Error" in res.stderr
        res = box.run("import socket; socket.create_connection(('8.8.8.8', 53), timeout=2); print('out')")
        assert "out" not in res.stdout
        assert accepted == []
    finally:
        server.close()


def test_cannot_kill_its_parent_or_the_host(box):
    needs(box, "own_pid_namespace")
    me = os.getpid()
    res = box.run(f"import os, signal\nfor pid in (os.getppid(), {me}, -1):\n"
                  f"    try: os.kill(pid, signal.SIGKILL)\n    except OSError as e: print(type(e).__name__)\nprint('done')")
    assert res.stdout.endswith("done\n")
    assert box.run("print('alive')").stdout == "alive\n"


def test_properties_name_what_holds(box):
    props = box.properties()
    assert props["cpu_limit"] and props["memory_limit"] and props["wall_limit"] and props["fresh_workdir"]
    assert props["seccomp"] is False


def test_run_python_tool(box):
    assert run_python(box, "print(123456789 * 987654321)") == str(123456789 * 987654321)
    assert run_python(box, "1 / 0").endswith("ZeroDivisionError: division by zero")
    assert "stopped: wall limit" in run_python(Sandbox(Limits(wall_s=0.5)), "import time; time.sleep(9)")


def test_unit_test_reward(box):
    tests = ["assert f(2) == 4", "assert f(3) == 9", "assert f(0) == 1"]
    assert unit_test_reward(box, "def f(x): return x * x", tests) == pytest.approx(2 / 3)
    assert unit_test_reward(box, "def f(x):\n    while True: pass", tests[:1], per_test_s=0.5) == 0.0
    # exiting early is no pass
    assert unit_test_reward(box, "import os; os._exit(0)", tests) == 0.0
    assert unit_test_reward(box, "import sys; sys.exit(0)", tests) == 0.0
    assert unit_test_reward(box, "print('{\"passed\": 3, \"total\": 3}')", tests) == 0.0


def test_limits_hold_without_bubblewrap():
    plain = Sandbox(QUICK, use_bwrap=False)
    assert plain.properties()["no_network"] is False
    assert plain.run("x = bytearray(2 * 1024 ** 3)").killed_by == "memory"
    assert plain.run("import time; time.sleep(9)", limits=Limits(wall_s=0.5)).killed_by == "wall"
    if plain.properties()["process_limit"]:
        assert plain.run("import os\nwhile True: os.fork()").killed_by == "processes"
        assert live_processes() == []


@pytest.mark.slow
def test_pool_goes_on_after_each_attack(ray_session):
    pool = SandboxPool(size=2, limits=QUICK)
    try:
        attacks = ["while True: pass", "import os\nwhile True: os.fork()", "x = bytearray(2 * 1024 ** 3)",
                   "print(open('/etc/shadow').read())", "import os, signal; os.kill(os.getppid(), signal.SIGKILL)",
                   "import os, signal; os.kill(-1, signal.SIGKILL)", "open('/planted', 'w').write('x')"]
        results = pool.run_many(attacks)
        assert [r.ok for r in results] == [False, False, False, False, True, False, False]
        assert {results[0].killed_by, results[1].killed_by, results[2].killed_by} <= {"cpu", "wall", "processes", "memory"}
        assert [r.stdout for r in pool.run_many([f"print({i})" for i in range(4)])] == ["0\n", "1\n", "2\n", "3\n"]
        assert run_python(pool, "print(2 ** 100)") == str(2 ** 100)
        assert unit_test_reward(pool, "def f(x): return -x", ["assert f(1) == -1", "assert f(2) == 2"]) == 0.5
    finally:
        pool.shutdown()
