"""Checkpoint layout: `<dir>/step_000012/` holds `policy/` (HF layout, loadable by any stage),
`policy_optim.pt`, `critic.pt` (PPO) and `state.json`, written last, which marks it complete; an
`rm` stage's checkpoints hold `reward_model/` (a sequence classifier with its tokenizer) instead of `policy/`.
A sharded role (fsdp) writes `policy_dcp/` or `critic_dcp/` (torch.distributed.checkpoint: every
replica's shards of the model and optimizer) and `<name>_rng_<rank>.pt` instead of the `.pt` files;
LoRA adds `policy_adapter/`.

The root may be a URL (`s3://...`, see core/storage.py): the same layout, written through fsspec.

Data position and sampling RNG need no saving beyond the step: both are functions of
(seed, step) (see PromptSampler and HFRollout.generate).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from orchestrator.core import storage
from orchestrator.core.spec import JobSpec


def step_dir(root: str | Path, step: int) -> Path | str:
    """The checkpoint directory of a step: a Path under a local root, a URL string under a URL."""
    name = f"step_{step:06d}"
    return storage.join(root, name) if storage.is_url(root) else Path(root) / name


def finish(path: str | Path, step: int, spec: JobSpec) -> None:
    """Mark the checkpoint complete (`policy/` must already hold the model and its tokenizer)."""
    state = {"step": step, "time": time.time(), "seed": spec.optim.seed, "spec": spec.model_dump(mode="json")}
    if storage.is_url(path):  # one object, written whole or not at all
        fs, remote = storage.filesystem(storage.join(path, "state.json"))
        fs.pipe_file(remote, json.dumps(state, indent=1).encode())
        return
    tmp = Path(path) / "state.json.tmp"
    tmp.write_text(json.dumps(state, indent=1))
    tmp.rename(Path(path) / "state.json")


def read_state(path: str | Path) -> dict:
    if storage.is_url(path):
        fs, remote = storage.filesystem(storage.join(path, "state.json"))
        return json.loads(fs.cat_file(remote))
    return json.loads((Path(path) / "state.json").read_text())


def complete(root: str | Path) -> list:
    """Finished checkpoints, oldest first (a directory without state.json was interrupted mid-save)."""
    if storage.is_url(root):
        fs, remote = storage.filesystem(root)
        done = {p.rsplit("/", 2)[-2] for p in fs.glob(remote.rstrip("/") + "/step_*/state.json")}
        return [storage.join(root, name) for name in sorted(done)]
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / "state.json").exists())


def incomplete(root: str | Path) -> list:
    """Checkpoint directories without state.json: saves that were interrupted."""
    if storage.is_url(root):
        fs, remote = storage.filesystem(root)
        names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.glob(remote.rstrip("/") + "/step_*")}
        return [storage.join(root, n) for n in sorted(names) if storage.join(root, n) not in complete(root)]
    root = Path(root)
    return sorted(p for p in root.glob("step_*") if p.is_dir() and not (p / "state.json").exists()) if root.is_dir() else []


def latest(root: str | Path) -> Path | str | None:
    found = complete(root)
    return found[-1] if found else None


PINNED = "pinned"  # a file in a checkpoint that pruning must leave alone


def _has(path: str | Path, name: str) -> bool:
    if storage.is_url(path):
        fs, remote = storage.filesystem(storage.join(path, name))
        return fs.exists(remote)
    return (Path(path) / name).exists()


def pin(path: str | Path, reason: str) -> None:
    """Keep a finished checkpoint whatever `keep_last` says: a pipeline's later stages (or their resume)
    start from an earlier stage's final policy or score with its reward model."""
    if _has(path, "state.json") and not _has(path, PINNED):
        if storage.is_url(path):
            fs, remote = storage.filesystem(storage.join(path, PINNED))
            fs.pipe_file(remote, (reason + "\n").encode())
        else:
            (Path(path) / PINNED).write_text(reason + "\n")


def prune(root: str | Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` finished checkpoints, except pinned ones."""
    for old in complete(root)[:-keep_last]:
        if _has(old, PINNED):
            continue
        if storage.is_url(old):
            fs, remote = storage.filesystem(old)
            fs.rm(remote, recursive=True)
        else:
            shutil.rmtree(old, ignore_errors=True)


def listing(root: str | Path) -> list[dict]:
    """What the control plane shows: step, path, time and size of each finished checkpoint."""
    out = []
    for p in complete(root):
        state = read_state(p)
        if storage.is_url(p):
            fs, remote = storage.filesystem(p)
            size = int(fs.du(remote))
        else:
            # Regular files only: a link's target is no part of the checkpoint (its download leaves links out).
            size = sum(f.lstat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())
        out.append({"step": state["step"], "path": str(p), "created_at": state["time"], "bytes": size})
    return out
