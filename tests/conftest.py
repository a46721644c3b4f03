"""Shared fixtures: a tiny local model, arithmetic data, spec files, and one local Ray for the session."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from orchestrator.tiny_model import init_model

    return init_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def arith_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [{"prompt": f"{a}+{b}=", "answer": a + b} for a in range(8) for b in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_spec(model: Path, data: Path, out: Path, **overrides) -> dict:
    """A job spec small enough for a test: a few steps of a few prompts."""
    spec = {
        "api_version": "rlhf/v1",
        "name": out.name,
        "algorithm": {"name": "grpo"},
        "model": {"path": str(model)},
        "data": {"train_file": str(data), "max_prompt_length": 16},
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


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the in-process end-to-end tests (a driver per job, as on a cluster)."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def run_entrypoint(spec_path: Path, *args: str, timeout: float = 300, env: dict | None = None):
    import subprocess

    return subprocess.run(
        [sys.executable, "-m", "orchestrator.run", "--spec", str(spec_path), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
