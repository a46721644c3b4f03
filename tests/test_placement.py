"""`orchestrator.runtime.placement.plan`: the placement group's bundles and each role's slots, worked out by
hand from the spec. No Ray cluster: plan() only reads the spec."""

import pytest

from orchestrator.core.spec import parse_spec
from orchestrator.runtime.placement import plan

# Every role's default: 1 replica, 0.5 CPU, no GPU.
CPU = {"CPU": 0.5}
ACTOR = {"num_cpus": 0.5, "num_gpus": 0.0}


def spec(**sections):
    """A spec whose rewards run on a reward actor and completions on rollout actors (the layout of every
    role); `resources` sections merge into that."""
    data = {"model": {"path": "m"}, "data": {"train_file": "d.jsonl"}, "rewards": [{"function": "accuracy"}]}
    resources = {"reward_in": "actor", "rollout_in": "actor", "reference_in": "actor", **sections.pop("resources", {})}
    return parse_spec({**data, **sections, "resources": resources})


@pytest.mark.parametrize(("sections", "slots"), [
    ({}, {"rollout": [0], "trainer": [1]}),
    ({"algorithm": {"name": "ppo"}, "optim": {"kl_coef": 0.05}}, {"rollout": [0], "trainer": [1], "reference": [2], "critic": [3]}),
    ({"algorithm": {"name": "sft"}, "data": {"train_file": "d.jsonl", "eval_file": "e.jsonl"}}, {"trainer": [0], "rollout": [1]}),
], ids=["grpo", "ppo-kl", "sft-eval"])
def test_function_rewards_in_the_driver_take_no_bundle(sections, slots):
    layout = plan(spec(**sections, resources={"reward_in": "auto"}))
    assert layout.slots == slots and layout.bundles == [CPU] * len(slots)


@pytest.mark.parametrize(("sections", "slots"), [
    ({}, {"trainer": [0]}),
    ({"algorithm": {"name": "ppo"}, "optim": {"kl_coef": 0.05}}, {"trainer": [0], "reference": [1], "critic": [2]}),
    ({"algorithm": {"name": "sft"}, "data": {"train_file": "d.jsonl", "eval_file": "e.jsonl"}}, {"trainer": [0]}),  # it evaluates
], ids=["grpo", "ppo-kl", "sft-eval"])
def test_a_cpu_trainer_that_samples_asks_for_the_rollouts_cpus_too(sections, slots):
    layout = plan(spec(**sections, resources={"reward_in": "auto", "rollout_in": "auto", "rollout": {"num_cpus": 1.5}}))
    assert layout.slots == slots
    assert layout.bundles == [{"CPU": 2.0}] + [CPU] * (len(slots) - 1)  # trainer 0.5 + rollout 1.5
    assert layout.actor_resources["trainer"] == {"num_cpus": 2.0, "num_gpus": 0.0}


def test_a_cpu_trainer_that_keeps_the_reference_asks_for_its_cpus_too():
    layout = plan(spec(algorithm={"name": "ppo"}, optim={"kl_coef": 0.05},
                       resources={"reward_in": "auto", "rollout_in": "auto", "reference_in": "auto", "reference": {"num_cpus": 1.5}}))
    assert layout.slots == {"trainer": [0], "critic": [1]}
    assert layout.bundles == [{"CPU": 2.5}, CPU]  # trainer 0.5 + rollout 0.5 + reference 1.5; critic


def test_a_gpu_trainer_that_samples_asks_for_one_device():
    s = spec(resources={"rollout_in": "trainer", "trainer": {"num_gpus": 1}, "rollout": {"num_gpus": 1}})
    assert plan(s).bundles == [{"CPU": 1.0, "GPU": 1.0}, CPU]  # trainer (and rollout), reward


def test_a_reward_model_gets_a_reward_actor_when_auto():
    s = spec(rewards=[{"function": "accuracy"}, {"model": "rm"}], resources={"reward_in": "auto"})
    assert not s.rewards_in_driver and plan(s).slots == {"rollout": [0], "trainer": [1], "reward": [2]}


@pytest.mark.parametrize(("sections", "slots"), [
    ({}, {"rollout": [0], "trainer": [1], "reward": [2]}),
    # A held-out file changes nothing for RL: its evaluation uses the rollout and reward actors already there.
    ({"data": {"train_file": "d.jsonl", "eval_file": "e.jsonl"}}, {"rollout": [0], "trainer": [1], "reward": [2]}),
    ({"optim": {"kl_coef": 0.1}}, {"rollout": [0], "trainer": [1], "reward": [2], "reference": [3]}),
    ({"algorithm": {"name": "ppo"}}, {"rollout": [0], "trainer": [1], "reward": [2], "critic": [3]}),
    ({"algorithm": {"name": "ppo"}, "optim": {"kl_coef": 0.05}},
     {"rollout": [0], "trainer": [1], "reward": [2], "reference": [3], "critic": [4]}),
    ({"algorithm": {"name": "sft"}}, {"trainer": [0]}),
    ({"algorithm": {"name": "sft"}, "data": {"train_file": "d.jsonl", "eval_file": "e.jsonl"}},
     {"trainer": [0], "rollout": [1], "reward": [2]}),
], ids=["grpo", "grpo-eval", "grpo-kl", "ppo", "ppo-kl", "sft", "sft-eval"])
def test_one_bundle_per_role_by_default(sections, slots):
    layout = plan(spec(**sections))
    assert layout.slots == slots
    assert layout.bundles == [CPU] * len(slots)
    assert layout.actor_resources == {role: ACTOR for role in slots}


def test_replicas_and_gpus_get_one_bundle_each_but_reward_one_only():
    layout = plan(spec(resources={
        "rollout": {"replicas": 2, "num_cpus": 1, "num_gpus": 1},
        "trainer": {"replicas": 2, "num_cpus": 2, "num_gpus": 1},
        "reward": {"replicas": 3, "num_cpus": 0.25},
    }))
    assert layout.bundles == [
        {"CPU": 1.0, "GPU": 1.0}, {"CPU": 1.0, "GPU": 1.0},  # rollout 0, 1
        {"CPU": 2.0, "GPU": 1.0}, {"CPU": 2.0, "GPU": 1.0},  # trainer 0, 1
        {"CPU": 0.25},  # the one reward actor: no GPU key when it asks for none
    ]
    assert layout.slots == {"rollout": [0, 1], "trainer": [2, 3], "reward": [4]}
    assert layout.actor_resources == {
        "rollout": {"num_cpus": 1.0, "num_gpus": 1.0},
        "trainer": {"num_cpus": 2.0, "num_gpus": 1.0},
        "reward": {"num_cpus": 0.25, "num_gpus": 0.0},
    }


def test_colocate_shares_bundle_i_among_replica_i_of_each_role():
    layout = plan(spec(optim={"kl_coef": 0.1}, resources={
        "colocate": True,
        "rollout": {"replicas": 2, "num_cpus": 1, "num_gpus": 0.5},
        "trainer": {"replicas": 1, "num_cpus": 2, "num_gpus": 1},
        "reference": {"replicas": 2, "num_cpus": 0.5, "num_gpus": 0.25},
        "reward": {"num_cpus": 0.25},
    }))
    assert layout.bundles == [
        {"CPU": 3.5, "GPU": 1.0},  # rollout 0 + trainer 0 + reference 0: CPUs 1 + 2 + 0.5, the largest GPU ask
        {"CPU": 1.5, "GPU": 0.5},  # rollout 1 + reference 1 (there is no trainer 1)
        {"CPU": 0.25},  # reward is never colocated
    ]
    assert layout.slots == {"rollout": [0, 1], "trainer": [0], "reference": [0, 1], "reward": [2]}
    # Three colocated roles time-share a GPU: each asks for a third of its own GPU count.
    assert layout.actor_resources == {
        "rollout": {"num_cpus": 1.0, "num_gpus": pytest.approx(0.5 / 3)},
        "trainer": {"num_cpus": 2.0, "num_gpus": pytest.approx(1 / 3)},
        "reference": {"num_cpus": 0.5, "num_gpus": pytest.approx(0.25 / 3)},
        "reward": {"num_cpus": 0.25, "num_gpus": 0.0},
    }


def test_colocated_ppo_on_cpus_has_no_gpu_anywhere():
    layout = plan(spec(algorithm={"name": "ppo"}, resources={"colocate": True}))
    # rollout, trainer and critic share bundle 0: 3 * 0.5 CPUs; reward alone in bundle 1.
    assert layout.bundles == [{"CPU": 1.5}, {"CPU": 0.5}]
    assert layout.slots == {"rollout": [0], "trainer": [0], "critic": [0], "reward": [1]}
    assert all(r["num_gpus"] == 0.0 for r in layout.actor_resources.values())


def test_colocated_sft_is_the_trainer_alone():
    layout = plan(spec(algorithm={"name": "sft"}, resources={"colocate": True, "trainer": {"num_gpus": 1}}))
    assert layout.bundles == [{"CPU": 0.5, "GPU": 1.0}]
    assert layout.slots == {"trainer": [0]}
    assert layout.actor_resources == {"trainer": {"num_cpus": 0.5, "num_gpus": 1.0}}  # alone: the whole GPU


@pytest.mark.parametrize("resources", [
    {"colocate": True, "rollout": {"replicas": 2, "num_gpus": 1}, "trainer": {"replicas": 2, "num_gpus": 1}, "critic": {"num_gpus": 0.5}},
    {"colocate": True, "rollout": {"replicas": 4, "num_gpus": 0.25}, "trainer": {"num_cpus": 3, "num_gpus": 1}},
    {"rollout": {"replicas": 3, "num_gpus": 1}, "trainer": {"replicas": 2, "num_gpus": 1}, "critic": {"replicas": 2}},
])
def test_every_bundle_holds_what_its_actors_ask_for(resources):
    layout = plan(spec(algorithm={"name": "ppo"}, optim={"kl_coef": 0.1}, resources=resources))
    asked = [{"CPU": 0.0, "GPU": 0.0} for _ in layout.bundles]
    for role, indices in layout.slots.items():
        for i in indices:
            asked[i]["CPU"] += layout.actor_resources[role]["num_cpus"]
            asked[i]["GPU"] += layout.actor_resources[role]["num_gpus"]
    for bundle, need in zip(layout.bundles, asked):
        assert need["CPU"] == pytest.approx(bundle["CPU"])
        assert need["GPU"] <= bundle.get("GPU", 0.0) + 1e-9
    assert set(range(len(layout.bundles))) == {i for indices in layout.slots.values() for i in indices}  # no empty bundle


@pytest.mark.parametrize(("sections", "alone"), [
    ({"resources": {"rollout_in": "auto", "reward_in": "auto"}}, True),  # GRPO on CPUs: the trainer, then the driver's rewards
    ({}, True),  # rollout, reward, trainer: each phase one actor
    ({"optim": {"kl_coef": 0.1}, "resources": {"reward_in": "auto"}}, True),  # the reference beside the driver's rewards
    ({"optim": {"kl_coef": 0.1}}, False),  # the reward actor beside the reference
    ({"algorithm": {"name": "ppo"}, "resources": {"reward_in": "auto", "rollout_in": "auto"}}, False),  # the critic
    ({"resources": {"trainer": {"replicas": 2}}}, False),  # two trainer replicas update together
])
def test_actors_spin_only_when_they_compute_one_at_a_time(sections, alone):
    from orchestrator.runtime.placement import PASSIVE, SPIN, actor_env, stage_plan

    env = actor_env(stage_plan(spec(**sections)))
    assert env == {"TOKENIZERS_PARALLELISM": "false", **(SPIN if alone else PASSIVE)}


def test_a_driver_that_computes_the_rewards_is_counted_with_their_cpus():
    from orchestrator.core.layout import demand, driver_cpus

    s = spec(resources={"reward_in": "auto", "rollout_in": "auto", "reward": {"num_cpus": 0.25}})
    assert driver_cpus(s) == 0.25 and demand(s) == [{"CPU": 1.0}, {"CPU": 0.25}]  # trainer (+ rollout), then the driver
    with_actor = spec()  # a reward actor: the driver asks for nothing
    assert driver_cpus(with_actor) == 0.0 and demand(with_actor) == plan(with_actor).bundles
    assert driver_cpus(spec(algorithm={"name": "sft"}, rewards=[], resources={"reward_in": "auto"})) == 0.0  # scores nothing
