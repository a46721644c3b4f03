"""The Python versions pyproject.toml claims: ruff parses every file as the oldest one would."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def oldest_python() -> str:
    # (tomllib is Python 3.11+: the claim is read with a pattern)
    major, minor = re.search(r'^requires-python\s*=\s*">=\s*(\d+)\.(\d+)"', (ROOT / "pyproject.toml").read_text(), re.M).groups()
    return f"py{major}{minor}"


def syntax_errors(*paths: str) -> subprocess.CompletedProcess:
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.fail("ruff is not installed: pip install -e '.[test]'")
    return subprocess.run([ruff, "check", "--no-cache", "--select", "E9", "--target-version", oldest_python(), *paths],
                          cwd=ROOT, capture_output=True, text=True)


def test_every_file_parses_on_the_oldest_claimed_python():
    result = syntax_errors("orchestrator", "workers", "api", "scripts", "benchmarks", "examples", "tests")
    assert result.returncode == 0, result.stdout + result.stderr


def test_newer_syntax_is_caught(tmp_path):
    """What the check exists for: a subscript with a starred expression parses only from Python 3.11."""
    bad = tmp_path / "bad.py"
    bad.write_text("from typing import Annotated\nmeta = (1,)\nT = Annotated[int, *meta]\n")
    result = syntax_errors(str(bad))
    assert result.returncode != 0 and "star expression in index" in result.stdout, result.stdout


def library_violations(*paths: str) -> subprocess.CompletedProcess:
    vermin = shutil.which("vermin")
    if vermin is None:
        pytest.fail("vermin is not installed: pip install -e '.[test]'")
    target = oldest_python().removeprefix("py")
    return subprocess.run([vermin, f"--target={target[0]}.{target[1:]}-", "--no-tips", "--violations", "-q", *paths],
                          cwd=ROOT, capture_output=True, text=True)


def test_no_module_or_function_newer_than_the_oldest_claimed_python():
    result = library_violations("orchestrator", "workers", "api", "scripts", "benchmarks", "examples", "tests")
    assert result.returncode == 0, result.stdout + result.stderr


def test_newer_modules_are_caught(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import tomllib\n")
    result = library_violations(str(bad))
    assert result.returncode != 0 and "tomllib" in result.stdout, result.stdout


def test_no_name_is_used_undefined():
    """Pyflakes' undefined names (ruff F821) in every file: a name a refactor left behind fails at once here rather
    than in the one slow-tier path that runs it (a demo's `**model` once failed only in tests/test_demo.py)."""
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.fail("ruff is not installed: pip install -e '.[test]'")
    result = subprocess.run([ruff, "check", "--no-cache", "--select", "F821", "orchestrator", "workers", "api", "scripts", "benchmarks",
                             "examples", "tests"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
