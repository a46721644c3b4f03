"""Checkpoint layout: `<dir>/step_000012/` holds `policy/` (HF layout, loadable by any stage),
`policy_optim.pt`, `critic.pt` (PPO) and `state.json`, written last, which marks it complete; an
`rm` stage's checkpoints hold `reward_model/` (a sequence classifier with its tokenizer) instead of `policy/`.

Data position and sampling RNG need no saving beyond the step: both are functions of
(seed, step) (see PromptSampler and HFRollout.generate).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from orchestrator.core.spec import JobSpec


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:06d}"


def finish(path: Path, step: int, spec: JobSpec) -> None:
    """Mark the checkpoint complete (`policy/` must already hold the model and its tokenizer)."""
    state = {"step": step, "time": time.time(), "seed": spec.optim.seed, "spec": spec.model_dump(mode="json")}
    tmp = path / "state.json.tmp"
    tmp.write_text(json.dumps(state, indent=1))
    tmp.rename(path / "state.json")


def read_state(path: Path) -> dict:
    return json.loads((Path(path) / "state.json").read_text())


def complete(root: Path) -> list[Path]:
    """Finished checkpoints, oldest first (a directory without state.json was interrupted mid-save)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / "state.json").exists())


def latest(root: Path) -> Path | None:
    found = complete(root)
    return found[-1] if found else None


PINNED = "pinned"  # a file in a checkpoint that pruning must leave alone


def pin(path: Path, reason: str) -> None:
    """Keep a finished checkpoint whatever `keep_last` says: a pipeline's later stages (or their resume)
    start from an earlier stage's final policy or score with its reward model."""
    path = Path(path)
    if (path / "state.json").exists() and not (path / PINNED).exists():
        (path / PINNED).write_text(reason + "\n")


def prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` finished checkpoints, except pinned ones."""
    for old in complete(root)[:-keep_last]:
        if not (old / PINNED).exists():
            shutil.rmtree(old, ignore_errors=True)


def listing(root: Path) -> list[dict]:
    """What the control plane shows: step, path, time and size of each finished checkpoint."""
    out = []
    for p in complete(root):
        state = read_state(p)
        size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        out.append({"step": state["step"], "path": str(p), "created_at": state["time"], "bytes": size})
    return out
