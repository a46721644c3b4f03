"""Every `rlhf demo` variant, end to end through the real command with `--quick` (two steps a stage,
a few held-out problems): the same code path as the full demo, so that a demo cannot break unseen."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT, entrypoint_env, read_jsonl

pytestmark = pytest.mark.slow


def run_demo(which: str, out, ray_head, *flags: str) -> str:
    """`rlhf demo WHICH --quick [FLAGS]` on the session's Ray; its stdout, after checking that it succeeded."""
    cmd = [sys.executable, "-m", "orchestrator.entrypoints.cli", "demo", which, "--quick", "--out", str(out), *flags]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False, env=entrypoint_env(ray_head))
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def test_the_arithmetic_demo_prints_its_table(ray_head, tmp_path):
    out = run_demo("arithmetic", tmp_path / "arith", ray_head)
    assert "held-out greedy accuracy (16 problems" in out, out[-2000:]
    assert "after sft" in out and "after grpo" in out and "GRPO gain" in out, out[-2000:]
    assert (tmp_path / "arith" / "metrics.png").exists()
    assert [m["step"] for m in read_jsonl(tmp_path / "arith" / "metrics.jsonl")] == [1, 2, 3, 4]


def test_the_arithmetic_demo_trains_grpo_asynchronously_with_max_staleness(ray_head, tmp_path):
    out = run_demo("arithmetic", tmp_path / "arith", ray_head, "--max-staleness", "1")
    assert "after grpo" in out and "GRPO asynchronous, max_staleness 1" in out, out[-2000:]
    metrics = read_jsonl(tmp_path / "arith" / "metrics.jsonl")
    assert [(m["step"], m["stage"]) for m in metrics] == [(1, "sft"), (2, "sft"), (3, "grpo"), (4, "grpo")]
    assert all(m["staleness/max"] <= 1 for m in metrics[2:]), metrics[2:]  # (only the asynchronous loop reports it)


def test_the_preference_demo_prints_its_table(ray_head, tmp_path):
    out = run_demo("preference", tmp_path / "pref", ray_head)
    for line in ("hidden score on 16 held-out prompts", "initial", "after SFT", "after PPO", "after DPO"):
        assert line in out, out[-2000:]
    assert (tmp_path / "pref" / "hidden_score.png").exists() and (tmp_path / "pref" / "dpo" / "metrics.png").exists()


def test_the_tools_demo_prints_its_table(ray_head, tmp_path):
    out = run_demo("tools", tmp_path / "tools", ray_head)
    assert "held-out greedy episodes (16 problems" in out, out[-2000:]
    for line in ("without tools (after SFT)", "after SFT", "after GRPO", "valid calls"):
        assert line in out, out[-2000:]
    assert [m["step"] for m in read_jsonl(tmp_path / "tools" / "metrics.jsonl")] == [1, 2, 3, 4]
    assert {r["step"] for r in read_jsonl(tmp_path / "tools" / "trajectories.jsonl")} == {3, 4}  # the GRPO stage's episodes
