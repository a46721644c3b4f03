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
in the rollout backends (workers/rollout.py: `RolloutBackend`). Every call on them is waited for with
the driver's timed wait (`Orchestrator.wait`): a sync that hangs fails the job as a `weight_sync` timeout.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import ray

from orchestrator.core.plan import WeightSyncPlan, sync_path

if TYPE_CHECKING:
    from orchestrator.core.spec import JobSpec
    from orchestrator.runtime.placement import ActorGroup

# (refs, phase) -> their results, or a PhaseTimeout naming the phase (orchestrator/runtime/waits.py)
Wait = Callable[[Any, str], Any]
SYNC, SETUP = "weight_sync", "weight_sync setup"


def choose(spec: JobSpec) -> tuple[str, str]:
    """(method, reason): the path `rollout.weight_sync` names, or the one `auto` picks from the placement.

    The spec has already refused impossible explicit choices. The rule is the plan's (core/plan.py `sync_path`).
    """
    return sync_path(spec)


class WeightSync:
    """One path from trainer rank 0's weights to every rollout actor."""

    method: str
    # The trainer writes the weights as the last act of its update call: a step makes no sync call.
    in_update = False

    def __init__(self, trainers: ActorGroup, rollouts: ActorGroup, reason: str, wait: Wait):
        self.trainers, self.rollouts, self.reason, self.wait = trainers, rollouts, reason, wait

    def prepare(self, spec: JobSpec, tag: str) -> str | None:
        """Get the path ready, once, before the first sync; returns why it cannot be used, if not."""
        return None

    def sync(self) -> None:
        raise NotImplementedError


class ObjectStoreSync(WeightSync):
    method = "object_store"

    def sync(self) -> None:
        self.load(self.publish())

    def publish(self):
        """Trainer rank 0's weights, put in the object store now (the ref; the trainer is free again once it is ready)."""
        return self.trainers.actors[0].weights_for_sync.remote()

    def load(self, weights) -> None:
        """Every rollout loads the weights `publish` put (asynchronous training loads them between two chunks)."""
        self.wait(self.rollouts.call("load_weights", weights), SYNC)


class SharedMemorySync(WeightSync):
    method = "shared_memory"
    in_update = True

    def prepare(self, spec: JobSpec, tag: str) -> str | None:
        return share_memory(self.trainers.actors[0], self.rollouts.actors, tag, self.wait)

    def sync(self) -> None:
        # The engines see the file's write count move and drop their prefix caches at the next generate.
        self.wait(self.trainers.actors[0].write_shared_weights.remote(), SYNC)


class NcclSync(WeightSync):
    method = "nccl"

    def prepare(self, spec: JobSpec, tag: str) -> str | None:
        trainer, rollouts = self.trainers.actors[0], self.rollouts
        host, port = self.wait(trainer.address.remote(), SETUP)
        tp = spec.rollout.tensor_parallel_size
        world = 1 + tp * len(rollouts)
        self.wait([trainer.init_weight_sender.remote(host, port, world),
                   *rollouts.call_each("init_weight_group", [(host, port, 1 + i * tp, world) for i in range(len(rollouts))])], SETUP)
        self.buckets = self.wait(trainer.weight_buckets.remote(), SETUP)
        return None

    def sync(self) -> None:
        self.wait([self.trainers.actors[0].send_weights_nccl.remote(), *self.rollouts.call("receive_weights_nccl", self.buckets)], SYNC)


class CudaIpcSync(WeightSync):
    method = "cuda_ipc"

    def sync(self) -> None:
        # Rollout i shares a GPU with trainer rank i, whose weights equal rank 0's after every update.
        handles = self.wait(self.trainers.call("ipc_weights"), SYNC)
        self.wait(self.rollouts.call_each("receive_weights_ipc", handles), SYNC)
        self.wait(self.trainers.call("release_ipc_weights"), SYNC)


PATHS: dict[str, type[WeightSync]] = {cls.method: cls for cls in (ObjectStoreSync, SharedMemorySync, NcclSync, CudaIpcSync)}


def setup(spec: JobSpec, trainers: ActorGroup, rollouts: ActorGroup, tag: str, wait: Wait,
          planned: WeightSyncPlan | None = None) -> WeightSync:
    """The path the stage's plan names (`planned`; None: the one `choose` picks), prepared, its calls waited
    for with `wait`. One that cannot be prepared falls back to the object store, with the reason why; one
    the spec names explicitly raises instead."""
    method, reason = (planned.method, planned.reason) if planned is not None else choose(spec)
    path = PATHS[method](trainers, rollouts, reason, wait)
    failed = path.prepare(spec, tag)
    if failed is None:
        return path
    if spec.rollout.weight_sync == method:
        raise RuntimeError(f"rollout.weight_sync: {method} is not possible: {failed}")
    return ObjectStoreSync(trainers, rollouts, failed, wait)


def share_memory(trainer, rollouts: list, tag: str, wait: Wait) -> str | None:
    """Make every rollout actor compute from one /dev/shm file that the trainer actor writes
    (workers/weight_transport.py); returns why not, if not."""
    if len(set(wait([a.node_id.remote() for a in [trainer, *rollouts]], SETUP))) > 1:
        return "the trainer and the rollouts are on different nodes"
    path = f"/dev/shm/rlhf-weights-{tag.replace('/', '-')}-{uuid.uuid4().hex[:8]}"
    try:
        first = wait(rollouts[0].share_weights.remote(path, True), SETUP)
        if isinstance(first, str):
            return first
        size, regions = first
        for other in wait([a.share_weights.remote(path, False) for a in rollouts[1:]], SETUP):
            if isinstance(other, str):
                raise RuntimeError(f"rollout replicas disagree on shared weights: {other}")
        try:
            wait(trainer.attach_shared_weights.remote(path, size, regions), SETUP)  # maps the file, then unlinks it
        except ray.exceptions.RayTaskError as e:  # e.g. a model whose HF names vLLM fuses differently
            return f"the trainer's tensors do not map onto the engine's: {getattr(e, 'cause', e)}"
    finally:
        wait(trainer.unlink.remote(path), SETUP)
    return None
