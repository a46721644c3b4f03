"""How weights travel from the trainer to the rollouts: every transport, on both ends.

- Object store: a state dict as numpy arrays (`to_transport` / `from_transport`), which Ray moves
  without pickling their bytes.
- Shared memory (CPU, one node): the rollouts compute from one /dev/shm file that the trainer
  copies its tensors into (`share_parameters`, `SharedWeightWriter`).
- Buckets: tensors packed back to back into flat uint8 buffers (`plan_buckets`, `pack_bucket`,
  `unpack_bucket`), the unit of the NCCL broadcast, of a CUDA IPC buffer and of vLLM's
  worker-process path.
- GPU: trainer rank 0's end of the NCCL group (`NcclWeightSender`) and a colocated trainer's CUDA
  IPC buffer (`cuda_ipc_payload`).
- `WeightSource`: the trainer actor's weight-sync methods, mixed into `PolicyTrainer`.

vLLM is imported only inside the GPU pieces, so this module loads without it. What runs inside
vLLM's worker (`WeightSyncExtension`) lives in workers/rollout_vllm.py.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

DEFAULT_BUCKET_BYTES = 256 << 20


# ---------------------------------------------------------------- the actors' shared surface


class OnNode:
    """What the driver asks of every actor in a node-local sync: where it runs, and to remove a file there."""

    def node_id(self) -> str | None:
        """This process's Ray node id; None outside Ray."""
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None

    def unlink(self, path: str) -> None:
        if os.path.exists(path):
            os.unlink(path)


# ---------------------------------------------------------------- object store


def to_transport(state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A state dict as numpy arrays, which Ray's object store moves without pickling their bytes:
    one copy into shared memory here, zero-copy views on the receiving side. Tied tensors
    (embeddings and LM head) travel once; bfloat16 travels as int16 bits."""
    arrays, seen = {}, {}
    for name, t in state_dict.items():
        t = t.detach()
        key = (t.data_ptr(), t.dtype, tuple(t.shape))
        if key in seen:
            arrays[name] = ("alias", seen[key])
            continue
        seen[key] = name
        t = t.cpu().contiguous()
        arrays[name] = (str(t.dtype).removeprefix("torch."), t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy())
    return arrays


def from_transport(arrays: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Inverse of to_transport; a plain state dict of tensors passes through unchanged."""
    import warnings

    out: dict[str, torch.Tensor] = {}
    for name, value in arrays.items():
        if isinstance(value, torch.Tensor):
            out[name] = value
        elif value[0] != "alias":
            dtype, array = value
            with warnings.catch_warnings():
                # The object store's arrays are read-only views; load_state_dict only reads them.
                warnings.simplefilter("ignore", UserWarning)
                t = torch.frombuffer(memoryview(array).cast("B"), dtype=torch.uint8) if array.size else torch.empty(0, dtype=torch.uint8)
            target = getattr(torch, dtype)
            out[name] = (t.view(torch.int16).view(torch.bfloat16) if target == torch.bfloat16 else t.view(target)).view(array.shape)
    for name, value in arrays.items():
        if not isinstance(value, torch.Tensor) and value[0] == "alias":
            out[name] = out[value[1]]
    return out


# ---------------------------------------------------------------- shared memory
#
# The rollout moves its parameters into a file under /dev/shm (each parameter becomes a view of
# its region) and reports where each of the trainer's tensors lies in that file. The trainer maps
# the same file once; a sync is then one copy per tensor, straight into the memory the engine's
# kernels read, with no serialisation, no object store and no second copy on the engine's side.
# Every rollout replica on the node maps the same file, so a sync costs one copy however many
# engines there are.
#
# Its first bytes count the writes: an engine that finds the count moved since its last generation
# drops what it cached from the old weights (vLLM's prefix cache), so a sync needs no call to it.
# The file is unlinked as soon as the trainer has mapped it: the mappings keep the memory alive,
# and nothing is left in /dev/shm when the job ends or is killed.

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

    def rows(self, start: int, stop: int) -> Region:
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
    def write_items(self, items) -> float:
        """Copy (name, tensor) pairs in as they come (a sharded trainer gathers one tensor at a time),
        then count the write; returns the seconds spent."""
        start = time.perf_counter()
        targets = dict(self.pairs)
        for name, tensor in items:
            if name in targets:
                targets[name].copy_(tensor)
        version(self.flat).add_(1)
        return time.perf_counter() - start

    @torch.no_grad()
    def write(self, state_dict: dict[str, torch.Tensor]) -> float:
        """Copy every tensor in, then count the write; returns the seconds spent."""
        start = time.perf_counter()
        for name, dst in self.pairs:
            dst.copy_(state_dict[name])
        version(self.flat).add_(1)
        return time.perf_counter() - start


# ---------------------------------------------------------------- buckets


@dataclass(frozen=True)
class TensorMeta:
    name: str
    dtype: str  # torch dtype name, e.g. "float32"
    shape: tuple[int, ...]
    offset: int  # bytes into the bucket
    nbytes: int


def plan_buckets(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> list[list[TensorMeta]]:
    """Group tensors, in order, into buckets of at most `bucket_bytes` (a bigger tensor gets its own).

    Offsets are 64-byte aligned so every view of a bucket is aligned for any dtype.
    """
    buckets: list[list[TensorMeta]] = [[]]
    used = 0
    for name, t in named:
        nbytes = t.numel() * t.element_size()
        start = -(-used // 64) * 64
        if buckets[-1] and start + nbytes > bucket_bytes:
            buckets.append([])
            start = 0
        buckets[-1].append(TensorMeta(name, str(t.dtype).removeprefix("torch."), tuple(t.shape), start, nbytes))
        used = start + nbytes
    return [b for b in buckets if b]


def bucket_size(metas: list[TensorMeta]) -> int:
    return metas[-1].offset + metas[-1].nbytes if metas else 0


def pack_bucket(metas: list[TensorMeta], tensors: dict[str, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """Copy the bucket's tensors into the flat uint8 tensor `out` (at least `bucket_size` bytes)."""
    for m in metas:
        out[m.offset : m.offset + m.nbytes].copy_(tensors[m.name].detach().contiguous().view(-1).view(torch.uint8))
    return out


def unpack_bucket(flat: torch.Tensor, metas: list[TensorMeta]) -> list[tuple[str, torch.Tensor]]:
    """Views (no copy) of each tensor in a flat uint8 bucket."""
    return [(m.name, flat[m.offset : m.offset + m.nbytes].view(getattr(torch, m.dtype)).view(m.shape)) for m in metas]


# ---------------------------------------------------------------- GPU: NCCL and CUDA IPC


class NcclWeightSender:
    """Trainer rank 0's end of the NCCL weight-sync group (GPU only).

    Per sync, the driver submits `VLLMRollout.receive_weights_nccl(buckets)` on every engine and
    `send(model)` on rank 0 together; both sides meet inside the same broadcasts.
    """

    def __init__(self, host: str, port: int, world_size: int, device: torch.device):
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        pg = StatelessProcessGroup.create(host=host, port=port, rank=0, world_size=world_size)
        self.comm, self.device = PyNcclCommunicator(pg, device=device), device

    @staticmethod
    def plan(state: dict[str, torch.Tensor], bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> list[list[TensorMeta]]:
        return plan_buckets(state.items(), bucket_bytes)

    @torch.no_grad()
    def send(self, state: dict[str, torch.Tensor], buckets: list[list[TensorMeta]]) -> None:
        stream = torch.cuda.current_stream()
        for metas in buckets:
            flat = torch.empty(bucket_size(metas), dtype=torch.uint8, device=self.device)
            self.comm.broadcast(pack_bucket(metas, state, flat), src=0, stream=stream)
        torch.cuda.synchronize()


def cuda_ipc_payload(state: dict[str, torch.Tensor], bucket_bytes: int = 1 << 62) -> tuple[dict[str, Any], list[list[TensorMeta]], torch.Tensor]:
    """A colocated trainer's weights as one GPU buffer shared by CUDA IPC.

    Returns (handles keyed by GPU uuid, bucket layout, the buffer); keep the buffer alive until
    the engine's `receive_weights_ipc` returns.
    """
    from torch.multiprocessing.reductions import reduce_tensor

    buckets = plan_buckets(state.items(), bucket_bytes)
    total = sum(bucket_size(b) for b in buckets)
    flat = torch.empty(total, dtype=torch.uint8, device=next(iter(state.values())).device)
    base = 0
    for metas in buckets:
        pack_bucket(metas, state, flat[base : base + bucket_size(metas)])
        base += bucket_size(metas)
    torch.cuda.synchronize()
    uuid_ = str(torch.cuda.get_device_properties(flat.device).uuid)
    return {uuid_: reduce_tensor(flat)}, buckets, flat


# ---------------------------------------------------------------- the trainer's end


class WeightSource(OnNode):
    """The trainer actor's half of every sync path; the class it is mixed into sets `self.model` and `self.device`."""

    model: torch.nn.Module
    device: torch.device
    _shared: SharedWeightWriter | None = None  # rank 0, with shared-memory weight sync

    def rollout_weights(self) -> dict[str, torch.Tensor]:
        """The weights the rollouts get, by their HF names: the model's own (a LoRA trainer gives its
        adapters merged into the base, workers/lora.py)."""
        return self.model.state_dict()

    def weights_for_sync(self) -> dict[str, Any]:
        """Object store: the weights in its zero-copy form (see `to_transport`)."""
        return to_transport(self.rollout_weights())

    def attach_shared_weights(self, path: str, size: int, regions: dict[str, Region]) -> None:
        """Map the rollouts' shared weights file (CPU, same node), then unlink it: every process has it mapped."""
        try:
            self._shared = SharedWeightWriter(path, size, regions, self.rollout_weights())
        finally:
            self.unlink(path)
        if getattr(self, "sharded", False):
            self._full = None  # from now on each update streams its gathered tensors into the file

    def write_shared_weights(self) -> float:
        """One sync: copy the weights into the memory the rollouts compute from; returns the seconds spent."""
        seconds = self._shared.write(self.rollout_weights())
        if getattr(self, "sharded", False):
            self._full = None  # (gathered after a load; updates stream theirs)
        return seconds

    def init_weight_sender(self, host: str, port: int, world_size: int) -> None:
        """GPU, vLLM: open the NCCL group with every engine worker (this is rank 0)."""
        self._sender = NcclWeightSender(host, port, world_size, self.device)
        self._buckets = NcclWeightSender.plan(self.rollout_weights())

    def weight_buckets(self) -> list[list[TensorMeta]]:
        return self._buckets

    def send_weights_nccl(self) -> None:
        self._sender.send(self.rollout_weights(), self._buckets)

    def ipc_weights(self) -> tuple[dict[str, Any], list[list[TensorMeta]]]:
        """GPU, colocated vLLM: the weights as one CUDA buffer shared by IPC, kept until `release_ipc_weights`."""
        handles, buckets, self._ipc_buffer = cuda_ipc_payload(self.rollout_weights())
        return handles, buckets

    def release_ipc_weights(self) -> None:
        self._ipc_buffer = None
