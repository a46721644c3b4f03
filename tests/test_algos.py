"""orchestrator/algos.py against hand-worked values and slow, obviously-correct loop versions. CPU only."""

from __future__ import annotations

import ast
import math
import statistics
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from orchestrator.core import algos

F64 = torch.float64
# Loop references are exact up to float64 rounding.
TIGHT = {"rtol": 1e-10, "atol": 1e-12}
# masked_whiten adds eps=1e-8 to the variance, grpo adds eps=1e-6 to the std.
WHITEN = {"rtol": 1e-6, "atol": 1e-7}
GRPO = {"rtol": 1e-5, "atol": 1e-6}


def t64(x) -> torch.Tensor:
    return torch.tensor(x, dtype=F64)


def right_padded_mask(lengths: list[int], t_len: int) -> torch.Tensor:
    return t64([[1.0] * n + [0.0] * (t_len - n) for n in lengths])


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- slow references


def ref_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Whitening over the masked entries via Python lists and statistics.stdev (unbiased)."""
    vals = [x[i, j].item() for i in range(x.shape[0]) for j in range(x.shape[1]) if mask[i, j] > 0]
    mean, std = statistics.fmean(vals), statistics.stdev(vals)
    out = torch.zeros_like(x)
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            if mask[i, j] > 0:
                out[i, j] = (x[i, j].item() - mean) / std + (0.0 if shift_mean else mean)
    return out


def ref_groups(scores: list[float], ids: list[int]) -> dict[int, list[float]]:
    groups: dict[int, list[float]] = {}
    for s, g in zip(scores, ids):
        groups.setdefault(g, []).append(s)
    return groups


def ref_grpo(scores: list[float], ids: list[int], norm_by_std: bool) -> list[float]:
    groups = ref_groups(scores, ids)
    out = []
    for s, g in zip(scores, ids):
        members = groups[g]
        adv = s - statistics.fmean(members)
        if norm_by_std:
            std = statistics.stdev(members) if len(members) > 1 else 0.0
            adv = adv / (std + 1e-6)
        out.append(adv)
    return out


def ref_rloo(scores: list[float], ids: list[int]) -> list[float]:
    out = []
    for i, (s, g) in enumerate(zip(scores, ids)):
        others = [scores[j] for j in range(len(scores)) if ids[j] == g and j != i]
        out.append(s - statistics.fmean(others))
    return out


def ref_discounted_returns(rewards: torch.Tensor, lengths: list[int], gamma: float) -> torch.Tensor:
    """G_t = sum_{k=t}^{T-1} gamma^(k-t) r_k over the T response tokens of each row."""
    out = torch.zeros_like(rewards)
    for i, T in enumerate(lengths):
        for t in range(T):
            out[i, t] = sum(gamma ** (k - t) * rewards[i, k].item() for k in range(t, T))
    return out


def ref_gae(rewards: torch.Tensor, values: torch.Tensor, lengths: list[int], gamma: float, lam: float):
    """A_t = sum_l (gamma lam)^l delta_{t+l}, delta_t = r_t + gamma V_{t+1} - V_t, V_T = 0. Raw A and R = A + V."""
    adv, ret = torch.zeros_like(rewards), torch.zeros_like(rewards)
    for i, T in enumerate(lengths):
        v = [values[i, t].item() for t in range(T)] + [0.0]
        deltas = [rewards[i, t].item() + gamma * v[t + 1] - v[t] for t in range(T)]
        for t in range(T):
            a = sum((gamma * lam) ** l * deltas[t + l] for l in range(T - t))
            adv[i, t] = a
            ret[i, t] = a + v[t]
    return adv, ret


# ---------------------------------------------------------------- module hygiene


def test_module_imports_only_torch():
    tree = ast.parse(Path(algos.__file__).read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import in algos.py"
            roots.add(node.module.split(".")[0])
    # __future__ and typing are compile-time annotation helpers, not runtime dependencies.
    assert roots - {"__future__", "typing"} == {"torch"}, roots


# ---------------------------------------------------------------- masking helpers


def test_masked_sum_by_hand():
    x = t64([[1, 2, 3], [4, 5, 6]])
    mask = t64([[1, 1, 0], [1, 0, 0]])
    assert_close(algos.masked_sum(x, mask), t64(7.0), **TIGHT)  # 1 + 2 + 4
    assert_close(algos.masked_sum(x, mask, dim=1), t64([3.0, 4.0]), **TIGHT)


def test_masked_mean_by_hand():
    x = t64([[1, 2, 3], [4, 5, 6]])
    mask = t64([[1, 1, 0], [1, 0, 0]])
    assert_close(algos.masked_mean(x, mask), t64(7 / 3), **TIGHT)  # (1 + 2 + 4) / 3
    assert_close(algos.masked_mean(x, mask, dim=1), t64([1.5, 4.0]), **TIGHT)  # (1 + 2) / 2, 4 / 1


def test_masked_mean_empty_mask_is_zero():
    x = t64([[1, 2, 3], [4, 5, 6]])
    empty_row = t64([[1, 1, 0], [0, 0, 0]])
    assert_close(algos.masked_mean(x, empty_row, dim=1), t64([1.5, 0.0]), **TIGHT)
    assert_close(algos.masked_mean(x, torch.zeros_like(x)), t64(0.0), **TIGHT)


def test_masked_var_by_hand():
    x = t64([[1, 2, 3], [4, 5, 6]])
    mask = t64([[1, 1, 0], [1, 0, 0]])
    # Values 1, 2, 4; mean 7/3; squared deviations 16/9 + 1/9 + 25/9 = 42/9.
    assert_close(algos.masked_var(x, mask, unbiased=False), t64(42 / 9 / 3), **TIGHT)  # 14/9
    assert_close(algos.masked_var(x, mask), t64(42 / 9 / 2), **TIGHT)  # 7/3
    assert_close(algos.masked_var(x, mask), t64(statistics.variance([1, 2, 4])), **TIGHT)


def test_masked_var_single_and_empty():
    x = t64([[5.0, 9.0]])
    assert_close(algos.masked_var(x, t64([[1.0, 0.0]])), t64(0.0), **TIGHT)  # one value: no spread, no n-1 = 0 division
    assert_close(algos.masked_var(x, t64([[0.0, 0.0]])), t64(0.0), **TIGHT)


def test_masked_whiten_by_hand():
    x = t64([[1.0, 3.0, 100.0]])
    mask = t64([[1.0, 1.0, 0.0]])
    # Masked values 1, 3: mean 2, unbiased var (1 + 1) / 1 = 2, std sqrt(2); the 100 is padding.
    r = 1 / math.sqrt(2)
    assert_close(algos.masked_whiten(x, mask), t64([[-r, r, 0.0]]), **WHITEN)
    assert_close(algos.masked_whiten(x, mask, shift_mean=False), t64([[2 - r, 2 + r, 0.0]]), **WHITEN)


def test_masked_whiten_matches_reference():
    x = torch.randn(4, 7, generator=gen(0), dtype=F64) * 3 + 1.5
    mask = right_padded_mask([7, 3, 5, 1], 7)
    out = algos.masked_whiten(x, mask)
    assert_close(out, ref_whiten(x, mask), **WHITEN)
    assert_close(algos.masked_whiten(x, mask, shift_mean=False), ref_whiten(x, mask, shift_mean=False), **WHITEN)
    sel = out[mask > 0]
    assert_close(sel.mean(), t64(0.0), **WHITEN)
    assert_close(sel.std(), t64(1.0), **WHITEN)


def test_masked_whiten_empty_mask_is_finite_zero():
    x = t64([[1.0, -2.0], [3.0, 4.0]])
    out = algos.masked_whiten(x, torch.zeros_like(x))
    assert torch.isfinite(out).all()
    assert_close(out, torch.zeros_like(x), **TIGHT)
    assert_close(algos.masked_whiten(x, torch.zeros_like(x), shift_mean=False), torch.zeros_like(x), **TIGHT)


# ---------------------------------------------------------------- outcome estimators

# Uneven, interleaved, non-contiguous groups: group 7 = scores (1, 0, 0), group 3 = scores (4, 2).
SCORES = [1.0, 4.0, 0.0, 0.0, 2.0]
IDS = [7, 3, 7, 7, 3]
OUT_MASK = right_padded_mask([3, 1, 2, 3, 0], 3)


def test_grpo_by_hand():
    adv = algos.grpo_advantages(t64(SCORES), torch.tensor(IDS), OUT_MASK)
    # Group 7: mean 1/3, stdev sqrt((4/9 + 1/9 + 1/9) / 2) = 1/sqrt(3): (2/3) sqrt(3) = 2/sqrt(3), (-1/3) sqrt(3) = -1/sqrt(3).
    # Group 3: mean 3, stdev sqrt((1 + 1) / 1) = sqrt(2): +-1/sqrt(2).
    a, b, c = 2 / math.sqrt(3), -1 / math.sqrt(3), 1 / math.sqrt(2)
    expected = t64([a, c, b, b, -c])[:, None] * OUT_MASK
    assert_close(adv, expected, **GRPO)


def test_grpo_without_std_by_hand():
    adv = algos.grpo_advantages(t64(SCORES), torch.tensor(IDS), OUT_MASK, norm_by_std=False)
    # r - group mean: group 7 mean 1/3, group 3 mean 3.
    expected = t64([2 / 3, 1.0, -1 / 3, -1 / 3, -1.0])[:, None] * OUT_MASK
    assert_close(adv, expected, **TIGHT)


def test_dr_grpo_is_mean_centred_only():
    adv = algos.dr_grpo_advantages(t64(SCORES), torch.tensor(IDS), OUT_MASK)
    expected = t64([2 / 3, 1.0, -1 / 3, -1 / 3, -1.0])[:, None] * OUT_MASK
    assert_close(adv, expected, **TIGHT)


def test_rloo_by_hand():
    adv = algos.rloo_advantages(t64(SCORES), torch.tensor(IDS), OUT_MASK)
    # Group 7 (1, 0, 0): 1 - (0 + 0)/2 = 1, 0 - (1 + 0)/2 = -0.5 twice. Group 3 (4, 2): 4 - 2 = 2, 2 - 4 = -2.
    expected = t64([1.0, 2.0, -0.5, -0.5, -2.0])[:, None] * OUT_MASK
    assert_close(adv, expected, **TIGHT)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_outcome_estimators_match_loops(seed):
    g = gen(seed)
    ids = torch.randint(0, 4, (23,), generator=g)
    ids[:8] = torch.arange(4).repeat(2)  # every group has at least two members
    scores = torch.randn(23, generator=g, dtype=F64)
    lengths = torch.randint(0, 6, (23,), generator=g).tolist()
    mask = right_padded_mask(lengths, 5)
    s, i = scores.tolist(), ids.tolist()
    for norm in (True, False):
        expected = t64(ref_grpo(s, i, norm))[:, None] * mask
        assert_close(algos.grpo_advantages(scores, ids, mask, norm_by_std=norm), expected, **GRPO)
    assert_close(algos.dr_grpo_advantages(scores, ids, mask), t64(ref_grpo(s, i, False))[:, None] * mask, **TIGHT)
    assert_close(algos.rloo_advantages(scores, ids, mask), t64(ref_rloo(s, i))[:, None] * mask, **TIGHT)


def test_grpo_constant_or_singleton_group_gives_zero_advantage():
    scores, ids = t64([1.0, 1.0, 1.0, 5.0]), torch.tensor([0, 0, 0, 1])
    mask = torch.ones(4, 2, dtype=F64)
    adv = algos.grpo_advantages(scores, ids, mask)
    assert torch.isfinite(adv).all()
    assert_close(adv, torch.zeros(4, 2, dtype=F64), **TIGHT)


def test_grpo_eps_by_hand():
    # One group (0, 2e-4): deviations +-1e-4, std sqrt(2) 1e-4. TRL's eps 1e-4 gives 1 / (sqrt(2) + 1) = sqrt(2) - 1;
    # the default 1e-6 gives 1 / (sqrt(2) + 0.01): the eps decides how far a near-tie is pushed apart.
    scores, ids, mask = t64([0.0, 2e-4]), torch.tensor([0, 0]), torch.ones(2, 1, dtype=F64)
    trl = math.sqrt(2) - 1
    assert_close(algos.grpo_advantages(scores, ids, mask, eps=1e-4), t64([[-trl], [trl]]), **TIGHT)
    ours = 1 / (math.sqrt(2) + 0.01)
    assert_close(algos.grpo_advantages(scores, ids, mask), t64([[-ours], [ours]]), **TIGHT)


def test_rloo_is_scaled_dr_grpo():
    # A_rloo = n / (n - 1) * (r - mean): for group sizes 3 and 2 the factors are 3/2 and 2.
    scores, ids = t64(SCORES), torch.tensor(IDS)
    mask = torch.ones(5, 1, dtype=F64)
    factor = t64([1.5, 2.0, 1.5, 1.5, 2.0])[:, None]
    assert_close(algos.rloo_advantages(scores, ids, mask), factor * algos.dr_grpo_advantages(scores, ids, mask), **TIGHT)


def test_outcome_registry():
    # Each name gives its own estimator's hand-worked values (see the by-hand tests above); the
    # three differ on this batch, so a swapped or missing entry shows.
    a, b, c = 2 / math.sqrt(3), -1 / math.sqrt(3), 1 / math.sqrt(2)
    expected = {
        "grpo": [a, c, b, b, -c],
        "dr_grpo": [2 / 3, 1.0, -1 / 3, -1 / 3, -1.0],
        "rloo": [1.0, 2.0, -0.5, -0.5, -2.0],
    }
    assert set(algos.OUTCOME_ESTIMATORS) == set(expected)
    for name, values in expected.items():
        adv = algos.OUTCOME_ESTIMATORS[name](t64(SCORES), torch.tensor(IDS), OUT_MASK)
        assert_close(adv, t64(values)[:, None] * OUT_MASK, **GRPO, msg=name)


# ---------------------------------------------------------------- token-level estimators


def test_discounted_returns_by_hand():
    rewards = t64([[0.0, 0.0, 1.0, 0.0], [2.0, -1.0, 0.0, 0.0]])
    mask = right_padded_mask([3, 2], 4)
    # Row 0, gamma 0.9: G2 = 1, G1 = 0.9, G0 = 0.81. Row 1: G1 = -1, G0 = 2 + 0.9 * -1 = 1.1.
    expected = t64([[0.81, 0.9, 1.0, 0.0], [1.1, -1.0, 0.0, 0.0]])
    assert_close(algos.discounted_returns(rewards, mask, 0.9), expected, **TIGHT)


def test_discounted_returns_match_loop():
    g = gen(3)
    lengths = [6, 1, 4, 0, 3]
    mask = right_padded_mask(lengths, 6)
    rewards = torch.randn(5, 6, generator=g, dtype=F64) * mask
    for gamma in (1.0, 0.95, 0.0):
        assert_close(algos.discounted_returns(rewards, mask, gamma), ref_discounted_returns(rewards, lengths, gamma), **TIGHT)


def test_discounted_returns_ignore_padding_rewards():
    # Rewards beyond the response must not flow back into it (as in gae_advantages).
    lengths = [2, 3]
    mask = right_padded_mask(lengths, 4)
    rewards = t64([[1.0, 2.0, 5.0, 7.0], [0.5, 0.0, 1.0, 9.0]])
    expected = ref_discounted_returns(rewards, lengths, 0.5)  # row 0: 1 + 0.5*2 = 2, 2; row 1: 0.75, 0.5, 1
    assert_close(expected, t64([[2.0, 2.0, 0.0, 0.0], [0.75, 0.5, 1.0, 0.0]]), **TIGHT)
    assert_close(algos.discounted_returns(rewards, mask, 0.5), expected, **TIGHT)


def test_reinforce_pp_matches_loop():
    g = gen(4)
    lengths = [5, 2, 4, 1]
    mask = right_padded_mask(lengths, 5)
    rewards = torch.randn(4, 5, generator=g, dtype=F64) * mask
    for gamma in (1.0, 0.9):
        expected = ref_whiten(ref_discounted_returns(rewards, lengths, gamma), mask)
        assert_close(algos.reinforce_pp_advantages(rewards, mask, gamma), expected, **WHITEN)


def test_reinforce_pp_by_hand():
    # gamma = 1, score on last token: returns row 0 = (1, 1), row 1 = (-1, pad) -> values 1, 1, -1.
    # mean 1/3, unbiased var ((2/3)^2 * 2 + (4/3)^2) / 2 = 4/3, std 2/sqrt(3).
    rewards = t64([[0.0, 1.0], [-1.0, 0.0]])
    mask = right_padded_mask([2, 1], 2)
    hi, lo = (2 / 3) / (2 / math.sqrt(3)), (-4 / 3) / (2 / math.sqrt(3))
    assert_close(algos.reinforce_pp_advantages(rewards, mask), t64([[hi, hi], [lo, 0.0]]), **WHITEN)


def test_gae_by_hand():
    rewards, values, mask = t64([[0.0, 1.0]]), t64([[0.5, 0.2]]), t64([[1.0, 1.0]])
    # gamma = lam = 1: delta1 = 1 - 0.2 = 0.8, delta0 = 0 + 0.2 - 0.5 = -0.3; A = (0.5, 0.8); R = A + V = (1, 1).
    _, ret = algos.gae_advantages(rewards, values, mask, 1.0, 1.0)
    assert_close(ret, t64([[1.0, 1.0]]), **TIGHT)
    # gamma = lam = 0.5: delta1 = 0.8, delta0 = 0.5 * 0.2 - 0.5 = -0.4; A0 = -0.4 + 0.25 * 0.8 = -0.2; R = (0.3, 1.0).
    adv, ret = algos.gae_advantages(rewards, values, mask, 0.5, 0.5)
    assert_close(ret, t64([[0.3, 1.0]]), **TIGHT)
    # Whitened (-0.2, 0.8): mean 0.3, std sqrt(0.5) -> -+1/sqrt(2).
    assert_close(adv, t64([[-1 / math.sqrt(2), 1 / math.sqrt(2)]]), **WHITEN)


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0), (1.0, 0.5)])
def test_gae_matches_nested_sum(gamma, lam):
    g = gen(5)
    lengths = [7, 3, 5, 1, 6]
    mask = right_padded_mask(lengths, 7)
    # Rewards and values at padding are garbage on purpose: neither may leak into the response.
    rewards = torch.randn(5, 7, generator=g, dtype=F64)
    values = torch.randn(5, 7, generator=g, dtype=F64)
    raw_adv, raw_ret = ref_gae(rewards, values, lengths, gamma, lam)
    adv, ret = algos.gae_advantages(rewards, values, mask, gamma, lam)
    assert_close(ret, raw_ret, **TIGHT)
    assert_close(adv, ref_whiten(raw_adv, mask), **WHITEN)
    assert (ret[mask == 0] == 0).all() and (adv[mask == 0] == 0).all()


def test_gae_lam_one_returns_are_discounted_returns():
    # With lam = 1 the value terms telescope: R_t = A_t + V_t = sum_k gamma^k r_{t+k}.
    g = gen(6)
    lengths = [4, 2, 3]
    mask = right_padded_mask(lengths, 4)
    rewards = torch.randn(3, 4, generator=g, dtype=F64) * mask
    values = torch.randn(3, 4, generator=g, dtype=F64)
    _, ret = algos.gae_advantages(rewards, values, mask, 0.9, 1.0)
    assert_close(ret, algos.discounted_returns(rewards, mask, 0.9), **TIGHT)


def test_token_level_rewards_by_hand():
    scores = t64([2.0, -1.0, 3.0])
    mask = right_padded_mask([3, 1, 4], 4)
    expected = t64([[0, 0, 2.0, 0], [-1.0, 0, 0, 0], [0, 0, 0, 3.0]])
    assert_close(algos.token_level_rewards(scores, mask), expected, **TIGHT)
    kl = t64([[0.1, 0.2, 0.3, 9.0], [0.5, 9.0, 9.0, 9.0], [0.0, 0.0, 0.0, -0.4]])
    # r_t = score * [t is last] - 0.5 * kl_t on response tokens, 0 on padding.
    expected_kl = t64([[-0.05, -0.1, 2.0 - 0.15, 0], [-1.0 - 0.25, 0, 0, 0], [0, 0, 0, 3.0 + 0.2]])
    assert_close(algos.token_level_rewards(scores, mask, kl, 0.5), expected_kl, **TIGHT)
    # A KL with no coefficient, or a coefficient with no KL, is no penalty.
    assert_close(algos.token_level_rewards(scores, mask, kl, 0.0), expected, **TIGHT)
    assert_close(algos.token_level_rewards(scores, mask, None, 0.5), expected, **TIGHT)


def test_token_level_rewards_empty_response_is_all_zero():
    out = algos.token_level_rewards(t64([4.0, 1.0]), right_padded_mask([0, 2], 3))
    assert_close(out, t64([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), **TIGHT)


# ---------------------------------------------------------------- KL estimators


def test_kl_estimators_by_hand():
    logp, ref = t64([math.log(0.5)]), t64([math.log(0.25)])
    ln2 = math.log(2)
    # log r' = ln 2; k1 = ln 2; k2 = (ln 2)^2 / 2; k3 = r - 1 - ln r with r = 1/2: -0.5 + ln 2.
    assert_close(algos.kl_estimate(logp, ref, "k1"), t64([ln2]), **TIGHT)
    assert_close(algos.kl_estimate(logp, ref, "k2"), t64([ln2**2 / 2]), **TIGHT)
    assert_close(algos.kl_estimate(logp, ref, "k3"), t64([ln2 - 0.5]), **TIGHT)
    assert_close(algos.kl_estimate(logp, ref), t64([ln2 - 0.5]), **TIGHT)  # k3 is the default


def test_kl_k1_k3_are_unbiased_under_exact_expectation():
    # E_p[k1] = E_p[k3] = KL(p || q); sum over the whole vocabulary with weights p instead of sampling.
    g = gen(7)
    logp = torch.log_softmax(torch.randn(11, generator=g, dtype=F64), -1)
    logq = torch.log_softmax(torch.randn(11, generator=g, dtype=F64), -1)
    p = logp.exp()
    kl = (p * (logp - logq)).sum()
    assert_close((p * algos.kl_estimate(logp, logq, "k1")).sum(), kl, **TIGHT)
    assert_close((p * algos.kl_estimate(logp, logq, "k3")).sum(), kl, **TIGHT)


def test_kl_estimators_zero_when_equal_and_k3_nonnegative():
    g = gen(8)
    logp = torch.randn(4, 9, generator=g, dtype=F64)
    for kind in ("k1", "k2", "k3"):
        assert_close(algos.kl_estimate(logp, logp.clone(), kind), torch.zeros_like(logp), **TIGHT)
    ref = logp + 3 * torch.randn(4, 9, generator=g, dtype=F64)
    assert (algos.kl_estimate(logp, ref, "k3") >= 0).all()
    assert (algos.kl_estimate(logp, ref, "k2") >= 0).all()
    assert (algos.kl_estimate(logp, ref, "k1") < 0).any()  # k1 alone can go negative per token


def test_kl_k3_is_finite_for_extreme_ratios():
    logp, ref = t64([-1000.0, 0.0]), t64([0.0, -1000.0])
    k3 = algos.kl_estimate(logp, ref, "k3")
    assert torch.isfinite(k3).all()
    # log ratio +1000: exp(-1000) + 1000 - 1 = 999.
    assert_close(k3[1], t64(999.0), **TIGHT)


def test_kl_unknown_estimator_raises():
    with pytest.raises(ValueError, match="k4"):
        algos.kl_estimate(t64([0.0]), t64([0.0]), "k4")


# ---------------------------------------------------------------- aggregate_loss

AGG_LOSS = t64([[1, 2, 3], [4, 5, 6]])
AGG_MASK = t64([[1, 1, 0], [1, 1, 1]])


def test_aggregate_token_mean_by_hand():
    assert_close(algos.aggregate_loss(AGG_LOSS, AGG_MASK, "token-mean"), t64(18 / 5), **TIGHT)  # (1+2+4+5+6) / 5
    assert_close(algos.aggregate_loss(AGG_LOSS, AGG_MASK, "token-mean", num_tokens=10), t64(1.8), **TIGHT)


def test_aggregate_seq_mean_token_mean_by_hand():
    # ((1 + 2) / 2 + (4 + 5 + 6) / 3) / 2 = (1.5 + 5) / 2
    assert_close(algos.aggregate_loss(AGG_LOSS, AGG_MASK, "seq-mean-token-mean"), t64(3.25), **TIGHT)
    assert_close(algos.aggregate_loss(AGG_LOSS, AGG_MASK, "seq-mean-token-mean", num_seqs=4), t64(6.5 / 4), **TIGHT)


def test_aggregate_seq_mean_token_sum_norm_by_hand():
    # (3 + 15) / t / b with t = 3, b = 2; then with norm_len = 4.
    assert_close(algos.aggregate_loss(AGG_LOSS, AGG_MASK, "seq-mean-token-sum-norm"), t64(3.0), **TIGHT)
    assert_close(algos.aggregate_loss(AGG_LOSS, AGG_MASK, "seq-mean-token-sum-norm", norm_len=4), t64(2.25), **TIGHT)


def test_aggregate_empty_mask_is_zero_not_nan():
    empty = torch.zeros_like(AGG_MASK)
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        assert_close(algos.aggregate_loss(AGG_LOSS, empty, mode), t64(0.0), **TIGHT)


def test_aggregate_unknown_mode_raises():
    with pytest.raises(ValueError, match="token-max"):
        algos.aggregate_loss(AGG_LOSS, AGG_MASK, "token-max")


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_aggregate_micro_batches_sum_to_full_batch(mode):
    g = gen(9)
    lengths = [8, 2, 5, 1, 7, 3, 6]
    mask = right_padded_mask(lengths, 8)
    per_token = torch.randn(7, 8, generator=g, dtype=F64)
    w = torch.randn(7, 8, generator=g, dtype=F64)
    kw = {"norm_len": 8} if mode == "seq-mean-token-sum-norm" else {}

    x_full = per_token.clone().requires_grad_(True)
    full = algos.aggregate_loss(x_full * w, mask, mode, **kw)
    full.backward()

    x_micro = per_token.clone().requires_grad_(True)
    whole = {"num_tokens": float(mask.sum()), "num_seqs": 7}
    total = torch.zeros((), dtype=F64)
    for rows in ([0, 1, 2], [3, 4], [5, 6]):
        # Each micro-batch is trimmed to its own longest response, as a packer would.
        width = max(lengths[r] for r in rows)
        m = mask[rows, :width]
        part = algos.aggregate_loss((x_micro * w)[rows, :width], m, mode, **whole, **kw)
        part.backward()
        total = total + part.detach()
    assert_close(total, full.detach(), **TIGHT)
    assert_close(x_micro.grad, x_full.grad, **TIGHT)

    # Without the whole batch's counts the sum is off: the test can tell.
    naive = sum(
        algos.aggregate_loss((per_token * w)[rows], mask[rows], mode, **kw).item() for rows in ([0, 1, 2], [3, 4], [5, 6])
    )
    assert not math.isclose(naive, full.item(), rel_tol=1e-6)


# ---------------------------------------------------------------- policy_loss


def ratios_to_logprobs(ratios: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    old = t64([[-1.0] * len(ratios)])
    return old + torch.log(t64([ratios])), old


def test_policy_loss_asymmetric_clip_by_hand():
    ratios = [1.5, 0.5, 0.5, 1.5, 1.25, 0.75, 1.0]
    adv = t64([[1.0, 1.0, -1.0, -1.0, 1.0, -1.0, 2.0]])
    logp, old = ratios_to_logprobs(ratios)
    mask = torch.ones_like(adv)
    loss, clipped = algos.policy_loss(logp, old, adv, mask, clip_eps_low=0.2, clip_eps_high=0.28)
    # clip range [0.8, 1.28]; loss = max(-A r, -A clip(r)):
    #   A=+1 r=1.5 : max(-1.5, -1.28) = -1.28 clipped
    #   A=+1 r=0.5 : max(-0.5, -0.8)  = -0.5  not clipped (the gradient still pushes r up)
    #   A=-1 r=0.5 : max(0.5, 0.8)    = 0.8   clipped
    #   A=-1 r=1.5 : max(1.5, 1.28)   = 1.5   not clipped
    #   A=+1 r=1.25: inside [0.8, 1.28] -> -1.25 (clipped under a symmetric 0.2)
    #   A=-1 r=0.75: max(0.75, 0.8)   = 0.8   clipped
    #   A=+2 r=1   : -2
    assert_close(loss, t64([[-1.28, -0.5, 0.8, 1.5, -1.25, 0.8, -2.0]]), **TIGHT)
    assert_close(clipped, t64([[1.0, 0, 1.0, 0, 0, 1.0, 0]]), **TIGHT)

    loss_sym, clipped_sym = algos.policy_loss(logp, old, adv, mask, clip_eps_low=0.2, clip_eps_high=0.2)
    assert_close(loss_sym[0, 4], t64(-1.2), **TIGHT)  # A=+1 r=1.25 -> max(-1.25, -1.2)
    assert clipped_sym[0, 4] == 1.0


def test_policy_loss_clipped_tokens_have_no_gradient():
    ratios = [1.5, 0.5, 0.5, 1.5, 1.1]
    adv = t64([[1.0, 1.0, -1.0, -1.0, 1.0]])
    logp, old = ratios_to_logprobs(ratios)
    logp.requires_grad_(True)
    loss, clipped = algos.policy_loss(logp, old, adv, torch.ones_like(adv), 0.2, 0.28)
    loss.sum().backward()
    # d(-A r)/d logp = -A r on unclipped tokens, 0 on clipped ones.
    expected = torch.where(clipped > 0, torch.zeros_like(adv), -adv * t64([ratios]))
    assert_close(logp.grad, expected, **TIGHT)


def test_policy_loss_dual_clip_by_hand():
    ratios = [4.0, 2.0, 4.0, 0.5]
    adv = t64([[-1.0, -1.0, 1.0, -2.0]])
    logp, old = ratios_to_logprobs(ratios)
    mask = torch.ones_like(adv)
    loss, clipped = algos.policy_loss(logp, old, adv, mask, 0.2, 0.28, dual_clip=3.0)
    #   A=-1 r=4  : max(4, 1.28) = 4, capped at -A c = 3
    #   A=-1 r=2  : max(2, 1.28) = 2 < 3, unchanged
    #   A=+1 r=4  : max(-4, -1.28) = -1.28; dual clip only touches A < 0
    #   A=-2 r=0.5: max(1, 1.6) = 1.6 < 6, unchanged
    assert_close(loss, t64([[3.0, 2.0, -1.28, 1.6]]), **TIGHT)
    no_dual, _ = algos.policy_loss(logp, old, adv, mask, 0.2, 0.28)
    assert_close(no_dual, t64([[4.0, 2.0, -1.28, 1.6]]), **TIGHT)
    # `clipped` reports the PPO ratio clip only, as verl's pg_clipfrac does.
    assert_close(clipped, t64([[0.0, 0.0, 1.0, 1.0]]), **TIGHT)


def test_policy_loss_matches_loop_and_masks():
    g = gen(10)
    logp = torch.randn(3, 6, generator=g, dtype=F64) * 0.5 - 2
    old = logp + torch.randn(3, 6, generator=g, dtype=F64) * 0.4
    adv = torch.randn(3, 6, generator=g, dtype=F64)
    mask = right_padded_mask([6, 2, 4], 6)
    lo, hi, c = 0.1, 0.3, 2.5
    loss, clipped = algos.policy_loss(logp, old, adv, mask, lo, hi, dual_clip=c)
    exp_loss, exp_clip = torch.zeros_like(adv), torch.zeros_like(adv)
    for i in range(3):
        for j in range(6):
            if mask[i, j] == 0:
                continue
            r, a = math.exp(logp[i, j].item() - old[i, j].item()), adv[i, j].item()
            unclipped, clip_term = -a * r, -a * min(max(r, 1 - lo), 1 + hi)
            value = max(unclipped, clip_term)
            if a < 0:
                value = min(value, -a * c)
            exp_loss[i, j], exp_clip[i, j] = value, float(clip_term > unclipped)
    assert_close(loss, exp_loss, **TIGHT)
    assert_close(clipped, exp_clip, **TIGHT)
    assert exp_clip.sum() > 0  # the draw exercises clipping


# ---------------------------------------------------------------- value_loss


def test_value_loss_by_hand():
    values = t64([[1.0, 1.0, 0.6, 0.0]])
    old = t64([[0.5, 0.5, 0.5, 0.0]])
    returns = t64([[2.0, 0.0, 2.0, 0.0]])
    mask = t64([[1.0, 1.0, 1.0, 0.0]])
    loss, clipped = algos.value_loss(values, old, returns, mask, clip=0.2)
    #   V=1   old=0.5 R=2: (1-2)^2 = 1; V_clip = 0.7 -> 1.69; 0.5 * 1.69 = 0.845, clipped
    #   V=1   old=0.5 R=0: 1; V_clip = 0.7 -> 0.49; 0.5 * 1 = 0.5, not clipped
    #   V=0.6 old=0.5 R=2: inside the clip, 0.5 * 1.4^2 = 0.98
    assert_close(loss, t64([[0.845, 0.5, 0.98, 0.0]]), **TIGHT)
    assert_close(clipped, t64([[1.0, 0.0, 0.0, 0.0]]), **TIGHT)


def test_value_loss_without_clip():
    values, old, returns = t64([[1.0, 3.0]]), t64([[0.5, -9.0]]), t64([[2.0, 0.0]])
    loss, clipped = algos.value_loss(values, old, returns, t64([[1.0, 1.0]]), clip=None)
    assert_close(loss, t64([[0.5, 4.5]]), **TIGHT)  # 0.5 (V - R)^2; old values play no part
    assert_close(clipped, t64([[0.0, 0.0]]), **TIGHT)
    masked, _ = algos.value_loss(values, old, returns, t64([[1.0, 0.0]]), clip=None)
    assert_close(masked, t64([[0.5, 0.0]]), **TIGHT)


def test_value_loss_matches_loop():
    g = gen(11)
    values, old, returns = (torch.randn(4, 5, generator=g, dtype=F64) for _ in range(3))
    mask = right_padded_mask([5, 3, 1, 4], 5)
    loss, clipped = algos.value_loss(values, old, returns, mask, clip=0.3)
    exp_loss, exp_clip = torch.zeros_like(values), torch.zeros_like(values)
    for i in range(4):
        for j in range(5):
            if mask[i, j] == 0:
                continue
            v, vo, r = values[i, j].item(), old[i, j].item(), returns[i, j].item()
            vc = vo + min(max(v - vo, -0.3), 0.3)
            exp_loss[i, j] = 0.5 * max((v - r) ** 2, (vc - r) ** 2)
            exp_clip[i, j] = float((vc - r) ** 2 > (v - r) ** 2)
    assert_close(loss, exp_loss, **TIGHT)
    assert_close(clipped, exp_clip, **TIGHT)


# ---------------------------------------------------------------- log-probs and entropy


def test_logprobs_and_entropy_match_categorical():
    g = gen(12)
    logits = torch.randn(2, 3, 17, generator=g) * 4
    tokens = torch.randint(0, 17, (2, 3), generator=g)
    dist = torch.distributions.Categorical(logits=logits)
    assert_close(algos.logprobs_from_logits(logits, tokens), dist.log_prob(tokens), rtol=1e-5, atol=1e-5)
    assert_close(algos.entropy_from_logits(logits), dist.entropy(), rtol=1e-5, atol=1e-5)


def test_logprobs_and_entropy_by_hand():
    # Uniform over 4: log p = -ln 4, H = ln 4. Logits (ln 3, 0): p = (3/4, 1/4), H = -(3/4 ln 3/4 + 1/4 ln 1/4).
    uniform = torch.zeros(1, 1, 4)
    lp = algos.logprobs_from_logits(uniform, torch.tensor([[2]]))
    assert_close(lp, torch.tensor([[-math.log(4)]]), rtol=1e-6, atol=1e-6)
    assert_close(algos.entropy_from_logits(uniform), torch.tensor([[math.log(4)]]), rtol=1e-6, atol=1e-6)
    two = torch.tensor([[[math.log(3), 0.0]]])
    assert_close(algos.logprobs_from_logits(two, torch.tensor([[1]])), torch.tensor([[math.log(0.25)]]), rtol=1e-6, atol=1e-6)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert_close(algos.entropy_from_logits(two), torch.tensor([[h]]), rtol=1e-6, atol=1e-6)


def test_logprobs_and_entropy_are_float32_and_stable():
    logits = torch.tensor([[[1000.0, 999.0, -1000.0]]], dtype=torch.bfloat16)
    lp = algos.logprobs_from_logits(logits, torch.tensor([[0]]))
    ent = algos.entropy_from_logits(logits)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    ref = torch.distributions.Categorical(logits=logits.float())
    assert_close(lp, ref.log_prob(torch.tensor([[0]])), rtol=1e-5, atol=1e-5)
    assert_close(ent, ref.entropy(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- metrics under TRL's names, from the trainer


@pytest.fixture(scope="module")
def uneven_batch():
    """Four samples of one prompt with responses of 4, 3, 1 and 2 tokens: a token mean and a mean of
    per-sequence means differ on it, and so do micro-batches of two rows (7 and 3 tokens)."""
    from orchestrator.core.batch import Batch

    lengths = [4, 3, 1, 2]
    mask = right_padded_mask(lengths, 4).float()
    ids = torch.randint(3, 200, (4, 6), generator=gen(21))
    return Batch(input_ids=ids, attention_mask=torch.cat([torch.ones(4, 2, dtype=torch.long), mask.long()], 1), response_mask=mask,
                 group_ids=torch.zeros(4, dtype=torch.long), prompt_len=2, advantages=torch.zeros(4, 4))


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_entropy_bonus_and_metric_are_a_token_mean_whatever_the_loss_aggregation(tiny_model, uneven_batch, agg):
    """TRL's GRPOTrainer: entropy bonus = coef x (sum of token entropies / tokens), `entropy` the same mean.
    With zero advantages and no KL the whole loss is -H, so the step's gradient is that of the token mean
    of the mini-batch, accumulated here over two micro-batches of unlike token counts (TRL's, at one micro-batch)."""
    from orchestrator.core.spec import OptimSpec, RolloutSpec
    from workers.common import response_logprobs
    from workers.trainer import PolicyTrainer

    optim = OptimSpec(lr=1e-3, seed=0, loss_agg=agg, entropy_coef=1.0, grad_clip=None)
    # A low temperature: the random model's near-uniform token entropies (all ~ln V) would hide the weighting.
    rollout = RolloutSpec(max_new_tokens=8, temperature=0.02)
    trainer = PolicyTrainer(str(tiny_model), optim, rollout, threads=1)
    by_hand = PolicyTrainer(str(tiny_model), optim, rollout, threads=1)
    _, entropy = response_logprobs(by_hand.model, uneven_batch, rollout.temperature, with_entropy=True, entropy_grad=True)
    token_mean = algos.masked_sum(entropy, uneven_batch.response_mask) / uneven_batch.response_mask.sum()
    (-token_mean).backward()
    grad_norm = torch.norm(torch.stack([q.grad.norm() for q in by_hand.model.parameters() if q.grad is not None])).item()
    # The per-sequence mean differs from the token mean on this batch: the test tells them apart.
    assert algos.masked_mean(entropy, uneven_batch.response_mask, dim=1).mean().item() != pytest.approx(token_mean.item(), rel=0.01)

    stats = trainer.train_step(uneven_batch, 1, num_mini_batches=1, micro_batch_size=2, on_policy=True)
    assert stats["entropy"] == pytest.approx(token_mean.item(), rel=1e-5)
    assert stats["grad_norm"] == pytest.approx(grad_norm, rel=1e-4)


def test_kl_metric_is_a_token_mean_whatever_the_loss_aggregation():
    """TRL logs `kl` as the token mean of k3 over the batch's response tokens; so does the driver, under
    any `loss_agg` (the loss's own KL term is `kl_loss`, aggregated as the loss is)."""
    from orchestrator.core.batch import Batch
    from orchestrator.core.spec import parse_spec
    from orchestrator.stages.driver import rollout_metrics

    mask = right_padded_mask([2, 1], 2)
    # k3 = exp(ref - logp) - (ref - logp) - 1 on the 3 response tokens: ref - logp = 0 and -ln 2 (row 0), ln 2 (row 1):
    # 0, 1/2 - 1 + ln 2 and 2 - 1 - ln 2. Their token mean is 1/6; the mean of the rows' means is 0.2017.
    ln2 = math.log(2)
    logp, ref = t64([[-1.0, -1.0], [-1.0, -5.0]]), t64([[-1.0, -1.0 - ln2], [-1.0 + ln2, -9.0]])
    k3 = [0.0, 0.5 - 1 + ln2, 2 - 1 - ln2]
    batch = Batch(input_ids=torch.zeros(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 3, dtype=torch.long),
                  response_mask=mask, group_ids=torch.tensor([0, 0]), prompt_len=1, logprobs=logp, ref_logprobs=ref,
                  scores=t64([1.0, 0.0]), advantages=torch.zeros(2, 2, dtype=F64))
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        spec = parse_spec({"model": {"path": "m"}, "data": {"train_file": "d.jsonl"}, "rewards": [{"function": "accuracy"}],
                           "rollout": {"n": 2}, "optim": {"prompts_per_step": 1, "kl_coef": 0.1, "loss_agg": agg}})
        assert rollout_metrics(batch, {}, spec, eos_token_id=0)["kl"] == pytest.approx(1 / 6, rel=1e-12) == sum(k3) / 3
