"""The async driver's deadlines (orchestrator/stages/async_loop.py), without a cluster: a weight sync
that never returns fails the job within fault_tolerance.call_timeout_s, naming its phase, from the
trainer's side; a trainer that gets no groups fails naming the rollout phase of its step. And its
held-out evaluation samples the trainer's current weights, not the rollout side's older ones."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from pathlib import Path

import pytest

from orchestrator.core.data import PromptDataset
from orchestrator.core.plan import make_plan
from orchestrator.core.spec import parse_spec
from orchestrator.runtime.waits import PhaseTimeout
from orchestrator.stages import driver as sync_driver
from orchestrator.stages.async_loop import AsyncOrchestrator
from tests.conftest import tiny_spec


def driver(timeout_s: float) -> AsyncOrchestrator:
    spec = parse_spec(tiny_spec(Path("m"), Path("d.jsonl"), Path("runs/t"), rollout={"max_staleness": 1},
                                fault_tolerance={"call_timeout_s": timeout_s}))
    stage = make_plan(spec).with_epoch_steps([2]).stages[0]
    dataset = PromptDataset(prompt_ids=[[5, 6]] * 8, extras=[{}] * 8)
    return AsyncOrchestrator(spec, dataset, reporter=None, job_id="t", eos_token_id=0, pad_token_id=1, stage=stage)


class HangingSync:
    """A weight load that never returns (a Future nobody completes), waited for as the driver waits for actors."""

    def __init__(self, orch: AsyncOrchestrator):
        self.orch = orch

    def load(self, weights) -> None:
        self.orch.wait(Future(), "weight_sync")


def test_a_weight_sync_that_never_returns_fails_the_step_naming_it():
    orch = driver(0.5)
    orch.weight_sync = HangingSync(orch)
    orch.published = (1, "weights")  # the trainer published version 1; the rollout side loads it before its next chunk
    producer = threading.Thread(target=orch.produce, daemon=True)
    start = time.monotonic()
    producer.start()
    with pytest.raises(PhaseTimeout, match=r"the weight_sync phase did not finish within fault_tolerance.call_timeout_s=0.5 s"):
        orch.take(1, {})
    assert time.monotonic() - start < 5
    producer.join(5)
    assert not producer.is_alive()


def test_a_trainer_left_without_groups_fails_naming_the_rollout_phase():
    orch = driver(0.3)
    with pytest.raises(PhaseTimeout, match=r"the rollout phase of step 1 delivered 0 of 4 groups within fault_tolerance.call_timeout_s=0.3 s"):
        orch.take(1, {})


class LoadingSync:
    """A weight load that takes a while (the rollout side finishing its chunk first)."""

    def load(self, weights) -> None:
        time.sleep(0.2)


def test_an_evaluation_samples_the_weights_the_trainer_just_published(monkeypatch):
    orch = driver(5.0)
    orch.weight_sync = LoadingSync()
    orch.version, orch.published = 3, (3, "weights of version 3")  # step 3's update, not yet loaded by the rollout side
    sampled_with = []
    orch.groups["rollout"] = "the rollout actor"
    monkeypatch.setattr(sync_driver.evaluation, "evaluate", lambda *args: sampled_with.append(orch.rollout_version) or {})
    rollout_side = threading.Thread(target=orch.load_new_weights, daemon=True)  # (between two of its chunks)
    rollout_side.start()
    orch.evaluate(dataset=None)
    rollout_side.join(5)
    assert sampled_with == [3]


def test_an_evaluation_whose_weights_never_load_fails_naming_the_eval_phase():
    orch = driver(0.3)
    orch.version = 2  # published, but no rollout side runs to load it
    with pytest.raises(PhaseTimeout, match=r"the eval phase of step 0: the rollout side did not load the weights of version 2"):
        orch.evaluate(dataset=None)
