"""The import rules of the project, read from the source (every import, at module level or inside a function).

- orchestrator/core/ (the floor) imports nothing of the project but itself;
- workers/ and api/ stand on the floor only (and on themselves);
- no module imports itself back through others: the import graph has no cycles.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("orchestrator", "workers", "api")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_imports(path: Path) -> set[str]:
    """Every project module `path` imports; `from pkg import name` counts as pkg.name when that is a module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] in PACKAGES)
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        # An import of a name inside a module is an edge to that module; keep edges between modules only.
        targets = {t if t in modules else t.rsplit(".", 1)[0] for t in project_imports(path)}
        edges[name] = {t for t in targets if t in modules and t != name}
    return edges


def test_the_graph_is_read():
    edges = graph()
    assert "orchestrator.core.spec" in edges["orchestrator.stages.driver"] | edges["orchestrator.stages.pipeline"]
    assert "orchestrator.core.batch" in edges["workers.trainer"]


def test_the_floor_imports_nothing_of_the_project():
    bad = {(m, t) for m, ts in graph().items() if m.startswith("orchestrator.core") for t in ts if not t.startswith("orchestrator.core")}
    assert not bad, f"orchestrator/core imports the rest of the project: {sorted(bad)}"


def test_workers_and_api_stand_on_the_floor_only():
    bad = set()
    for m, targets in graph().items():
        own = m.split(".")[0]
        if own in ("workers", "api"):
            bad |= {(m, t) for t in targets if not (t.startswith(own + ".") or t == own or t.startswith("orchestrator.core"))}
    assert not bad, f"imports above the floor: {sorted(bad)}"


def test_no_import_cycles():
    edges = graph()
    # Tarjan's strongly connected components: any component of more than one module is a cycle.
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_a_cycle_would_be_found(tmp_path, monkeypatch):
    """The cycle check itself: two modules importing each other inside functions are caught."""
    pkg = tmp_path / "workers"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from workers.b import g\n")
    (pkg / "b.py").write_text("def g():\n    import workers.a\n")
    for name in ("orchestrator", "api"):
        (tmp_path / name).mkdir()
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    try:
        test_no_import_cycles()
    except AssertionError as err:
        assert "workers.a" in str(err) and "workers.b" in str(err)
    else:
        raise AssertionError("a cycle between workers.a and workers.b went unnoticed")


def test_the_control_plane_loads_no_torch():
    """The API server validates uploads as rows (orchestrator/core/rows.py) and never holds a tensor:
    it starts without torch or transformers (about 1.5 s of CPU and 250 MB less per server)."""
    import subprocess
    import sys

    code = "import sys, api.main; heavy = {'torch', 'transformers'} & set(sys.modules); assert not heavy, heavy"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


# The one timed wait for actor calls (fault_tolerance.call_timeout_s); ray.wait may stand elsewhere
# only with a deadline of its own (a placement group's readiness).
TIMED_WAIT = "orchestrator/runtime/waits.py"


def untimed_waits(root: Path) -> list[str]:
    """`file:line` of every `ray.get` outside the timed wait, and of every `ray.wait` there without a `timeout=`."""
    found = []
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            where = path.relative_to(root).as_posix()
            if where == TIMED_WAIT:
                continue
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.ImportFrom) and node.module == "ray" and {a.name for a in node.names} & {"get", "wait"}:
                    found.append(f"{where}:{node.lineno} imports ray.get or ray.wait")
                if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name)
                        and node.func.value.id == "ray" and node.func.attr in ("get", "wait")):
                    continue
                timed = node.func.attr == "wait" and any(k.arg == "timeout" and not (isinstance(k.value, ast.Constant) and k.value.value is None)
                                                         for k in node.keywords)
                if not timed:
                    found.append(f"{where}:{node.lineno} ray.{node.func.attr}")
    return found


def test_every_actor_wait_is_timed():
    """Every stage kind, evaluation, checkpoints and weight sync wait through orchestrator/runtime/waits.py."""
    assert (ROOT / TIMED_WAIT).exists()
    assert not untimed_waits(ROOT), f"waits without fault_tolerance.call_timeout_s: {untimed_waits(ROOT)}"


def test_an_untimed_wait_would_be_found(tmp_path):
    for name in PACKAGES:
        (tmp_path / name).mkdir()
    (tmp_path / "orchestrator" / "stage.py").write_text(
        "import ray\nfrom ray import get\n\ndef f(refs, pg):\n    ray.wait([pg.ready()], timeout=5)\n    ray.wait(refs, timeout=None)\n"
        "    return ray.get(refs)\n")
    assert untimed_waits(tmp_path) == ["orchestrator/stage.py:2 imports ray.get or ray.wait", "orchestrator/stage.py:6 ray.wait",
                                      "orchestrator/stage.py:7 ray.get"]
