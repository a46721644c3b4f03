"""Weight sync through one shared-memory file, for a trainer and rollout engines on the same node.

The rollout moves its parameters into a file under /dev/shm (each parameter becomes a view of
its region) and reports where each of the trainer's tensors lies in that file. The trainer maps
the same file once; a sync is then one copy per tensor, straight into the memory the engine's
kernels read, with no serialisation, no object store and no second copy on the engine's side.
Every rollout replica on the node maps the same file, so a sync costs one copy however many
engines there are.

Its first bytes count the writes: an engine that finds the count moved since its last generation
drops what it cached from the old weights (vLLM's prefix cache), so a sync needs no call to it.
The file is unlinked as soon as the trainer has mapped it: the mappings keep the memory alive,
and nothing is left in /dev/shm when the job ends or is killed.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from typing import Iterable

import torch

ALIGN = 64  # bytes: every region starts aligned for any dtype and for vector loads
HEADER = 64  # bytes before the first region; starts with the int64 count of writes (the weights' version)


@dataclass(frozen=True)
class Region:
    """Where one tensor lives in the shared file: a byte offset, its dtype name and shape (contiguous)."""

    offset: int
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * getattr(torch, self.dtype).itemsize

    def rows(self, start: int, stop: int) -> "Region":
        """The sub-region of rows [start, stop) along dim 0 (contiguous, so a region again)."""
        row = self.nbytes // self.shape[0] if self.shape[0] else 0
        return Region(self.offset + start * row, self.dtype, (stop - start, *self.shape[1:]))


class NoRoomForWeights(RuntimeError):
    """The shared-memory filesystem has no room for the weights."""


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def view(flat: torch.Tensor, region: Region) -> torch.Tensor:
    return flat[region.offset : region.offset + region.nbytes].view(getattr(torch, region.dtype)).view(region.shape)


def layout(tensors: Iterable[tuple[str, torch.Tensor]]) -> tuple[int, dict[str, Region]]:
    """Regions, back to back and aligned, for (name, tensor) pairs; returns (file size, regions)."""
    regions, used = {}, HEADER
    for name, t in tensors:
        start = -(-used // ALIGN) * ALIGN
        regions[name] = Region(start, str(t.dtype).removeprefix("torch."), tuple(t.shape))
        used = start + regions[name].nbytes
    return used, regions


def map_file(path: str, size: int) -> torch.Tensor:
    """The file as a flat uint8 tensor, mapped shared (writes are seen by every process that maps it)."""
    return torch.from_file(path, shared=True, size=size, dtype=torch.uint8)


def version(flat: torch.Tensor) -> torch.Tensor:
    """The file's write counter, as a one-element int64 view: a reader that saw another value has stale caches."""
    return flat[:8].view(torch.int64)


def share_parameters(params: list[tuple[str, torch.nn.Parameter]], path: str, create: bool) -> tuple[int, dict[str, Region]]:
    """Rebind each parameter's storage to a region of the shared file at `path`.

    create=True lays the file out and copies the parameters in; create=False maps a file that a
    replica with the same parameters created (its layout must be the same) and points this
    process's parameters at it, with no copy. Returns (file size, regions by parameter name).
    """
    size, regions = layout((n, p.data) for n, p in params)
    free = shutil.disk_usage(os.path.dirname(path) or ".").free
    if create and free < size:
        # A tmpfs that is too small (Docker gives /dev/shm 64 MiB by default) would SIGBUS on the first write past its end.
        raise NoRoomForWeights(f"{os.path.dirname(path)} has {free / 2**20:.0f} MiB free, the weights need {size / 2**20:.0f} MiB")
    if not create and os.path.getsize(path) != size:
        raise RuntimeError(f"shared weights file {path} has {os.path.getsize(path)} bytes, expected {size}: different models?")
    flat = map_file(path, size)
    with torch.no_grad():
        for name, p in params:
            if not p.data.is_contiguous() or p.device.type != "cpu":
                raise RuntimeError(f"parameter {name} is not a contiguous CPU tensor")
            target = view(flat, regions[name])
            if create:
                target.copy_(p.data)
            p.data = target
    return size, regions


class SharedWeightWriter:
    """The trainer's end: copies its state dict into the regions of the rollouts' shared file."""

    def __init__(self, path: str, size: int, regions: dict[str, Region], state_dict: dict[str, torch.Tensor]):
        missing = sorted(set(state_dict) - set(regions))
        if missing:
            raise RuntimeError(f"the rollout's shared weights lack {missing[:5]}")
        self.flat = map_file(path, size)
        self.pairs: list[tuple[str, torch.Tensor]] = []
        written = set()
        for name, t in state_dict.items():
            r = regions[name]
            if (r.dtype, r.shape) != (str(t.dtype).removeprefix("torch."), tuple(t.shape)):
                raise RuntimeError(f"{name}: trainer has {t.dtype} {tuple(t.shape)}, rollout {r.dtype} {r.shape}")
            if r.offset in written:  # tied weights (embeddings and LM head) are written once
                continue
            written.add(r.offset)
            self.pairs.append((name, view(self.flat, r)))

    @torch.no_grad()
    def write(self, state_dict: dict[str, torch.Tensor]) -> float:
        """Copy every tensor in, then count the write; returns the seconds spent."""
        start = time.perf_counter()
        for name, dst in self.pairs:
            dst.copy_(state_dict[name])
        version(self.flat).add_(1)
        return time.perf_counter() - start
