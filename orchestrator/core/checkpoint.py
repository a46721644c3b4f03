"""Checkpoint layout: `<dir>/step_000012/` holds `policy/` (HF layout, loadable by any stage),
`policy_optim.pt`, `critic.pt` (PPO) and `state.json`, written last, which marks it complete.

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


def prune(root: Path, keep_last: int) -> None:
    for old in complete(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def listing(root: Path) -> list[dict]:
    """What the control plane shows: step, path, time and size of each finished checkpoint."""
    out = []
    for p in complete(root):
        state = read_state(p)
        size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        out.append({"step": state["step"], "path": str(p), "created_at": state["time"], "bytes": size})
    return out
