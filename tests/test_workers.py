"""Each role as a plain class, without Ray."""

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from orchestrator.core.algorithms import BUILTIN_REWARDS
from orchestrator.core.spec import OptimSpec, RewardSource, RolloutSpec
from workers.critic import Critic
from workers.reference import Reference
from workers.reward import RewardError, RewardWorker, resolve_function
from workers.rollout import HFRollout, response_mask_until_eos
from workers.trainer import PolicyTrainer
from workers.trainer_parts import KeptReference, OneCallStep, Sampling

PROMPTS = [[16, 10, 17, 28], [18, 10, 19, 28, 20]]  # byte ids of "1+2=" and "3+4=5"
EXTRAS = [{"prompt_text": "1+2=", "answer": 3}, {"prompt_text": "3+4=5", "answer": 7}]


def optim(**kw) -> OptimSpec:
    return OptimSpec(**{"lr": 1e-2, "seed": 0, **kw})


@pytest.fixture(scope="module")
def rollout(tiny_model):
    return HFRollout(str(tiny_model), n=3, max_new_tokens=6, temperature=1.0, seed=0, threads=2)


@pytest.fixture(scope="module")
def batch(rollout):
    b, _ = rollout.generate(PROMPTS, EXTRAS, step=1)
    return b


def test_rollout_batch_contract(batch):
    assert batch.input_ids.shape[0] == 6 and batch.prompt_len == 5
    assert batch.group_ids.tolist() == [0, 0, 0, 1, 1, 1]
    assert batch.response_mask.shape == batch.logprobs.shape == (6, batch.input_ids.shape[1] - 5)
    # Left padding: the shorter prompt's first position is padding.
    assert batch.attention_mask[0, 0] == 0 and batch.attention_mask[3, 0] == 1
    assert torch.all(batch.logprobs <= 0)


def test_sampling_is_seeded_by_step(rollout):
    a, _ = rollout.generate(PROMPTS, EXTRAS, step=5)
    b, _ = rollout.generate(PROMPTS, EXTRAS, step=5)
    c, _ = rollout.generate(PROMPTS, EXTRAS, step=6)
    assert torch.equal(a.input_ids, b.input_ids) and not torch.equal(a.input_ids, c.input_ids)


def test_response_mask_stops_after_eos():
    mask = response_mask_until_eos(torch.tensor([[5, 0, 7, 0], [5, 6, 7, 8]]), eos_id=0)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


def test_behaviour_logprobs_match_a_full_forward(tiny_model, batch):
    # generate's incremental, KV-cached log-probs equal a fresh padded forward pass of the same weights.
    ref = Reference(str(tiny_model), threads=2)
    logprobs, _ = ref.compute_logprobs(batch)
    torch.testing.assert_close(logprobs, batch.logprobs, atol=1e-4, rtol=0)


def with_advantages(batch):
    adv = torch.linspace(-1, 1, len(batch))[:, None] * batch.response_mask
    return batch.replace(advantages=adv, scores=torch.zeros(len(batch)))


def test_trainer_step_changes_parameters_and_sync_round_trips(tiny_model, batch, rollout):
    trainer = PolicyTrainer(str(tiny_model), optim(), RolloutSpec(), threads=2)
    before = trainer.state_dict()
    stats = trainer.train_step(with_advantages(batch), step=1, num_mini_batches=1, micro_batch_size=None, on_policy=True)
    after = trainer.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())
    rollout.load_weights(after)
    synced = rollout.state_dict()
    assert all(torch.equal(synced[k], after[k]) for k in after)


@pytest.mark.parametrize("lora", [None, {"rank": 4, "target_modules": "all-linear"}], ids=["full", "lora"])
def test_a_trainer_that_samples_draws_what_a_rollout_with_its_weights_draws(tiny_model, batch, lora):
    from orchestrator.core.spec import LoraSpec

    spec = RolloutSpec(n=3, max_new_tokens=6, temperature=1.0)
    trainer = PolicyTrainer(str(tiny_model), optim(), spec, threads=2, lora=LoraSpec(**lora) if lora else None,
                            parts=[Sampling(str(tiny_model), False, spec, seed=0)])
    trainer.train_step(with_advantages(batch), step=1, num_mini_batches=1, micro_batch_size=None, on_policy=True)
    rollout = HFRollout(str(tiny_model), n=3, max_new_tokens=6, temperature=1.0, seed=0, threads=2)
    rollout.load_weights(trainer.rollout_weights())  # (a LoRA trainer's merged weights)
    for step, greedy in ((2, False), (3, True)):
        ours, _ = trainer.generate(PROMPTS, EXTRAS, step, greedy)
        theirs, _ = rollout.generate(PROMPTS, EXTRAS, step, greedy)
        assert torch.equal(ours.input_ids, theirs.input_ids) and torch.equal(ours.response_mask, theirs.response_mask)
        torch.testing.assert_close(ours.logprobs, theirs.logprobs, atol=1e-5, rtol=0)
    assert trainer.model.training  # back to training after sampling
    with pytest.raises(RuntimeError, match="this trainer has no rollout part"):
        PolicyTrainer(str(tiny_model), optim(), spec, threads=2).generate(PROMPTS, EXTRAS, 1)


def test_a_whole_step_in_the_trainer_is_the_drivers_phases_in_one_call(tiny_model, arith_file, tmp_path):
    # generate, reward functions, advantages and update in one call give what the driver's phases give.
    from orchestrator.core.advantages import compute_advantages
    from orchestrator.core.spec import parse_spec
    from tests.conftest import tiny_spec

    spec = parse_spec(tiny_spec(tiny_model, arith_file, tmp_path / "run", rollout={"n": 3, "max_new_tokens": 6}))
    assert spec.steps_in_trainer
    whole = PolicyTrainer(str(tiny_model), spec.optim, spec.rollout, threads=2, parts=[
        Sampling(str(tiny_model), False, spec.rollout, seed=0), OneCallStep(spec, str(tiny_model), "float32", False)])
    phases = PolicyTrainer(str(tiny_model), spec.optim, spec.rollout, threads=2, parts=[Sampling(str(tiny_model), False, spec.rollout, seed=0)])
    rewards = RewardWorker(list(spec.rewards), str(tiny_model), threads=2)
    for step in (1, 2):
        batch, per_source, stats = whole.whole_step(PROMPTS, EXTRAS, step, False, 1, None, True)
        expected, _ = phases.generate(PROMPTS, EXTRAS, step, False, False)
        scores, expected_sources, _ = rewards.score(expected)
        expected = compute_advantages(expected.replace(scores=scores), spec)
        expected_stats = phases.train_step(expected, step, 1, None, True)
        assert torch.equal(batch.input_ids, expected.input_ids) and torch.equal(batch.scores, expected.scores)
        assert torch.equal(batch.advantages, expected.advantages) and batch.advantages.abs().sum() > 0
        assert per_source.keys() == expected_sources.keys() == {"accuracy", "length_penalty"}
        assert all(torch.equal(torch.from_numpy(per_source[k]), expected_sources[k]) for k in per_source)
        assert {k: v for k, v in stats.items() if not k.startswith("timing/")} == {k: v for k, v in expected_stats.items() if not k.startswith("timing/")}
        assert {"timing/generate_compute", "timing/reward", "timing/advantages", "timing/update_compute"} <= stats.keys()
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), phases.state_dict().values()))
    with pytest.raises(RuntimeError, match="has no reward part"):
        phases.whole_step(PROMPTS, EXTRAS, 3, False, 1, None, True)


def test_shared_memory_sync_writes_into_what_the_rollouts_compute_from(tiny_model, batch, tmp_path):
    # Two rollout replicas map one file; the trainer writes once and both generate with the new weights.
    path = str(tmp_path / "weights")
    first, second = HFRollout(str(tiny_model), threads=2), HFRollout(str(tiny_model), threads=2)
    size, regions = first.share_weights(path, create=True)
    assert second.share_weights(path, create=False) == (size, regions)
    trainer = PolicyTrainer(str(tiny_model), optim(), RolloutSpec(), threads=2)
    assert set(regions) == set(trainer.state_dict())
    # Tied embeddings: one region for the embedding and the LM head.
    assert regions["lm_head.weight"] == regions["model.embed_tokens.weight"]
    trainer.attach_shared_weights(path, size, regions)
    assert not Path(path).exists(), "the file should be unlinked once the trainer has mapped it"
    trainer.train_step(with_advantages(batch), step=1, num_mini_batches=1, micro_batch_size=None, on_policy=True)
    after = trainer.state_dict()
    assert any(not torch.equal(first.state_dict()[k], after[k]) for k in after), "the step should change the weights"
    start = time.perf_counter()
    seconds = trainer.write_shared_weights()
    assert 0 < seconds <= time.perf_counter() - start  # the write's own duration, in seconds
    for replica in (first, second):
        synced = replica.state_dict()
        assert all(torch.equal(synced[k], after[k]) for k in after)
    # Generation reads the shared weights: the same draw as a rollout loaded the ordinary way.
    plain = HFRollout(str(tiny_model), threads=2)
    plain.load_weights(after)
    assert torch.equal(first.generate(PROMPTS, EXTRAS, step=3)[0].input_ids, plain.generate(PROMPTS, EXTRAS, step=3)[0].input_ids)


def test_shared_memory_sync_declines_a_full_tmpfs(tiny_model, tmp_path, monkeypatch):
    # Docker's default /dev/shm is 64 MiB: writing past a full tmpfs would kill the process, so the rollout declines.
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(64 << 20, 64 << 20, 1000))
    reason = HFRollout(str(tiny_model), threads=2).share_weights(str(tmp_path / "weights"), create=True)
    assert isinstance(reason, str) and "0 MiB free" in reason and not (tmp_path / "weights").exists()


def test_shared_memory_sync_refuses_a_different_model(tiny_model, tmp_path):
    from workers.weight_transport import Region, SharedWeightWriter

    trainer = PolicyTrainer(str(tiny_model), optim(), RolloutSpec(), threads=2)
    state = trainer.state_dict()
    path = str(tmp_path / "weights")
    size, regions = HFRollout(str(tiny_model), threads=2).share_weights(path, create=True)
    wrong = dict(regions, **{"model.norm.weight": Region(0, "float32", (3,))})
    with pytest.raises(RuntimeError, match=r"model.norm.weight: trainer has torch.float32 \(\d+,\), rollout float32 \(3,\)"):
        SharedWeightWriter(path, size, wrong, state)
    with pytest.raises(RuntimeError, match="lack"):
        SharedWeightWriter(path, size, {k: v for k, v in regions.items() if k != "model.norm.weight"}, state)


def test_dr_grpo_divides_by_the_completion_limit_not_the_longest_response(tiny_model, batch):
    """Dr. GRPO's seq-mean-token-sum-norm: sum_i sum_t loss_it / L / num_seqs with L the maximum
    completion length (rollout.max_new_tokens), whatever the longest response of the step is."""
    limit = 16
    assert batch.response_mask.shape[1] < limit
    adv = (torch.arange(len(batch), dtype=torch.float32)[:, None] + 1) / len(batch) * batch.response_mask
    b = batch.replace(advantages=adv, scores=torch.zeros(len(batch)))
    trainer = PolicyTrainer(str(tiny_model), optim(loss_agg="seq-mean-token-sum-norm"), RolloutSpec(max_new_tokens=limit), threads=2)
    stats = trainer.train_step(b, 1, num_mini_batches=1, micro_batch_size=None, on_policy=True)
    # On-policy the ratio is 1, so each token's loss is -A_t.
    expected = -(adv * b.response_mask).sum().item() / limit / len(b)
    assert stats["policy_loss"] == pytest.approx(expected, rel=1e-5)
    assert stats["policy_loss"] != pytest.approx(-(adv * b.response_mask).sum().item() / b.response_mask.shape[1] / len(b), rel=1e-3)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_gradient_accumulation_equals_full_batch(tiny_model, batch, agg):
    b = with_advantages(batch)
    full = PolicyTrainer(str(tiny_model), optim(loss_agg=agg, grad_clip=None), RolloutSpec(), threads=2)
    accum = PolicyTrainer(str(tiny_model), optim(loss_agg=agg, grad_clip=None), RolloutSpec(), threads=2)
    s_full = full.train_step(b, 1, num_mini_batches=1, micro_batch_size=None, on_policy=True)
    s_acc = accum.train_step(b, 1, num_mini_batches=1, micro_batch_size=2, on_policy=True)
    assert s_full["policy_loss"] == pytest.approx(s_acc["policy_loss"], abs=1e-6)
    assert s_full["grad_norm"] == pytest.approx(s_acc["grad_norm"], rel=1e-4)
    # Gradients, not parameters: Adam's first step is ~lr * sign(g) and amplifies rounding on g ~ 0.
    for (name, p), q in zip(full.model.named_parameters(), accum.model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_off_policy_minibatches_use_behaviour_logprobs(tiny_model, batch):
    trainer = PolicyTrainer(str(tiny_model), optim(ppo_epochs=2), RolloutSpec(), threads=2)
    stats = trainer.train_step(with_advantages(batch), 1, num_mini_batches=3, micro_batch_size=None, on_policy=False)
    # After the first of 6 optimiser steps the policy has moved: ratios leave 1 and some get clipped.
    assert stats["clip_ratio"] > 0


def test_reference_is_frozen(tiny_model):
    ref = Reference(str(tiny_model), threads=2)
    assert not any(p.requires_grad for p in ref.model.parameters())


def test_a_trainer_that_keeps_the_reference_scores_as_the_reference_actor_does(tiny_model, batch):
    ref = Reference(str(tiny_model), threads=2)
    trainer = PolicyTrainer(str(tiny_model), optim(), RolloutSpec(), threads=2, parts=[KeptReference(model_path=str(tiny_model))])
    trainer.train_step(with_advantages(batch), step=1, num_mini_batches=1, micro_batch_size=None, on_policy=True)
    ours, _ = trainer.compute_logprobs(batch)  # after an update: the copy stayed as it was
    theirs, _ = ref.compute_logprobs(batch)
    assert torch.equal(ours, theirs)
    policy = Reference(str(tiny_model), threads=2)
    policy.model.load_state_dict(trainer.state_dict())
    assert not torch.equal(policy.compute_logprobs(batch)[0], theirs)  # (while the trained weights moved)
    with pytest.raises(RuntimeError, match="this trainer has no reference part"):
        PolicyTrainer(str(tiny_model), optim(), RolloutSpec(), threads=2).compute_logprobs(batch)


def test_critic_values_and_update(tiny_model, batch):
    critic = Critic(str(tiny_model), optim(critic_lr=1e-3), threads=2)  # (at 1e-2 Adam overshoots this tiny batch's returns)
    values, _ = critic.compute_values(batch)
    assert values.shape == batch.response_mask.shape
    assert torch.all(values[batch.response_mask == 0] == 0)
    returns = torch.ones_like(values) * batch.response_mask
    b = batch.replace(values=values, returns=returns)
    first = critic.train_step(b, 1, 1, None)["value_loss"]
    for step in range(2, 6):
        last = critic.train_step(b, step, 1, None)["value_loss"]
    assert last < first


def test_a_role_starts_without_importing_scikit_learn_or_scipy(tiny_model):
    """transformers would import scikit-learn (MLflow installs it) and SciPy at every actor's start,
    for a decoding mode and object-detection losses no role uses: about 2 s of CPU each. Reward code
    can still import them."""
    pytest.importorskip("sklearn")
    code = ("import sys; from workers.reference import Reference; Reference(sys.argv[1], threads=1); "
            "unused = {'sklearn', 'scipy'} & {name.split('.')[0] for name in sys.modules}; "
            "assert not unused, f'imported {unused}'; import sklearn, scipy.optimize")
    subprocess.run([sys.executable, "-c", code, str(tiny_model)], check=True, timeout=120)


def test_critic_and_trainer_forwards_are_the_same_in_training_as_when_scoring(tiny_model, batch):
    """Dropout is off in the trained roles (the critic's token head has one): the update's forward
    gives the values and log-probs that scoring (eval mode) gave, so on-policy ratios are 1."""
    critic = Critic(str(tiny_model), optim(), threads=2)
    assert critic.model.dropout.p == 0.0
    values, _ = critic.compute_values(batch)
    critic.model.train()
    with torch.no_grad():
        torch.testing.assert_close(critic._values(batch), values)


def test_reward_builtins_and_import_path(tiny_model, batch, tmp_path, monkeypatch):
    (tmp_path / "myrewards.py").write_text(textwrap.dedent("""
        def starts_with_digit(prompts, completions, answer, **kw):
            assert len(answer) == len(completions)
            return [1.0 if c[:1].isdigit() else 0.0 for c in completions]
        def broken(prompts, completions, **kw):
            raise ValueError("bad reward")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    sources = [
        RewardSource(function="accuracy"),
        RewardSource(function="myrewards:starts_with_digit", name="digit", weight=0.5),
        RewardSource(function="length_penalty", name="len", kwargs={"scale": 0.1}),
    ]
    worker = RewardWorker(sources, str(tiny_model))
    total, per, _ = worker.score(batch)
    assert set(per) == {"accuracy", "digit", "len"}
    torch.testing.assert_close(total, per["accuracy"] + 0.5 * per["digit"] + per["len"])
    with pytest.raises(RewardError, match="'broken' raised ValueError: bad reward"):
        RewardWorker([RewardSource(function="myrewards:broken")], str(tiny_model)).score(batch)
    with pytest.raises(RewardError, match="cannot import reward function 'nope.mod:fn'"):
        RewardWorker([RewardSource(function="nope.mod:fn", name="x")], str(tiny_model))


def test_the_builtin_reward_table_names_the_functions_the_worker_calls():
    """One table (core/algorithms.py BUILTIN_REWARDS) gives the names the spec and the API accept and
    the functions the reward worker imports for them."""
    import workers.rewards

    assert list(BUILTIN_REWARDS) == ["accuracy", "regex_match", "length_penalty"]
    for name, path in BUILTIN_REWARDS.items():
        fn = resolve_function(name)
        assert f"{fn.__module__}:{fn.__name__}" == path and fn is getattr(workers.rewards, path.partition(":")[2])
    with pytest.raises(RewardError, match=r"unknown reward function 'nope': use one of \['accuracy', 'length_penalty', 'regex_match'\] "
                       "or an import path 'pkg.module:fn'"):
        resolve_function("nope")


def test_reward_model_source(tiny_model, batch, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm_dir = tmp_path / "rm"
    AutoModelForSequenceClassification.from_pretrained(str(tiny_model), num_labels=1).save_pretrained(rm_dir)
    AutoTokenizer.from_pretrained(str(tiny_model)).save_pretrained(rm_dir)
    worker = RewardWorker([RewardSource(model=str(rm_dir), name="rm")], str(tiny_model))
    total, per, _ = worker.score(batch)
    assert total.shape == (len(batch),) and torch.isfinite(total).all()
    assert len(set(total.tolist())) > 1  # different completions, different scores


def test_builtin_accuracy_reads_the_first_number():
    from workers.rewards import accuracy, regex_match

    assert accuracy([""] * 3, ["12", " 12 and 5", "x"], answer=[12, 12, 12]) == [1.0, 1.0, 0.0]
    assert accuracy([""], ["7 then 12"], answer=[12], position="last") == [1.0]
    assert regex_match([""] * 2, ["42", "42x"], pattern=r"-?\d+", full=True) == [1.0, 0.0]


def test_a_missing_model_directory_fails_at_once_naming_the_field(tiny_model, arith_file, tmp_path, monkeypatch):
    """Not a hub lookup with retries ending in "check your internet connection" (half a minute here):
    the driver's preflight names the field and the directory before any actor starts."""
    from orchestrator.core.spec import parse_spec
    from orchestrator.stages.pipeline import preflight
    from tests.conftest import tiny_spec
    from workers.common import ModelLoadError, check_model_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    spec = parse_spec(tiny_spec(tiny_model, arith_file, tmp_path / "run", model={"path": "runs/nope-model"}))
    with pytest.raises(ModelLoadError, match=rf"^model\.path='runs/nope-model': no such model directory \({tmp_path}/runs/nope-model\)$"):
        preflight(spec)
    spec = parse_spec(tiny_spec(tiny_model, arith_file, tmp_path / "run", algorithm={"name": "ppo"}, model={"critic_path": "/nope/critic"}))
    with pytest.raises(ModelLoadError, match=r"^model\.critic_path='/nope/critic': no such model directory \(/nope/critic\)$"):
        preflight(spec)
    for path in ("./nope", "/abs/nope", "~/nope", "a/b/c", "runs/nope-model"):
        with pytest.raises(ModelLoadError, match=r"no such model directory \(/.*nope.*\)$|no such model directory \(/.*a/b/c\)$"):
            check_model_path(path, "model.path")
    check_model_path(str(tiny_model), "model.path")
    # An id the hub could hold is asked for once, not retried: it has none, or cannot be reached from here.
    with pytest.raises(ModelLoadError, match=r"^model\.path='nope-org/nope-model': no such model directory .*, and the model hub "):
        check_model_path("nope-org/nope-model", "model.path", ask_hub=True)
    # With the hub off, any missing model fails and says why.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=r"^model\.path='nope-org/nope-model': .*, and the model hub is off \(HF_HUB_OFFLINE\)$"):
        check_model_path("nope-org/nope-model", "model.path", ask_hub=True)
