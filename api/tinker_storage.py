"""What a tenant saves through the Tinker API, on disk: listing, the per-tenant quota, eviction, deletion.

Checkpoints live at `<tenant_root>/tinker/<model_id>/<kind>/<name>/state.pt` (kind: `weights` from save_state,
`sampler_weights` from save_weights_for_sampler). The disk is the only account: a save is measured by scanning the
tenant's checkpoints (at most the count limit of them), so a deletion frees quota at once and nothing can drift.

Sampler weights saved without a name (save_weights_and_get_sampling_client, which an RL loop calls every step) carry
an `unnamed` marker file: past the quota they are evicted, oldest first. Named checkpoints are the tenant's to delete.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from dataclasses import dataclass

from redis.exceptions import LockError

log = logging.getLogger("api.tinker")

KINDS = {"weights": "training", "sampler_weights": "sampler"}
UNNAMED = "unnamed"


@dataclass(frozen=True)
class Saved:
    model_id: str
    kind: str
    name: str
    directory: str
    bytes: int
    mtime: float
    unnamed: bool

    @property
    def tinker_path(self) -> str:
        return f"tinker://{self.model_id}/{self.kind}/{self.name}"


def saved(tinker_root: str, model_id: str | None = None) -> list[Saved]:
    """The checkpoints under a tenant's `<tenant_root>/tinker` (of one run, given `model_id`), oldest first."""
    found = []
    runs = [model_id] if model_id else _names(tinker_root)
    for run in runs:
        for kind in KINDS:
            kind_dir = f"{tinker_root}/{run}/{kind}"
            for name in _names(kind_dir):
                directory = f"{kind_dir}/{name}"
                try:
                    mtime = os.stat(f"{directory}/state.pt").st_mtime
                    files = list(os.scandir(directory))
                except OSError:  # not a checkpoint (yet): a save in progress, or removed meanwhile
                    continue
                size = sum(f.stat().st_size for f in files if f.is_file())
                unnamed = any(f.name == UNNAMED for f in files)
                found.append(Saved(run, kind, name, directory, size, mtime, unnamed))
    return sorted(found, key=lambda s: s.mtime)


def _names(directory: str) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(directory) if e.is_dir())
    except OSError:
        return []


def mark_unnamed(directory: str) -> None:
    open(f"{directory}/{UNNAMED}", "wb").close()


def remove(tinker_root: str, directory: str) -> None:
    """Remove a checkpoint's directory, and its run's directories left empty (never `tinker_root` itself)."""
    shutil.rmtree(directory, ignore_errors=True)
    parent = os.path.dirname(directory)
    for _ in range(2):  # <model_id>/<kind>, then <model_id>
        if os.path.abspath(parent) == os.path.abspath(tinker_root):
            break
        try:
            os.rmdir(parent)
        except OSError:
            break
        parent = os.path.dirname(parent)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def make_room(tinker_root: str, max_count: int, max_bytes: int, replacing: str = "") -> tuple[list[Saved], str | None]:
    """Before a save (into `replacing`, which it overwrites if it exists): evict the oldest unnamed sampler weights while
    the tenant is at or past a limit. Returns what was evicted, and the refusal (naming the limit and how to free space)
    if named checkpoints alone hold the quota."""
    present = [s for s in saved(tinker_root) if s.directory != replacing]
    evicted = []
    count, total = len(present), sum(s.bytes for s in present)
    for victim in [s for s in present if s.unnamed]:
        if count < max_count and total < max_bytes:
            break
        remove(tinker_root, victim.directory)
        evicted.append(victim)
        count, total = count - 1, total - victim.bytes
    if count < max_count and total < max_bytes:
        return evicted, None
    which = (f"{count} checkpoints, the limit (RLHF_API_TINKER_MAX_CHECKPOINTS_PER_TENANT = {max_count})" if count >= max_count
             else f"{_size(total)} of checkpoints, the limit (RLHF_API_TINKER_MAX_CHECKPOINT_BYTES_PER_TENANT = {_size(max_bytes)})")
    return evicted, (f"checkpoint quota: you have {which}; delete some you no longer need (RestClient.delete_checkpoint_from_tinker_path"
                     "(path), or `tinker checkpoint delete`; RestClient.list_checkpoints(run) lists a run's) and save again")


class TenantLocks:
    """One lock per tenant, in Redis (`tinker:lock:checkpoints:<tenant>`): a save's quota check and write, and a deletion,
    of one tenant run one at a time over every API process behind that Redis, so that concurrent saves cannot all pass
    the check before any of them is written. A lock its process did not release (it died) expires after HOLD_S, longer
    than a save may take (its pool call's own deadline is 10 minutes)."""

    HOLD_S = 1800.0

    def __init__(self, redis):
        self.redis = redis

    @contextlib.asynccontextmanager
    async def __call__(self, tenant: str):
        lock = self.redis.lock(f"tinker:lock:checkpoints:{tenant}", timeout=self.HOLD_S, sleep=0.05, blocking_timeout=self.HOLD_S)
        if not await lock.acquire():
            raise LockError(f"tenant {tenant}'s checkpoint lock stayed held for {self.HOLD_S:g} s: another save or deletion of "
                            "its checkpoints did not end")
        try:
            yield
        finally:
            try:
                await lock.release()
            except LockError as err:  # it expired (a save longer than HOLD_S): what ran under it stands
                log.warning("the checkpoint lock of tenant %s was lost before its release: %r", tenant, err)
