import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from orchestrator.core.spec import JobSpec, SpecError, load_spec, parse_spec
from tests.conftest import ROOT, tiny_spec


def base() -> dict:
    return tiny_spec(Path("m"), Path("d.jsonl"), Path("runs/t"))


@pytest.mark.parametrize(("name", "estimator", "roles"), [
    ("grpo.yaml", "grpo", ["trainer"]),  # function rewards: computed in the driver; on CPUs the trainer samples
    ("ppo.yaml", "gae", ["trainer", "critic"]),  # kl_coef 0.05: a reference, on CPUs a copy in the trainer
])
def test_examples_validate(name, estimator, roles):
    spec = load_spec(ROOT / "examples" / name)
    assert spec.api_version == "rlhf/v1"
    assert (spec.algorithm.estimator, spec.roles) == (estimator, roles)


def test_defaults_derive_estimator_and_roles():
    spec = parse_spec(base())
    assert spec.algorithm.estimator == "grpo"
    assert not spec.needs_reference  # kl_coef 0: no reference model at all
    ppo = parse_spec({**base(), "algorithm": {"name": "ppo"}, "optim": {"kl_coef": 0.1}})
    assert ppo.algorithm.estimator == "gae" and ppo.needs_reference


def test_unknown_field_is_named():
    with pytest.raises(SpecError) as e:
        parse_spec({**base(), "optim": {"lr": 1e-3, "learning_rate": 1}})
    assert "optim.learning_rate: unknown field" in str(e.value)


def test_wrong_type_is_named():
    with pytest.raises(SpecError) as e:
        parse_spec({**base(), "rollout": {"n": "many"}})
    assert "rollout.n" in str(e.value) and "integer" in str(e.value)


def test_nested_list_field_path():
    with pytest.raises(SpecError) as e:
        parse_spec({**base(), "rewards": [{"function": "accuracy"}, {"weight": 1}]})
    assert "rewards.1" in str(e.value) and "exactly one of 'function' or 'model'" in str(e.value)


def test_bad_api_version():
    with pytest.raises(SpecError) as e:
        parse_spec({**base(), "api_version": "rlhf/v0"})
    assert "api_version" in str(e.value)


def test_cross_field_rules():
    with pytest.raises(SpecError, match="mini_batch_size"):
        parse_spec({**base(), "optim": {"prompts_per_step": 4, "mini_batch_size": 5}})
    with pytest.raises(SpecError, match="gae"):
        parse_spec({**base(), "algorithm": {"name": "grpo", "advantage_estimator": "gae"}})
    with pytest.raises(SpecError, match="rollout.n"):
        parse_spec({**base(), "rollout": {"n": 1}})


def test_spec_is_frozen():
    spec = parse_spec(base())
    with pytest.raises(ValidationError, match="Instance is frozen"):
        spec.optim.lr = 1.0
    assert spec.optim.lr == 1e-3


def test_yaml_syntax_error_names_line(tmp_path):
    bad = tmp_path / "job.yaml"
    bad.write_text("name: x\nmodel:\n  path: [unclosed\n")
    with pytest.raises(SpecError, match=r"job.yaml:\d+: invalid YAML"):
        load_spec(bad)


def test_json_spec(tmp_path):
    import json

    f = tmp_path / "job.json"
    f.write_text(json.dumps(base()))
    assert isinstance(load_spec(f), JobSpec)


def test_every_field_has_a_description():
    def walk(model, prefix=""):
        for name, field in model.model_fields.items():
            assert field.description, f"{prefix}{name} has no description"
            ann = field.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann, f"{prefix}{name}.")

    walk(JobSpec)


def test_docs_spec_reference_is_current():
    from orchestrator.core.spec import reference_markdown

    page = (ROOT / "docs" / "spec.md").read_text()
    block = page.split("<!-- spec-reference:start -->\n", 1)[1].split("\n<!-- spec-reference:end -->", 1)[0]
    assert block == reference_markdown(), "docs/spec.md's job spec reference is stale: regenerate it (see that page)"


@pytest.mark.parametrize("rollout, resources, message", [
    ({"weight_sync": "nccl"}, {}, "rollout.weight_sync nccl needs rollout.backend vllm and GPUs"),
    ({"weight_sync": "cuda_ipc", "backend": "vllm"}, {"trainer": {"num_gpus": 1}, "rollout": {"num_gpus": 1}},
     "cuda_ipc needs resources.colocate"),
    ({"weight_sync": "shared_memory"}, {"rollout": {"num_gpus": 1}}, "shared_memory is for CPU trainers and rollouts"),
])
def test_impossible_weight_sync_is_refused(rollout, resources, message):
    with pytest.raises(SpecError, match=message):
        parse_spec({**base(), "rollout": {"n": 4, **rollout}, "resources": resources})


def test_weight_sync_accepts_the_paths_that_fit():
    gpus = {"trainer": {"num_gpus": 1}, "rollout": {"num_gpus": 1}}
    assert parse_spec({**base(), "rollout": {"n": 4, "backend": "vllm", "weight_sync": "nccl"}, "resources": gpus}).rollout.weight_sync == "nccl"
    assert parse_spec({**base(), "rollout": {"n": 4, "backend": "vllm", "weight_sync": "cuda_ipc"},
                       "resources": {**gpus, "colocate": True}}).rollout.weight_sync == "cuda_ipc"
    assert parse_spec(base()).rollout.weight_sync == "auto"


@pytest.mark.parametrize("extra, message", [
    ({"output_dir": "s3://bucket/run"}, "resources.trainer.strategy: fsdp writes each replica's shards to one shared filesystem"),
    ({"checkpoint": {"dir": "s3://bucket/ckpt"}}, "output_dir and checkpoint.dir must be local paths"),
    ({"model": {"path": "/m", "lora": {"rank": 4}}}, "fsdp with model.lora is not supported yet"),
    ({"algorithm": {"name": "rm"}}, "fsdp shards the roles of an RL algorithm (grpo, ppo); not yet rm's"),
    ({"algorithm": {"name": "dpo"}}, "not yet dpo's"),
])
def test_fsdp_is_refused_where_it_cannot_work(extra, message):
    spec = {"model": {"path": "/m"}, "data": {"train_file": "/d"}, "rewards": [{"function": "accuracy"}],
            "resources": {"trainer": {"replicas": 2, "strategy": "fsdp"}}, "optim": {"prompts_per_step": 4}, **extra}
    with pytest.raises(SpecError, match=re.escape(message)):
        parse_spec(spec)


def test_the_trainer_critic_and_reference_shard_and_nothing_else():
    spec = {"model": {"path": "/m"}, "data": {"train_file": "/d"}, "rewards": [{"function": "accuracy"}], "algorithm": {"name": "ppo"},
            "optim": {"prompts_per_step": 4, "kl_coef": 0.1}, "rollout": {"n": 2}}
    sharded = {role: {"replicas": 2, "strategy": "fsdp"} for role in ("trainer", "critic", "reference")}
    assert parse_spec({**spec, "resources": sharded}).sharded_roles == ["trainer", "critic", "reference"]
    with pytest.raises(SpecError, match=r"resources.reward.strategy: the trainer's, critic's and reference's replicas shard"):
        parse_spec({**spec, "resources": {"reward": {"strategy": "fsdp"}}})
    with pytest.raises(SpecError, match=r"resources.critic.replicas: every fsdp replica takes part in each forward: 16 replicas "
                                        r"need at least as many samples per step \(prompts_per_step \* rollout.n = 8\)"):
        parse_spec({**spec, "resources": {"critic": {"replicas": 16, "strategy": "fsdp"}}})
    with pytest.raises(SpecError, match=r"resources.critic.strategy: fsdp writes each replica's shards"):
        parse_spec({**spec, "output_dir": "s3://b/run", "resources": {"critic": {"strategy": "fsdp"}}})
    lora = {"model": {"path": "/m", "lora": {"rank": 4}}, "resources": {"critic": {"strategy": "fsdp"}}}
    with pytest.raises(SpecError, match=r"resources.critic.strategy: fsdp with model.lora is not supported yet"):
        parse_spec({**spec, **lora})
    assert parse_spec({**spec, **lora, "model": {"path": "/m", "lora": {"rank": 4, "critic": False}}}).sharded_roles == ["critic"]
    # The reference saves nothing: it may shard with runs in an object store.
    assert parse_spec({**spec, "output_dir": "s3://b/run", "resources": {"reference": {"strategy": "fsdp"}}}).sharded_roles == ["reference"]


def test_where_the_rewards_run():
    functions = parse_spec(base())
    assert functions.rewards_in_driver and "reward" not in functions.roles
    assert "reward" in parse_spec({**base(), "resources": {"reward_in": "actor"}}).roles
    with_model = {**base(), "rewards": [{"function": "accuracy"}, {"model": "/rm"}]}
    assert not parse_spec(with_model).rewards_in_driver and "reward" in parse_spec(with_model).roles
    with pytest.raises(SpecError, match=r"resources.reward_in: rewards.1 is a reward model, which runs on a reward actor"):
        parse_spec({**with_model, "resources": {"reward_in": "driver"}})
    # A stage that scores nothing (SFT without held-out prompts) has no rewards to place anywhere.
    assert parse_spec({**base(), "algorithm": {"name": "sft"}, "rewards": []}).roles == ["trainer"]


def test_where_the_completions_are_sampled():
    cpu = parse_spec(base())
    assert cpu.rollouts_in_trainer and "rollout" not in cpu.roles
    assert "rollout" in parse_spec({**base(), "resources": {"rollout_in": "actor"}}).roles
    # auto keeps rollout actors wherever the trainer cannot sample, or GPUs are asked for.
    for rollout, resources in [({"backend": "vllm"}, {}), ({"weight_sync": "object_store"}, {}), ({}, {"trainer": {"replicas": 2}}),
                               ({}, {"trainer": {"num_gpus": 1}, "rollout": {"num_gpus": 1}}),
                               ({}, {"trainer": {"replicas": 2, "strategy": "fsdp"}, "rollout": {"replicas": 2}})]:
        spec = parse_spec({**base(), "rollout": {"n": 4, **rollout}, "resources": resources})
        assert not spec.rollouts_in_trainer and "rollout" in spec.roles, (rollout, resources)
    on_gpu = {"rollout_in": "trainer", "trainer": {"num_gpus": 1}, "rollout": {"num_gpus": 1}}
    assert parse_spec({**base(), "resources": on_gpu}).roles == ["trainer"]
    assert parse_spec({**base(), "algorithm": {"name": "sft"}, "rewards": []}).roles == ["trainer"]
    # An SFT stage that evaluates held-out prompts: its trainer writes their greedy completions too.
    sft_eval = {**base(), "algorithm": {"name": "sft"}, "data": {**base()["data"], "eval_file": "e.jsonl"}}
    spec = parse_spec(sft_eval)
    assert spec.roles == ["trainer"] and spec.rollouts_in_trainer and not spec.steps_in_trainer
    assert parse_spec({**sft_eval, "resources": {"rollout_in": "actor"}}).roles == ["trainer", "rollout"]


def test_where_the_reference_is_kept():
    kl = {**base(), "optim": {**base()["optim"], "kl_coef": 0.1}}
    cpu = parse_spec(kl)
    assert cpu.reference_copy_in_trainer and cpu.reference_in_trainer and "reference" not in cpu.roles
    assert "reference" in parse_spec({**kl, "resources": {"reference_in": "actor"}}).roles
    # auto keeps a reference actor on GPUs or where a model is sharded; a LoRA policy is its own, with no copy.
    for resources in [{"trainer": {"num_gpus": 1}, "reference": {"num_gpus": 1}}, {"reference": {"replicas": 2, "strategy": "fsdp"}}]:
        assert "reference" in parse_spec({**kl, "resources": resources}).roles, resources
    lora = parse_spec({**kl, "model": {"path": "m", "lora": {"rank": 4}}})
    assert lora.reference_in_trainer and not lora.reference_copy_in_trainer and "reference" not in lora.roles
    assert not parse_spec(base()).reference_in_trainer  # kl_coef 0: no reference at all
    with pytest.raises(SpecError, match=r"resources.reference_in: the trainer cannot keep the reference: a sharded \(fsdp\)"):
        parse_spec({**kl, "resources": {"reference_in": "trainer", "reference": {"replicas": 2, "strategy": "fsdp"}}})
    # DPO scores its pairs against a reference actor; with LoRA its trainer's frozen base is the reference.
    dpo = {k: v for k, v in {**base(), "algorithm": {"name": "dpo"}, "resources": {"reference_in": "trainer"}}.items() if k != "rewards"}
    with pytest.raises(SpecError, match=r"resources.reference_in: the trainer cannot keep the reference: dpo's trainer scores"):
        parse_spec(dpo)
    assert parse_spec({**dpo, "model": {"path": "m", "lora": {"rank": 4}}}).roles == ["trainer"]
    assert "reference" in parse_spec({**dpo, "resources": {}}).roles


def test_when_a_step_is_one_call_to_the_trainer():
    assert parse_spec(base()).steps_in_trainer  # a lone CPU trainer that samples, built-in rewards, no reference, no critic
    # Anything else in the step, reward code from an import path (its hang named in the driver), or a
    # second replica to split the batch with, keeps the driver's phases.
    for changes in [{"resources": {"rollout_in": "actor"}}, {"resources": {"reward_in": "actor"}},
                    {"optim": {"kl_coef": 0.1}}, {"algorithm": {"name": "ppo"}},
                    {"resources": {"trainer": {"replicas": 2}, "rollout": {"replicas": 2}}},
                    {"rewards": [{"model": "rm"}]}, {"rewards": [{"function": "my_rewards:score"}]}]:
        spec = parse_spec({**base(), **{k: {**base().get(k, {}), **v} if isinstance(v, dict) else v for k, v in changes.items()}})
        assert not spec.steps_in_trainer, changes


@pytest.mark.parametrize(("rollout", "resources", "why"), [
    ({"backend": "vllm"}, {}, "rollout.backend vllm runs its engines in rollout actors"),
    ({"weight_sync": "shared_memory"}, {}, "rollout.weight_sync is shared_memory, but nothing is synced"),
    ({}, {"trainer": {"replicas": 2}}, r"resources.rollout.replicas \(1\) differs from resources.trainer.replicas \(2\)"),
    ({}, {"trainer": {"replicas": 2, "strategy": "fsdp"}, "rollout": {"replicas": 2}}, "an fsdp trainer holds only a shard"),
])
def test_a_trainer_that_cannot_sample_is_refused(rollout, resources, why):
    with pytest.raises(SpecError, match=r"resources.rollout_in: the trainer cannot also be the rollout: " + why):
        parse_spec({**base(), "rollout": {"n": 4, **rollout}, "resources": {"rollout_in": "trainer", **resources}})
    with pytest.raises(SpecError, match=r"resources.rollout_in: .*sft samples no completions each step"):
        parse_spec({**base(), "algorithm": {"name": "sft"}, "rewards": [], "resources": {"rollout_in": "trainer"}})


def test_each_model_has_its_own_trust():
    """`model.trust_remote_code` is the policy's and the default of every other model's own flag; a
    model's own flag wins; a flag for a model the spec does not name, or for code that is no model, is refused."""
    trusting = {**base(), "model": {"path": "m", "trust_remote_code": True}}
    spec = parse_spec({**trusting, "rewards": [{"model": "r"}, {"model": "q", "trust_remote_code": False}, {"function": "accuracy"}]})
    assert [s.trust_remote_code for s in spec.reward_sources] == [True, False, None]
    assert [s.trust_remote_code for s in spec.rewards] == [None, False, None]  # (the spec itself as given)
    model = parse_spec({**trusting, "model": {**trusting["model"], "critic_path": "c", "critic_trust_remote_code": False}}).model
    assert (model.trust_remote_code, model.critic_trust, model.rm_trust) == (True, False, True)
    rm = parse_spec({**trusting, "algorithm": {"name": "rm"}, "rewards": [],
                     "model": {**trusting["model"], "rm_path": "b", "rm_trust_remote_code": False}})
    assert (rm.trained_model_path, rm.trained_model_trust) == ("b", False)
    for change, field in [
        ({"model": {"path": "m", "critic_trust_remote_code": True}}, "model.critic_trust_remote_code"),
        ({"model": {"path": "m", "rm_trust_remote_code": False}}, "model.rm_trust_remote_code"),
        ({"rewards": [{"function": "accuracy", "trust_remote_code": True}]}, "rewards.0.trust_remote_code"),
        ({"rewards": [{"model": "stage:rm", "trust_remote_code": True}], "stages": [{"name": "rm", "algorithm": {"name": "rm"}}]},
         "rewards.0.trust_remote_code"),
    ]:
        with pytest.raises(SpecError) as e:
            parse_spec({**base(), **change})
        assert f"{field}: " in str(e.value)


def test_a_stages_reward_model_has_the_trust_of_the_model_its_stage_trains(tmp_path):
    from orchestrator.core import checkpoint
    from orchestrator.stages.pipeline import Stage, with_stage_models

    spec = parse_spec({**base(), "model": {"path": "m", "trust_remote_code": True, "rm_path": "b", "rm_trust_remote_code": False},
                       "output_dir": str(tmp_path), "stages": [
                           {"name": "rm", "algorithm": {"name": "rm"}, "rewards": []},
                           {"name": "grpo", "rewards": [{"model": "stage:rm"}]}]})
    stages = [Stage(name, i, s, None, None, i + 1, i + 1) for i, (name, s) in enumerate(spec.stage_specs())]
    final = checkpoint.step_dir(stages[0].spec.checkpoint_dir, 1) / "reward_model"
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")
    (source,) = with_stage_models(stages[1], stages).spec.reward_sources
    assert (source.model, source.trust_remote_code) == (str(final), False)  # rm_path's trust, not the policy's


def test_stage_specs_are_built_once():
    spec = parse_spec({**base(), "stages": [{"name": "a"}, {"name": "b", "optim": {"lr": 0.5}}]})
    first, again = spec.stage_specs(), spec.stage_specs()
    assert all(a is b for (_, a), (_, b) in zip(first, again))  # validation built them; placement and the pipeline reuse them
    assert spec == parse_spec({**base(), "stages": [{"name": "a"}, {"name": "b", "optim": {"lr": 0.5}}]})
    renamed = spec.model_copy(update={"name": "other"})
    assert [s.name for _, s in renamed.stage_specs()] == ["other", "other"]  # a copy's own, not the original's


def test_a_spec_with_stages_reads_back_from_its_dump_as_submitted():
    # The launch file and the job record hold the spec's dump: a stage's unset fields must not come
    # back as nulls that override the job's values (every optim field null: the driver refused the spec).
    stages = [{"name": "a", "optim": {"lr": 1e-3}}, {"name": "b", "rollout": {"n": 2}, "data": {"eval_file": None}}]
    spec = parse_spec({**base(), "data": {**base()["data"], "eval_file": "e.jsonl"}, "stages": stages})
    dumped = spec.model_dump(mode="json")
    assert [s for s in dumped["stages"]] == stages
    again = parse_spec(dumped)
    assert again == spec
    assert [(n, s.optim.lr, s.optim.steps, s.rollout.n, s.data.eval_file) for n, s in again.stage_specs()] == [
        ("a", 1e-3, spec.optim.steps, spec.rollout.n, "e.jsonl"), ("b", spec.optim.lr, spec.optim.steps, 2, None)]


def test_deeply_nested_reward_kwargs_are_refused_not_a_crash():
    nested: list = []
    for _ in range(5000):  # far past Python's recursion limit: measuring it must not recurse that deep
        nested = [nested]
    with pytest.raises(SpecError) as e:
        parse_spec({**base(), "rewards": [{"function": "accuracy", "kwargs": {"x": nested}}]})
    assert "rewards.0.kwargs: " in str(e.value) and "4 deep" in str(e.value)


def test_an_agent_names_a_built_in_environment_or_an_import_path():
    spec = parse_spec({**base(), "rewards": [], "rollout": {"agent": {"environment": "calculator", "max_turns": 3}}})
    assert spec.rollout.agent.max_turns == 3 and spec.rollout.agent.sandbox_actors == 0  # its reward is the environment's
    assert parse_spec({**base(), "rollout": {"agent": {"environment": "python_calculator"}}}).rollout.agent.sandbox_actors == 2
    assert parse_spec({**base(), "rollout": {"agent": {"environment": "my_envs.sql:SqlEnv"}}}).rollout.agent.environment == "my_envs.sql:SqlEnv"
    with pytest.raises(SpecError) as e:
        parse_spec({**base(), "rollout": {"agent": {"environment": "calculatr"}}})
    assert "rollout.agent.environment: unknown environment 'calculatr': built in: calculator, python_calculator" in str(e.value)
    # vLLM samples the turns of the built-in environments; an agent on the chat endpoint needs the transformers model.
    assert parse_spec({**base(), "rollout": {"backend": "vllm", "agent": {"environment": "calculator"}}}).rollout.backend == "vllm"
    with pytest.raises(SpecError, match="rollout.agent.environment: verifiers runs its own agent on the job's chat endpoint.*use rollout.backend hf"):
        parse_spec({**base(), "rollout": {"backend": "vllm", "agent": {"environment": "verifiers", "kwargs": {"taskset": "boxed_math"}}}})
    with pytest.raises(SpecError, match=r"rollout.agent.max_turns"):
        parse_spec({**base(), "rollout": {"agent": {"environment": "calculator", "max_turns": 0}}})
