"""Learning from preferences: the Bradley-Terry and DPO-family losses against hand computation, the
preference data formats, the spec's rules for `rm` / `dpo` stages and `stage:NAME` reward models,
and both trainers without Ray. CPU only, a few seconds; the Ray runs are in test_preference_e2e.py."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.testing import assert_close

from orchestrator.core import algos, checkpoint
from orchestrator.core.algorithms import ALGORITHMS
from orchestrator.core.data import DataError, load_preference, preference_batch
from orchestrator.core.spec import SpecError, parse_spec
from tests.conftest import tiny_spec

F64 = torch.float64
EXACT = {"rtol": 1e-12, "atol": 1e-12}


def t64(x) -> torch.Tensor:
    return torch.tensor(x, dtype=F64)


def softplus(x: float) -> float:
    """-log sigmoid(-x) = log(1 + e^x), written out."""
    return math.log(1 + math.exp(x))


# ---------------------------------------------------------------- losses


def test_sequence_logprobs_sum_over_the_mask():
    logprobs = t64([[-1.0, -2.0, -3.0], [-4.0, -9.0, -9.0]])
    mask = t64([[1, 1, 1], [1, 0, 0]])
    assert_close(algos.sequence_logprobs(logprobs, mask), t64([-6.0, -4.0]), **EXACT)


def test_bradley_terry_by_hand():
    chosen, rejected = t64([2.0, 0.0, 1.0]), t64([1.0, 0.0, 3.0])
    # -log sigmoid(d) = log(1 + e^-d) with d = r_c - r_r: 1, 0, -2.
    expected = [softplus(-1.0), math.log(2), softplus(2.0)]
    assert_close(algos.bradley_terry_loss(chosen, rejected), t64(expected), **EXACT)
    # A margin of 0.5 on the first pair asks for a gap of 0.5 more: d = 0.5.
    with_margin = algos.bradley_terry_loss(chosen, rejected, t64([0.5, 0.0, 0.0]))
    assert_close(with_margin, t64([softplus(-0.5), math.log(2), softplus(2.0)]), **EXACT)


# Two pairs. Pair 0: policy log-ratios +1 (chosen) and -1 (rejected), so h = 2.
# Pair 1: the policy prefers the rejected one: ratios -0.5 and +0.5, h = -1.
PAIRS = dict(chosen_logps=t64([-1.0, -2.5]), rejected_logps=t64([-3.0, -1.5]),
             ref_chosen_logps=t64([-2.0, -2.0]), ref_rejected_logps=t64([-2.0, -2.0]))
ONE_TOKEN = (t64([1.0, 1.0]), t64([1.0, 1.0]))  # completion lengths: IPO's averages are the sums


@pytest.mark.parametrize("loss_type, beta, eps, expected", [
    # sigmoid: -log sigmoid(beta h) = log(1 + e^(-beta h)); beta h = 1 and -0.5.
    ("sigmoid", 0.5, 0.0, [softplus(-1.0), softplus(0.5)]),
    # conservative DPO: (1 - eps) log(1 + e^(-beta h)) + eps log(1 + e^(beta h)).
    ("sigmoid", 0.5, 0.1, [0.9 * softplus(-1.0) + 0.1 * softplus(1.0), 0.9 * softplus(0.5) + 0.1 * softplus(-0.5)]),
    # IPO: (h - 1 / (2 beta))^2 with 1 / (2 * 0.5) = 1: (2 - 1)^2 and (-1 - 1)^2.
    ("ipo", 0.5, 0.0, [1.0, 4.0]),
    # ... and with beta 0.1 the target margin is 5: (2 - 5)^2 and (-1 - 5)^2.
    ("ipo", 0.1, 0.0, [9.0, 36.0]),
    # hinge: max(0, 1 - beta h): 1 - 1 = 0 and 1 + 0.5.
    ("hinge", 0.5, 0.0, [0.0, 1.5]),
    ("hinge", 0.25, 0.0, [0.5, 1.25]),
])
def test_dpo_losses_by_hand(loss_type, beta, eps, expected):
    losses, chosen, rejected = algos.dpo_loss(**PAIRS, beta=beta, loss_type=loss_type, label_smoothing=eps, lengths=ONE_TOKEN)
    assert_close(losses, t64(expected), **EXACT)
    # Implicit rewards beta * (log pi - log ref), whatever the loss.
    assert_close(chosen, t64([beta * 1.0, beta * -0.5]), **EXACT)
    assert_close(rejected, t64([beta * -1.0, beta * 0.5]), **EXACT)


def test_ipo_averages_its_margin_over_lengths_but_its_rewards_are_on_sums_as_trl():
    # One pair: the chosen completion has 4 tokens and log-ratio +2 in all (+0.5 per token), the
    # rejected one 1 token and +1.5. TRL's IPO loss takes the averaged margin h' = 0.5 - 1.5 = -1:
    # (h' - 1 / (2 beta))^2 = (-1 - 1)^2 = 4 at beta 0.5. Its `rewards/*` are beta times the summed
    # log-ratios: 1.0 and 0.75, chosen ahead (accuracy 1), where averaged ones (0.25, 0.75) would flip it.
    losses, chosen, rejected = algos.dpo_loss(t64([-6.0]), t64([-0.5]), t64([-8.0]), t64([-2.0]), beta=0.5,
                                              loss_type="ipo", lengths=(t64([4.0]), t64([1.0])))
    assert_close(losses, t64([4.0]), **EXACT)
    assert_close((chosen, rejected), (t64([1.0]), t64([0.75])), **EXACT)
    assert (chosen > rejected).all()


def test_ipo_without_lengths_is_refused():
    with pytest.raises(ValueError, match="ipo loss averages each log-ratio over its completion: pass lengths"):
        algos.dpo_loss(**PAIRS, loss_type="ipo")


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    chosen, rejected = t64([-2.0]).requires_grad_(), t64([-2.0]).requires_grad_()
    losses, rc, _ = algos.dpo_loss(chosen, rejected, t64([-2.0]), t64([-2.0]), beta=0.1)
    losses.sum().backward()
    # At h = 0: d/d logp_c of -log sigmoid(beta h) = -beta / 2.
    assert_close(chosen.grad, t64([-0.05]), **EXACT)
    assert_close(rejected.grad, t64([0.05]), **EXACT)
    assert not rc.requires_grad  # the rewards are metrics


def test_unknown_dpo_loss_is_named():
    with pytest.raises(ValueError, match="unknown DPO loss 'kto'"):
        algos.dpo_loss(**PAIRS, loss_type="kto")


# ---------------------------------------------------------------- data


@pytest.fixture(scope="module")
def tok(tiny_model):
    from workers.common import load_tokenizer

    return load_tokenizer(str(tiny_model))


def data_spec(**overrides):
    return parse_spec({"model": {"path": "m"}, "algorithm": {"name": "dpo"}, "data": {"train_file": "d.jsonl", **overrides}}).data


def write(tmp_path, rows, name="prefs.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def decoded(tok, ds, i):
    return tok.decode(ds.prompt_ids[i]), tok.decode(ds.chosen_ids[i]), tok.decode(ds.rejected_ids[i])


def test_explicit_and_implicit_text_prompts(tmp_path, tok):
    rows = [{"prompt": "2+2=", "chosen": "4", "rejected": "5", "margin": 1.5},
            {"chosen": "The sky is blue.", "rejected": "The sky is green."}]
    ds = load_preference(write(tmp_path, rows), tok, data_spec())
    eos = tok.eos_token
    assert decoded(tok, ds, 0) == ("2+2=", "4" + eos, "5" + eos)
    # TRL's implicit prompt: the shared start, backed up to the space, which the completions keep.
    assert decoded(tok, ds, 1) == ("The sky is", " blue." + eos, " green." + eos)
    assert ds.margins == [1.5, 0.0] and (ds.pad_id, ds.eos_id) == (tok.pad_token_id, tok.eos_token_id)


def test_explicit_and_implicit_chat_prompts(tmp_path, tok):
    user = {"role": "user", "content": "2+2="}
    good, bad = {"role": "assistant", "content": "4"}, {"role": "assistant", "content": "5"}
    rows = [{"prompt": [user], "chosen": [good], "rejected": [bad]}, {"chosen": [user, good], "rejected": [user, bad]}]
    ds = load_preference(write(tmp_path, rows), tok, data_spec())
    for i in range(2):
        prompt, chosen, rejected = decoded(tok, ds, i)
        assert prompt == "<|im_start|>user\n2+2=<|im_end|>\n<|im_start|>assistant\n"
        assert (chosen, rejected) == ("4<|im_end|>\n<|endoftext|>", "5<|im_end|>\n<|endoftext|>")


def test_parquet_and_saved_datasets_read_the_same(tmp_path, tok):
    import datasets

    rows = [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}, {"prompt": "1+2=", "chosen": "3", "rejected": "4"}]
    from_jsonl = load_preference(write(tmp_path, rows), tok, data_spec())
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "p.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    for path in (tmp_path / "p.parquet", tmp_path / "saved"):
        ds = load_preference(path, tok, data_spec())
        assert (ds.prompt_ids, ds.chosen_ids, ds.rejected_ids) == (from_jsonl.prompt_ids, from_jsonl.chosen_ids, from_jsonl.rejected_ids)


@pytest.mark.parametrize("row, message", [
    ({"prompt": "1+1=", "chosen": "2"}, r"prefs.jsonl:2: preference rows need 'chosen' and 'rejected'.*missing \['rejected'\]"),
    ({"prompt": "1+1=", "chosen": "2", "rejected": "3", "margin": "big"}, r"prefs.jsonl:2: 'margin' must be a number"),
    ({"chosen": "2", "rejected": "3"}, r"prefs.jsonl:2: no 'prompt' column, and 'chosen' and 'rejected' share no start"),
    ({"chosen": "1+1=2", "rejected": [{"role": "assistant", "content": "3"}]}, r"prefs.jsonl:2: 'chosen' and 'rejected' must both be strings"),
    ({"chosen": "1+1=2", "rejected": "1+1=2!"}, r"prefs.jsonl:2: empty 'chosen' completion once the shared start is taken"),
    ({"prompt": "1+1=", "chosen": 2, "rejected": "3"}, r"prefs.jsonl:2: 'chosen' must be a string or a list of messages"),
    ('{"prompt": "1+1=", ', r"prefs.jsonl:2: malformed JSON"),
])
def test_a_bad_row_is_named_by_file_and_line(tmp_path, tok, row, message):
    path = write(tmp_path, [{"prompt": "0+1=", "chosen": "1", "rejected": "2"}, row])
    with pytest.raises(DataError, match=message):
        load_preference(path, tok, data_spec())


def test_overlong_pairs_follow_overlong_prompt(tmp_path, tok):
    rows = [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}, {"prompt": "1+1=", "chosen": "2", "rejected": "333333"}]
    path = write(tmp_path, rows)
    assert len(load_preference(path, tok, data_spec(max_completion_length=4, overlong_prompt="drop"))) == 1
    with pytest.raises(DataError, match="prefs.jsonl:2: example longer than"):
        load_preference(path, tok, data_spec(max_completion_length=4, overlong_prompt="error"))
    cut = load_preference(path, tok, data_spec(max_completion_length=4))
    assert tok.decode(cut.rejected_ids[1]) == "3333"  # cut to 4 tokens, the EOS among the ones cut


def test_a_batch_of_pairs_alternates_chosen_and_rejected(tmp_path, tok):
    rows = [{"prompt": "12+1=", "chosen": "13", "rejected": "14", "margin": 2}, {"prompt": "1+1=", "chosen": "2", "rejected": "333"}]
    ds = load_preference(write(tmp_path, rows), tok, data_spec())
    batch = preference_batch(ds, [1, 0])
    assert batch.group_ids.tolist() == [0, 0, 1, 1] and [e["margin"] for e in batch.extras] == [0.0, 2.0]
    texts = [tok.decode(r[m.bool()]) for r, m in zip(batch.responses, batch.response_mask)]
    eos = tok.eos_token
    assert texts == ["2" + eos, "333" + eos, "13" + eos, "14" + eos]
    assert tok.decode(batch.input_ids[0][batch.attention_mask[0].bool()]) == "1+1=2" + eos
    # What a reward model scores: the text, no EOS.
    plain = preference_batch(ds, [1, 0], with_eos=False)
    assert tok.decode(plain.input_ids[1][plain.attention_mask[1].bool()]) == "1+1=333"
    assert plain.response_mask.sum(1).tolist() == [1, 3, 2, 2]
    # Data-parallel shards (an even number of pairs per replica, as the spec requires) keep each pair whole.
    assert [(s.group_ids.tolist(), [e["margin"] for e in s.extras]) for s in batch.split(2)] == [([0, 0], [0.0]), ([0, 0], [2.0])]


# ---------------------------------------------------------------- spec and table


def base(**sections) -> dict:
    spec = {"model": {"path": "m"}, "data": {"train_file": "d.jsonl"}}
    return {**spec, **sections}


def test_rm_and_dpo_rows_of_the_table():
    rm, dpo = ALGORITHMS["rm"], ALGORITHMS["dpo"]
    assert (rm.data, rm.eval_data, rm.produces, rm.reference) == ("preference", "preference", "reward_model", False)
    assert (dpo.data, dpo.eval_data, dpo.produces, dpo.reference) == ("preference", "preference", "policy", True)
    # Held-out pairs are scored by the trainer: no rollout or reward actors, even with an eval file.
    assert rm.roles(kl_coef=0.1, evaluates=True) == ["trainer"]
    assert dpo.roles(kl_coef=0.0, evaluates=True) == ["trainer", "reference"]


def test_preference_jobs_need_no_rewards_and_place_their_roles():
    from orchestrator.runtime.placement import plan

    rm = parse_spec(base(algorithm={"name": "rm"}))
    dpo = parse_spec(base(algorithm={"name": "dpo", "loss_type": "ipo", "beta": 0.2}))
    assert rm.rewards == [] and plan(rm).slots == {"trainer": [0]}
    assert plan(dpo).slots == {"trainer": [0], "reference": [1]} and dpo.needs_reference
    assert (dpo.algorithm.loss_type, dpo.algorithm.beta, dpo.algorithm.label_smoothing) == ("ipo", 0.2, 0.0)
    with pytest.raises(SpecError, match="rewards: grpo scores its completions with the rewards"):
        parse_spec(base())


@pytest.mark.parametrize("algorithm, where", [
    ({"name": "dpo", "beta": 0}, "algorithm.beta"),
    ({"name": "dpo", "label_smoothing": 0.5}, "algorithm.label_smoothing"),
    ({"name": "dpo", "loss_type": "ipo", "label_smoothing": 0.1}, "label_smoothing smooths the sigmoid loss"),
    ({"name": "dpo", "loss_type": "kto"}, "algorithm.loss_type"),
])
def test_bad_dpo_settings_name_the_field(algorithm, where):
    with pytest.raises(SpecError, match=where):
        parse_spec(base(algorithm=algorithm))


def pipeline(tmp_path, ppo_rewards, rm_name="rm") -> dict:
    spec = tiny_spec(tmp_path / "m", tmp_path / "d.jsonl", tmp_path / "run")
    spec["stages"] = [
        {"name": "sft", "algorithm": {"name": "sft"}},
        {"name": rm_name, "algorithm": {"name": "rm"}, "data": {"train_file": "prefs.jsonl"}},
        {"name": "ppo", "algorithm": {"name": "ppo"}, "rewards": ppo_rewards},
    ]
    return spec


def test_a_stage_names_an_earlier_stages_reward_model(tmp_path):
    spec = parse_spec(pipeline(tmp_path, [{"model": "stage:rm"}, {"function": "accuracy", "weight": 0.5}]))
    (_, sft), (_, rm), (_, ppo) = spec.stage_specs()
    assert ppo.rewards[0].stage == "rm" and ppo.rewards[0].label == "rm" and ppo.rewards[1].stage is None
    assert rm.rewards == sft.rewards  # the job's, unused by the rm stage


def test_sft_then_dpo_is_one_spec(tmp_path):
    spec = tiny_spec(tmp_path / "m", tmp_path / "d.jsonl", tmp_path / "run")
    del spec["rewards"]
    spec["stages"] = [{"name": "sft", "algorithm": {"name": "sft"}},
                      {"name": "dpo", "algorithm": {"name": "dpo", "beta": 0.3}, "data": {"train_file": "prefs.jsonl"}}]
    (_, sft), (_, dpo) = parse_spec(spec).stage_specs()
    assert (sft.roles, dpo.roles, dpo.data.train_file, dpo.algorithm.beta) == (["trainer"], ["trainer", "reference"], "prefs.jsonl", 0.3)
    assert sft.algo.produces == dpo.algo.produces == "policy"  # DPO starts from the SFT policy, and hands its own on


@pytest.mark.parametrize("rewards, message", [
    ([{"model": "stage:nope"}], r"stages.2 \(ppo\): rewards.0.model: 'stage:nope' names no earlier stage that trains a reward model"),
    ([{"function": "accuracy"}, {"model": "stage:sft"}], r"stages.2 \(ppo\): rewards.1.model: 'stage:sft' names no earlier"),
])
def test_a_bad_stage_reference_names_the_field(tmp_path, rewards, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(pipeline(tmp_path, rewards))


def test_a_reference_to_a_later_stage_is_refused(tmp_path):
    spec = pipeline(tmp_path, [{"model": "stage:rm"}])
    spec["stages"][0]["rewards"] = [{"model": "stage:rm"}]  # the sft stage comes before rm
    with pytest.raises(SpecError, match=r"stages.0 \(sft\): rewards.0.model: 'stage:rm' names no earlier stage"):
        parse_spec(spec)


def test_a_stage_reference_needs_stages():
    with pytest.raises(SpecError, match=r"rewards.0.model: 'stage:rm' names a stage, but the job has no stages"):
        parse_spec(base(rewards=[{"model": "stage:rm"}]))


def test_stage_models_resolve_to_the_final_reward_model(tmp_path):
    from orchestrator.stages.pipeline import Stage, with_stage_models
    from workers.common import ModelLoadError

    spec = parse_spec(pipeline(tmp_path, [{"model": "stage:rm"}, {"function": "accuracy"}]))
    stages = [Stage(name, i, s, None, None, 3 * i + 1, 3 * i + 3) for i, (name, s) in enumerate(spec.stage_specs())]
    with pytest.raises(ModelLoadError, match=r"stages.2 \(ppo\): rewards.0.model: 'stage:rm' is stage rm's final reward model, but .*step_000006"):
        with_stage_models(stages[2], stages)
    final = checkpoint.step_dir(spec.checkpoint_dir, 6) / "reward_model"
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")
    resolved = with_stage_models(stages[2], stages).spec.rewards
    assert (resolved[0].model, resolved[0].label) == (str(final), "rm") and resolved[1] == stages[2].spec.rewards[1]
    assert with_stage_models(stages[1], stages) is stages[1]  # nothing to resolve


def test_pinned_checkpoints_outlive_keep_last(tmp_path):
    for step in (1, 2, 3, 4):
        d = checkpoint.step_dir(tmp_path, step)
        d.mkdir()
        (d / "state.json").write_text("{}")
    checkpoint.pin(checkpoint.step_dir(tmp_path, 2), "stage rm's final")
    checkpoint.pin(checkpoint.step_dir(tmp_path, 9), "not there: nothing happens")
    checkpoint.prune(tmp_path, keep_last=1)
    assert [p.name for p in checkpoint.complete(tmp_path)] == ["step_000002", "step_000004"]


# ---------------------------------------------------------------- the trainers, without Ray


@pytest.fixture(scope="module")
def pairs(tiny_model, tok, tmp_path_factory):
    rows = [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)} for a in range(4) for b in range(2)]
    return load_preference(write(tmp_path_factory.mktemp("prefs"), rows), tok, data_spec())


def optim(**kw):
    return parse_spec(base(algorithm={"name": "rm"}, optim={"lr": 1e-3, "seed": 0, **kw})).optim


def test_reward_trainer_steps_and_saves_a_model_reward_sources_load(tiny_model, tok, pairs, tmp_path):
    from workers.reward import RewardModel
    from workers.rm import RewardTrainer, pair_rewards

    trainer = RewardTrainer(str(tiny_model), optim(), threads=1)
    batch = preference_batch(pairs, list(range(8)), with_eos=False)
    # Micro-batches of 3 pairs (3 + 3 + 2) accumulate to the whole batch's step.
    stats = [trainer.rm_step(batch, step, micro_batch_size=3) for step in (1, 2, 3)]
    assert all(math.isfinite(s[k]) for s in stats for k in ("loss", "accuracy", "margin", "rewards/chosen", "rewards/rejected", "grad_norm"))
    assert_close(stats[0]["margin"], stats[0]["rewards/chosen"] - stats[0]["rewards/rejected"])
    with torch.no_grad():
        chosen, rejected = pair_rewards(trainer.model, batch)
    # The step's loss is the mean Bradley-Terry loss of the (pre-step) pairs; check the last step's eval by hand.
    evaluated = trainer.rm_eval(batch, None)
    assert_close(evaluated["loss"], algos.bradley_terry_loss(chosen, rejected).mean().item(), rtol=1e-5, atol=1e-6)
    assert_close(evaluated["accuracy"], (chosen > rejected).float().mean().item())

    trainer.save(str(tmp_path))
    tok.save_pretrained(tmp_path / "reward_model")  # the driver adds the tokenizer
    rm = RewardModel(str(tmp_path / "reward_model"), "float32", False, torch.device("cpu"))
    texts = [tok.decode(r[m.bool()]) for r, m in zip(batch.input_ids, batch.attention_mask)]
    prompts = [f"{a}+{b}=" for a in range(4) for b in range(2) for _ in range(2)]
    scores = torch.tensor(rm(prompts, [t[len(p):] for t, p in zip(texts, prompts)]))
    # The reward source scores a completion as the trainer did.
    assert_close(scores[0::2], chosen, rtol=1e-4, atol=1e-5)
    assert_close(scores[1::2], rejected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("loss_type, at_start", [("sigmoid", math.log(2)), ("ipo", (1 / (2 * 0.1)) ** 2), ("hinge", 1.0)])
def test_dpo_trainer_starts_at_the_reference(tiny_model, pairs, loss_type, at_start):
    from workers.common import response_logprobs
    from workers.dpo import DPOTrainer
    from workers.reference import Reference

    spec = parse_spec(base(algorithm={"name": "dpo", "loss_type": loss_type, "beta": 0.1}, optim={"lr": 1e-3, "seed": 0}))
    trainer = DPOTrainer(str(tiny_model), spec.optim, spec.rollout, threads=1)
    batch = preference_batch(pairs, list(range(8)))
    ref, _ = Reference(str(tiny_model), threads=1).compute_logprobs(batch)
    batch = batch.replace(ref_logprobs=ref)
    # Policy = reference: every log-ratio is 0, so h = 0 and the loss is its value at 0.
    first = trainer.dpo_step(batch, 1, 4, spec.algorithm)
    assert_close(first["loss"], at_start, rtol=1e-4, atol=1e-4)
    assert abs(first["rewards/margins"]) < 1e-4 and first["rewards/accuracies"] == 0.0
    # TRL's `logps/*`, whatever the loss: each completion's summed log-probs (here the reference's), averaged over pairs.
    summed = algos.sequence_logprobs(ref, batch.response_mask)
    assert_close((first["logps/chosen"], first["logps/rejected"]), (summed[0::2].mean().item(), summed[1::2].mean().item()),
                 rtol=1e-5, atol=1e-5)
    second = trainer.dpo_step(batch, 2, None, spec.algorithm)
    assert second["loss"] < first["loss"] and second["rewards/margins"] > 0  # one step towards the chosen ones
    held_out = trainer.dpo_eval(batch, None, spec.algorithm)
    assert set(held_out) == {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"}
    # ... and TRL's `rewards/*`: beta times the summed log-ratios to the reference, of the trained policy.
    with torch.no_grad():
        policy = algos.sequence_logprobs(response_logprobs(trainer.model, batch)[0], batch.response_mask)
    rewards = 0.1 * (policy - summed)
    assert_close((held_out["rewards/chosen"], held_out["rewards/rejected"]), (rewards[0::2].mean().item(), rewards[1::2].mean().item()),
                 rtol=1e-4, atol=1e-5)
    assert held_out["rewards/accuracies"] == (rewards[0::2] > rewards[1::2]).float().mean().item()
