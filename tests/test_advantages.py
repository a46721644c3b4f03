"""`orchestrator.core.advantages.compute_advantages` on one tiny scored Batch, against values worked
out by hand: the spec picks the estimator, `norm_adv_by_std`, and whether (and by which estimator)
the KL penalty is folded into the rewards. CPU only."""

import math
import statistics

import pytest
import torch
from torch.testing import assert_close

from orchestrator.core.advantages import compute_advantages
from orchestrator.core.batch import Batch
from orchestrator.core.spec import parse_spec

F64 = torch.float64
TIGHT = {"rtol": 1e-10, "atol": 1e-12}
GRPO = {"rtol": 1e-5, "atol": 1e-6}  # grpo adds eps = 1e-6 to the group std
WHITEN = {"rtol": 1e-6, "atol": 1e-7}  # masked_whiten adds eps = 1e-8 to the variance
PAD = 9.0  # garbage at padding positions: none of it may reach a result

# Two prompts, two samples each; response lengths 3, 2, 1, 3.
MASK = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=F64)
SCORES = [1.0, 0.0, 3.0, 1.0]  # group 0: (1, 0); group 1: (3, 1)
# k1 = logp - ref_logp per token: row 0 (0.5, 0, 0), row 2 (1), 0 elsewhere on the response.
LOGPROBS = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -1.0, 0.0], [-1.0, 0.0, 0.0], [-1.0, -1.0, -1.0]], dtype=F64)
REF_LOGPROBS = torch.tensor([[-1.5, -1.0, -1.0], [-1.0, -1.0, -PAD], [-2.0, -PAD, -PAD], [-1.0, -1.0, -1.0]], dtype=F64)
VALUES = torch.tensor([[0.5, 0.5, 0.5], [0.2, 0.4, PAD], [1.0, PAD, PAD], [0.0, 0.5, 1.0]], dtype=F64)


def batch(with_ref: bool = False, with_values: bool = False) -> Batch:
    return Batch(
        input_ids=torch.arange(16).reshape(4, 4),
        attention_mask=torch.cat([torch.ones(4, 1, dtype=torch.long), MASK.long()], 1),
        response_mask=MASK,
        group_ids=torch.tensor([0, 0, 1, 1]),
        prompt_len=1,
        logprobs=LOGPROBS if with_ref else None,
        ref_logprobs=REF_LOGPROBS if with_ref else None,
        values=VALUES if with_values else None,
        scores=torch.tensor(SCORES, dtype=F64),
    )


def spec(algorithm: dict | None = None, **optim):
    return parse_spec({
        "model": {"path": "m"}, "data": {"train_file": "d.jsonl"}, "rewards": [{"function": "accuracy"}],
        "algorithm": algorithm or {"name": "grpo"}, "rollout": {"n": 2}, "optim": {"prompts_per_step": 2, **optim},
    })


def per_sample(values: list[float]) -> torch.Tensor:
    """One advantage per sample, on each of its response tokens."""
    return torch.tensor(values, dtype=F64)[:, None] * MASK


def whiten_by_hand(rows: list[list[float]]) -> torch.Tensor:
    """(x - mean) / stdev over the response tokens (given row by row, unpadded), 0 on padding."""
    flat = [x for row in rows for x in row]
    mean, std = statistics.fmean(flat), statistics.stdev(flat)
    return torch.tensor([[(x - mean) / std for x in row] + [0.0] * (3 - len(row)) for row in rows], dtype=F64)


R = 1 / math.sqrt(2)  # a group of two, std-normalised: +-(d/2) / (d/sqrt(2))


@pytest.mark.parametrize(("algorithm", "expected", "tol"), [
    ({"name": "grpo"}, [R, -R, R, -R], GRPO),
    # Dr. GRPO, either way it is asked for: r - group mean (group means 0.5 and 2).
    ({"name": "grpo", "norm_adv_by_std": False}, [0.5, -0.5, 1.0, -1.0], TIGHT),
    ({"name": "grpo", "advantage_estimator": "dr_grpo"}, [0.5, -0.5, 1.0, -1.0], TIGHT),
    # RLOO: r - the other sample's score.
    ({"name": "grpo", "advantage_estimator": "rloo"}, [1.0, -1.0, 2.0, -2.0], TIGHT),
], ids=["grpo", "grpo-no-std", "dr_grpo", "rloo"])
def test_outcome_estimators(algorithm, expected, tol):
    out = compute_advantages(batch(), spec(algorithm))
    assert_close(out.advantages, per_sample(expected), **tol)
    assert out.token_rewards is None and out.returns is None


def test_grpo_std_eps_is_the_specs():
    # Groups (1, 0) and (3, 1): deviations +-0.5 and +-1, stds 1/sqrt(2) and sqrt(2); eps 0.25 as asked.
    out = compute_advantages(batch(), spec({"name": "grpo", "adv_std_eps": 0.25}))
    a, b = 0.5 / (R + 0.25), 1.0 / (math.sqrt(2) + 0.25)
    assert_close(out.advantages, per_sample([a, -a, b, -b]), **TIGHT)
    # The default stays 1e-6, so the same seed gives the same metrics as before the setting existed (TRL: 1e-4).
    assert spec().algorithm.adv_std_eps == 1e-6


@pytest.mark.parametrize("eps, bound", [(0, "greater than 0"), (-1e-4, "greater than 0"), (2, "less than or equal to 1")])
def test_a_bad_std_eps_names_the_field(eps, bound):
    from orchestrator.core.spec import SpecError

    with pytest.raises(SpecError, match=f"algorithm.adv_std_eps: .*{bound}"):
        spec({"name": "grpo", "adv_std_eps": eps})


def test_kl_in_reward_is_subtracted_from_each_score():
    # r_i - beta * sum_t k1_t with beta = 0.5: (1 - 0.25, 0, 3 - 0.5, 1); RLOO then gives +-0.75, +-1.5.
    s = spec({"name": "grpo", "advantage_estimator": "rloo"}, kl_coef=0.5, kl_in="reward", kl_estimator="k1")
    assert_close(compute_advantages(batch(with_ref=True), s).advantages, per_sample([0.75, -0.75, 1.5, -1.5]), **TIGHT)


def test_kl_in_reward_uses_the_specs_estimator():
    # k2 = (log r)^2 / 2: row 0 sums to 0.125, row 2 to 0.5; scores (0.9375, 0, 2.75, 1).
    s = spec({"name": "grpo", "advantage_estimator": "rloo"}, kl_coef=0.5, kl_in="reward", kl_estimator="k2")
    assert_close(compute_advantages(batch(with_ref=True), s).advantages, per_sample([0.9375, -0.9375, 1.75, -1.75]), **TIGHT)


def test_kl_in_loss_leaves_the_scores_alone():
    s = spec({"name": "grpo", "advantage_estimator": "rloo"}, kl_coef=0.5, kl_in="loss", kl_estimator="k1")
    assert_close(compute_advantages(batch(with_ref=True), s).advantages, per_sample([1.0, -1.0, 2.0, -2.0]), **TIGHT)


def test_reinforce_pp_whitens_the_returns_over_the_batch():
    out = compute_advantages(batch(), spec({"name": "grpo", "advantage_estimator": "reinforce_pp"}))
    # The score sits on the last response token; with gamma = 1 every token's return is the score.
    assert_close(out.token_rewards, torch.tensor([[0, 0, 1.0], [0, 0, 0], [3.0, 0, 0], [0, 0, 1.0]], dtype=F64), **TIGHT)
    # Returns 1,1,1 | 0,0 | 3 | 1,1,1: mean 1, unbiased var 6/8, so (x - 1) / sqrt(3/4).
    s = math.sqrt(0.75)
    expected = torch.tensor([[0, 0, 0], [-1 / s, -1 / s, 0], [2 / s, 0, 0], [0, 0, 0]], dtype=F64)
    assert_close(out.advantages, expected, **WHITEN)
    assert out.returns is None


def test_reinforce_pp_with_kl_in_reward_and_discount():
    s = spec({"name": "grpo", "advantage_estimator": "reinforce_pp"}, kl_coef=0.5, kl_in="reward", kl_estimator="k1", gamma=0.5)
    out = compute_advantages(batch(with_ref=True), s)
    # r_t = score on the last token - 0.5 * k1_t: row 0 (-0.25, 0, 1), row 2 (3 - 0.5).
    assert_close(out.token_rewards, torch.tensor([[-0.25, 0, 1.0], [0, 0, 0], [2.5, 0, 0], [0, 0, 1.0]], dtype=F64), **TIGHT)
    # G_t = r_t + 0.5 G_{t+1}: row 0 (-0.25 + 0.5 * 0.5, 0.5, 1) = (0, 0.5, 1); row 3 (0.25, 0.5, 1).
    assert_close(out.advantages, whiten_by_hand([[0.0, 0.5, 1.0], [0.0, 0.0], [2.5], [0.25, 0.5, 1.0]]), **WHITEN)


def test_gae_with_values():
    out = compute_advantages(batch(with_values=True), spec({"name": "ppo"}, gamma=1.0, lam=0.5))
    # delta_t = r_t + V_{t+1} - V_t (V = 0 past the last token), A_t = delta_t + 0.5 A_{t+1}:
    #   row 0: V (.5, .5, .5), r (0, 0, 1): deltas (0, 0, .5)     -> A (.125, .25, .5)
    #   row 1: V (.2, .4),     r (0, 0):    deltas (.2, -.4)      -> A (0, -.4)
    #   row 2: V (1),          r (3):       delta 2               -> A (2)
    #   row 3: V (0, .5, 1),   r (0, 0, 1): deltas (.5, .5, 0)    -> A (.75, .5, 0)
    # Returns are the raw A + V; advantages are A whitened over all nine response tokens.
    returns = torch.tensor([[0.625, 0.75, 1.0], [0.2, 0.0, 0.0], [3.0, 0.0, 0.0], [0.75, 1.0, 1.0]], dtype=F64)
    assert_close(out.returns, returns, **TIGHT)
    assert_close(out.advantages, whiten_by_hand([[0.125, 0.25, 0.5], [0.0, -0.4], [2.0], [0.75, 0.5, 0.0]]), **WHITEN)
    assert_close(out.token_rewards, torch.tensor([[0, 0, 1.0], [0, 0, 0], [3.0, 0, 0], [0, 0, 1.0]], dtype=F64), **TIGHT)


def test_gae_with_kl_in_reward():
    s = spec({"name": "ppo"}, kl_coef=0.5, kl_in="reward", kl_estimator="k1", gamma=1.0, lam=0.5)
    out = compute_advantages(batch(with_ref=True, with_values=True), s)
    # Row 0: r (-0.25, 0, 1), deltas (-.25, 0, .5) -> A (-.125, .25, .5), R = A + V = (.375, .75, 1).
    # Row 2: r (2.5), delta 1.5 -> A 1.5, R 2.5. Rows 1 and 3 carry no KL: as without it.
    returns = torch.tensor([[0.375, 0.75, 1.0], [0.2, 0.0, 0.0], [2.5, 0.0, 0.0], [0.75, 1.0, 1.0]], dtype=F64)
    assert_close(out.returns, returns, **TIGHT)
    assert_close(out.advantages, whiten_by_hand([[-0.125, 0.25, 0.5], [0.0, -0.4], [1.5], [0.75, 0.5, 0.0]]), **WHITEN)


def test_the_input_batch_is_not_changed():
    b = batch(with_ref=True, with_values=True)
    out = compute_advantages(b, spec({"name": "ppo"}, kl_coef=0.5, kl_in="reward"))
    assert b.advantages is None and b.returns is None and b.token_rewards is None
    assert out.returns.shape == (4, 3) and torch.equal(b.scores, torch.tensor(SCORES, dtype=F64))
