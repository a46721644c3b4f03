"""The table of algorithms and rollout backends: every entry names classes that exist and fit their slot."""

from __future__ import annotations

import pytest

from orchestrator.core.algorithms import ALGORITHMS, ROLLOUT_BACKENDS, Algorithm
from orchestrator.core.data import LOADERS
from orchestrator.core.spec import SpecError, parse_spec
from orchestrator.runtime.registry import driver_class, resolve, rollout_class, trainer_class


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_algorithm_resolves(name):
    from orchestrator.stages.driver import Orchestrator
    from workers.training import DataParallel

    algo = ALGORITHMS[name]
    assert algo.name == name and algo.data in LOADERS
    assert issubclass(driver_class(name), Orchestrator)
    assert issubclass(trainer_class(name), DataParallel)


@pytest.mark.parametrize("backend", sorted(ROLLOUT_BACKENDS))
def test_every_rollout_backend_resolves(backend):
    cls = rollout_class(backend)
    for method in ("generate", "load_weights", "share_weights", "state_dict"):
        assert callable(getattr(cls, method, None)), f"{cls.__name__} lacks {method}"


def test_a_bad_import_path_names_what_is_missing():
    with pytest.raises(AttributeError, match="NoSuchDriver"):
        resolve("orchestrator.stages.driver:NoSuchDriver")
    with pytest.raises(ModuleNotFoundError, match="orchestrator.nowhere"):
        resolve("orchestrator.nowhere:Driver")


def test_roles_follow_the_table():
    grpo, ppo, sft = ALGORITHMS["grpo"], ALGORITHMS["ppo"], ALGORITHMS["sft"]
    assert grpo.roles(kl_coef=0.0, evaluates=False) == ["rollout", "trainer", "reward"]
    assert grpo.roles(kl_coef=0.1, evaluates=False) == ["rollout", "trainer", "reward", "reference"]
    assert ppo.roles(kl_coef=0.1, evaluates=True) == ["rollout", "trainer", "reward", "reference", "critic"]
    assert sft.roles(kl_coef=0.1, evaluates=False) == ["trainer"]
    assert sft.roles(kl_coef=0.0, evaluates=True) == ["trainer", "rollout", "reward"]


def test_the_spec_takes_its_names_from_the_table(monkeypatch):
    spec = {"model": {"path": "m"}, "data": {"train_file": "t.jsonl"}, "rewards": [{"function": "accuracy"}]}
    with pytest.raises(SpecError, match="algorithm.name"):
        parse_spec({**spec, "algorithm": {"name": "no-such-algorithm"}})
    # A row of the table is all the spec needs to know an algorithm: its estimator default and roles follow.
    row = Algorithm("grpo", "prompts", rollouts=True, critic=True, default_estimator="gae",
                    driver="orchestrator.stages.driver:Orchestrator", trainer="workers.trainer:PolicyTrainer")
    monkeypatch.setitem(ALGORITHMS, "grpo", row)
    parsed = parse_spec({**spec, "algorithm": {"name": "grpo"}})
    assert parsed.algorithm.estimator == "gae" and parsed.needs_critic and "critic" in parsed.roles
