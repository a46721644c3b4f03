"""Which weight-sync path a job takes, and what it falls back to: the rules alone, without Ray."""

from pathlib import Path
from types import SimpleNamespace

import pytest

from orchestrator.runtime import weight_sync
from orchestrator.core.spec import parse_spec
from tests.conftest import tiny_spec

GPUS = {"trainer": {"num_gpus": 1}, "rollout": {"num_gpus": 1}}


def spec(rollout=None, resources=None):
    return parse_spec(tiny_spec(Path("m"), Path("d.jsonl"), Path("runs/t"), rollout={"n": 4, **(rollout or {})}, resources=resources or {}))


@pytest.mark.parametrize(("rollout", "resources", "chosen"), [
    ({}, {}, ("shared_memory", "trainer and rollouts on the CPU")),
    ({"backend": "vllm"}, {}, ("shared_memory", "trainer and rollouts on the CPU")),
    ({"backend": "vllm"}, GPUS, ("nccl", "vLLM engines on their own GPUs")),
    ({"backend": "vllm"}, {**GPUS, "colocate": True}, ("cuda_ipc", "each vLLM engine shares its GPU with a trainer rank")),
    # Colocated, but two trainer ranks on one engine: no engine has a rank of its own to lend it a buffer.
    ({"backend": "vllm"}, {"trainer": {"num_gpus": 1, "replicas": 2}, "rollout": {"num_gpus": 1}, "colocate": True},
     ("object_store", "the rollouts are not vLLM engines on GPUs")),
    ({}, GPUS, ("object_store", "the rollouts are not vLLM engines on GPUs")),
    ({"backend": "vllm"}, {"trainer": {"num_gpus": 1}}, ("object_store", "the rollouts are not vLLM engines on GPUs")),
    ({}, {"rollout": {"num_gpus": 1}}, ("object_store", "the rollouts are not vLLM engines on GPUs")),
])
def test_auto_picks_the_path_from_the_placement(rollout, resources, chosen):
    assert weight_sync.choose(spec(rollout, resources)) == chosen


@pytest.mark.parametrize(("rollout", "resources"), [
    ({"weight_sync": "object_store"}, {}),
    ({"weight_sync": "shared_memory"}, {}),
    ({"weight_sync": "object_store", "backend": "vllm"}, GPUS),
    ({"weight_sync": "nccl", "backend": "vllm"}, {**GPUS, "colocate": True}),
    ({"weight_sync": "cuda_ipc", "backend": "vllm"}, {**GPUS, "colocate": True}),
])
def test_an_explicit_path_is_taken_as_set(rollout, resources):
    assert weight_sync.choose(spec(rollout, resources)) == (rollout["weight_sync"], "set in the spec")


def test_every_path_the_spec_names_has_a_class():
    from typing import get_args

    from orchestrator.core.spec import RolloutSpec

    named = set(get_args(RolloutSpec.model_fields["weight_sync"].annotation)) - {"auto"}
    assert set(weight_sync.PATHS) == named
    # Only shared memory is written by the trainer's update call itself.
    assert {m for m, cls in weight_sync.PATHS.items() if cls.in_update} == {"shared_memory"}


# Stand-ins for the actor groups: `setup` hands them to `share_memory`, replaced here.
GROUP = SimpleNamespace(actors=[None])
WAIT = None  # (the replaced `share_memory` makes no call to wait for)


def test_shared_memory_that_cannot_be_set_up_falls_back_to_the_object_store(monkeypatch):
    monkeypatch.setattr(weight_sync, "share_memory", lambda trainer, rollouts, tag, wait: "the engine is not on the CPU")
    path = weight_sync.setup(spec(), GROUP, GROUP, "job", WAIT)
    assert (path.method, path.reason, path.in_update) == ("object_store", "the engine is not on the CPU", False)


def test_shared_memory_named_in_the_spec_raises_why_it_cannot(monkeypatch):
    monkeypatch.setattr(weight_sync, "share_memory", lambda trainer, rollouts, tag, wait: "the engine is not on the CPU")
    with pytest.raises(RuntimeError, match="rollout.weight_sync: shared_memory is not possible: the engine is not on the CPU"):
        weight_sync.setup(spec({"weight_sync": "shared_memory"}), GROUP, GROUP, "job", WAIT)


def test_shared_memory_that_is_set_up_is_kept(monkeypatch):
    monkeypatch.setattr(weight_sync, "share_memory", lambda trainer, rollouts, tag, wait: None)
    path = weight_sync.setup(spec(), GROUP, GROUP, "job", WAIT)
    assert (path.method, path.reason, path.in_update) == ("shared_memory", "trainer and rollouts on the CPU", True)


def test_both_rollout_backends_offer_the_interface():
    from workers.rollout import HFRollout, RolloutBackend
    from workers.rollout_vllm import VLLMRollout

    required = {"generate", "load_weights", "share_weights", "state_dict", "node_id"}
    assert required <= {n for n in vars(RolloutBackend) if not n.startswith("_")}
    for cls in (HFRollout, VLLMRollout):
        assert all(callable(getattr(cls, name, None)) for name in required), cls
    gpu_only = ("init_weight_group", "receive_weights_nccl", "receive_weights_ipc")
    assert all(callable(getattr(VLLMRollout, name, None)) for name in gpu_only)
