"""How the trainer's weights reach the rollout actors after each update: one class per path, the
rule that picks a path from the spec (`choose`), and `setup`, which prepares it.

- `nccl` (vLLM engines on their own GPUs): rank 0 broadcasts buckets to every engine worker.
- `cuda_ipc` (each vLLM engine shares its GPU with a trainer rank): rank i lends engine i one
  buffer of its weights by CUDA IPC.
- `shared_memory` (trainer and rollouts on one node's CPU): the engines compute from one /dev/shm
  file; rank 0 copies its weights in as the last act of its update call.
- `object_store` (anything else, and where shared memory cannot be set up): rank 0 puts its
  weights in Ray's object store and every rollout loads them.

The actors' ends live in workers/weight_transport.py (`WeightSource`, mixed into the trainer) and
in the rollout backends (workers/rollout.py: `RolloutBackend`).
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

import ray

if TYPE_CHECKING:
    from orchestrator.core.spec import JobSpec
    from orchestrator.placement import ActorGroup


def choose(spec: JobSpec) -> tuple[str, str]:
    """(method, reason): the path `rollout.weight_sync` names, or the one `auto` picks from the placement.

    The spec has already refused impossible explicit choices.
    """
    res, vllm = spec.resources, spec.rollout.backend == "vllm"
    if spec.rollout.weight_sync != "auto":
        return spec.rollout.weight_sync, "set in the spec"
    on_gpu = res.trainer.num_gpus > 0 and res.rollout.num_gpus > 0
    if on_gpu and vllm and not res.colocate:
        return "nccl", "vLLM engines on their own GPUs"
    if on_gpu and vllm and res.trainer.replicas == res.rollout.replicas:
        return "cuda_ipc", "each vLLM engine shares its GPU with a trainer rank"
    if res.trainer.num_gpus == 0 and res.rollout.num_gpus == 0:
        return "shared_memory", "trainer and rollouts on the CPU"
    return "object_store", "the rollouts are not vLLM engines on GPUs"


class WeightSync:
    """One path from trainer rank 0's weights to every rollout actor."""

    method: str
    # The trainer writes the weights as the last act of its update call: a step makes no sync call.
    in_update = False

    def __init__(self, trainers: ActorGroup, rollouts: ActorGroup, reason: str):
        self.trainers, self.rollouts, self.reason = trainers, rollouts, reason

    def prepare(self, spec: JobSpec, tag: str) -> str | None:
        """Get the path ready, once, before the first sync; returns why it cannot be used, if not."""
        return None

    def sync(self) -> None:
        raise NotImplementedError


class ObjectStoreSync(WeightSync):
    method = "object_store"

    def sync(self) -> None:
        weights = self.trainers.actors[0].weights_for_sync.remote()
        ray.get(self.rollouts.call("load_weights", weights))


class SharedMemorySync(WeightSync):
    method = "shared_memory"
    in_update = True

    def prepare(self, spec: JobSpec, tag: str) -> str | None:
        return share_memory(self.trainers.actors[0], self.rollouts.actors, tag)

    def sync(self) -> None:
        # The engines see the file's write count move and drop their prefix caches at the next generate.
        ray.get(self.trainers.actors[0].write_shared_weights.remote())


class NcclSync(WeightSync):
    method = "nccl"

    def prepare(self, spec: JobSpec, tag: str) -> str | None:
        trainer, rollouts = self.trainers.actors[0], self.rollouts
        host, port = ray.get(trainer.address.remote())
        tp = spec.rollout.tensor_parallel_size
        world = 1 + tp * len(rollouts)
        ray.get([trainer.init_weight_sender.remote(host, port, world),
                 *rollouts.call_each("init_weight_group", [(host, port, 1 + i * tp, world) for i in range(len(rollouts))])])
        self.buckets = ray.get(trainer.weight_buckets.remote())
        return None

    def sync(self) -> None:
        ray.get([self.trainers.actors[0].send_weights_nccl.remote(), *self.rollouts.call("receive_weights_nccl", self.buckets)])


class CudaIpcSync(WeightSync):
    method = "cuda_ipc"

    def sync(self) -> None:
        # Rollout i shares a GPU with trainer rank i, whose weights equal rank 0's after every update.
        ray.get(self.rollouts.call_each("receive_weights_ipc", ray.get(self.trainers.call("ipc_weights"))))
        ray.get(self.trainers.call("release_ipc_weights"))


PATHS: dict[str, type[WeightSync]] = {cls.method: cls for cls in (ObjectStoreSync, SharedMemorySync, NcclSync, CudaIpcSync)}


def setup(spec: JobSpec, trainers: ActorGroup, rollouts: ActorGroup, tag: str) -> WeightSync:
    """The path `choose` picks, prepared. One that cannot be prepared falls back to the object store,
    with the reason why; one the spec names explicitly raises instead."""
    method, reason = choose(spec)
    path = PATHS[method](trainers, rollouts, reason)
    failed = path.prepare(spec, tag)
    if failed is None:
        return path
    if spec.rollout.weight_sync == method:
        raise RuntimeError(f"rollout.weight_sync: {method} is not possible: {failed}")
    return ObjectStoreSync(trainers, rollouts, failed)


def share_memory(trainer, rollouts: list, tag: str) -> str | None:
    """Make every rollout actor compute from one /dev/shm file that the trainer actor writes
    (workers/weight_transport.py); returns why not, if not."""
    if len(set(ray.get([a.node_id.remote() for a in [trainer, *rollouts]]))) > 1:
        return "the trainer and the rollouts are on different nodes"
    path = f"/dev/shm/rlhf-weights-{tag.replace('/', '-')}-{uuid.uuid4().hex[:8]}"
    try:
        first = ray.get(rollouts[0].share_weights.remote(path, True))
        if isinstance(first, str):
            return first
        size, regions = first
        for other in ray.get([a.share_weights.remote(path, False) for a in rollouts[1:]]):
            if isinstance(other, str):
                raise RuntimeError(f"rollout replicas disagree on shared weights: {other}")
        try:
            ray.get(trainer.attach_shared_weights.remote(path, size, regions))  # maps the file, then unlinks it
        except ray.exceptions.RayTaskError as e:  # e.g. a model whose HF names vLLM fuses differently
            return f"the trainer's tensors do not map onto the engine's: {getattr(e, 'cause', e)}"
    finally:
        ray.get(trainer.unlink.remote(path))
    return None
