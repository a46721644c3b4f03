"""Off-policy correction (orchestrator/core/algos.py: off_policy_ratios, off_policy_correction)
against values worked out by hand. CPU only, float64."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from orchestrator.core import algos

F64 = torch.float64


def t64(x) -> torch.Tensor:
    return torch.tensor(x, dtype=F64)


# Two samples, behaviour log-probs 0 so that the ratios are exp(proximal): sample 0 has token
# ratios 0.25, 1, 3; sample 1 has 0.5, 2 and one padding token (whose log-prob is junk).
PROX = torch.log(t64([[0.25, 1.0, 3.0], [0.5, 2.0, 7.0]]))
BEHAV = torch.zeros(2, 3, dtype=F64)
MASK = t64([[1, 1, 1], [1, 1, 0]])


def test_token_ratios_and_truncation_by_hand():
    ratio = algos.off_policy_ratios(PROX, BEHAV, MASK)
    assert_close(ratio, t64([[0.25, 1.0, 3.0], [0.5, 2.0, 1.0]]))  # padding: 1
    weights, keep, m = algos.off_policy_correction(PROX, BEHAV, MASK, tis_cap=2.0)
    assert_close(weights, t64([[0.25, 1.0, 2.0], [0.5, 2.0, 0.0]]))
    assert_close(keep, MASK)
    # Five tokens: mean (0.25 + 1 + 3 + 0.5 + 2) / 5 = 1.35; one of five (3 > 2) truncated; none masked.
    assert m == pytest.approx({"off_policy/ratio_mean": 1.35, "off_policy/ratio_max": 3.0, "off_policy/ratio_min": 0.25,
                               "off_policy/truncated_frac": 0.2, "off_policy/masked_frac": 0.0})


def test_token_level_tis_alone_is_the_existing_truncated_importance_weights():
    g = torch.Generator().manual_seed(0)
    prox, behav = torch.randn(4, 6, generator=g, dtype=F64), torch.randn(4, 6, generator=g, dtype=F64)
    mask = (torch.rand(4, 6, generator=g) > 0.3).to(F64)
    weights, _, _ = algos.off_policy_correction(prox, behav, mask, tis_cap=2.0)
    old, _ = algos.truncated_importance_weights(prox, behav, mask, cap=2.0)
    assert_close(weights, old)


def test_token_masking_outside_the_band_by_hand():
    weights, keep, m = algos.off_policy_correction(PROX, BEHAV, MASK, tis_cap=2.0, mask_band=(0.5, 2.0))
    # 0.25 and 3 leave [0.5, 2]; 0.5 and 2 are on its edges and stay.
    assert_close(keep, t64([[0, 1, 0], [1, 1, 0]]))
    assert_close(weights, t64([[0.0, 1.0, 0.0], [0.5, 2.0, 0.0]]))
    assert m["off_policy/masked_frac"] == pytest.approx(2 / 5)
    assert m["off_policy/truncated_frac"] == 0.0  # the one ratio over C was masked, not truncated


def test_sequence_and_geometric_levels_by_hand():
    seq = algos.off_policy_ratios(PROX, BEHAV, MASK, "sequence")
    # Products: 0.25 * 1 * 3 = 0.75 and 0.5 * 2 = 1 (the padding's 7 is not counted).
    assert_close(seq, t64([[0.75, 0.75, 0.75], [1.0, 1.0, 1.0]]))
    geo = algos.off_policy_ratios(PROX, BEHAV, MASK, "geometric")
    g0 = 0.75 ** (1 / 3)
    assert_close(geo, t64([[g0, g0, g0], [1.0, 1.0, 1.0]]))
    # Whole samples are masked: sample 0 (0.75) leaves [0.8, 1.25], so its three tokens go.
    weights, keep, m = algos.off_policy_correction(PROX, BEHAV, MASK, level="sequence", mask_band=(0.8, 1.25))
    assert_close(keep, t64([[0, 0, 0], [1, 1, 0]]))
    assert_close(weights, t64([[0, 0, 0], [1, 1, 0]]))
    # Metrics over samples at a sequence level: ratios 0.75 and 1.
    assert m["off_policy/ratio_mean"] == pytest.approx(0.875)
    assert m["off_policy/ratio_min"] == pytest.approx(0.75) and m["off_policy/ratio_max"] == pytest.approx(1.0)
    assert m["off_policy/masked_frac"] == pytest.approx(3 / 5)


def test_no_cap_keeps_the_raw_ratio_and_huge_ratios_stay_finite():
    weights, _, m = algos.off_policy_correction(PROX, BEHAV, MASK, tis_cap=None)
    assert_close(weights, t64([[0.25, 1.0, 3.0], [0.5, 2.0, 0.0]]))
    assert m["off_policy/truncated_frac"] == 0.0
    # A 200-token sample 1 nat apart per token: the product is exp(200), clamped to exp(80), not inf.
    prox, behav, mask = torch.ones(1, 200), torch.zeros(1, 200), torch.ones(1, 200)
    weights, _, m = algos.off_policy_correction(prox, behav, mask, level="sequence", tis_cap=2.0)
    assert torch.isfinite(torch.tensor(m["off_policy/ratio_max"])) and weights.max().item() == 2.0
    geo, _, _ = algos.off_policy_correction(prox, behav, mask, level="geometric", tis_cap=None)
    assert_close(geo, torch.full((1, 200), math.e))


def test_decoupled_clipped_loss_by_hand():
    """AReaL's decoupled PPO: clip pi_theta / pi_prox, weight by min(pi_prox / pi_behav, C).
    One token, A = 1: theta/prox = 1.5 (clipped to 1.2), prox/behav = 3 (truncated to 2): loss -1.2 * 2."""
    behav = t64([[0.0]])
    prox = torch.log(t64([[3.0]]))
    theta = prox + math.log(1.5)
    adv, mask = t64([[1.0]]), t64([[1.0]])
    weights, keep, _ = algos.off_policy_correction(prox, behav, mask, tis_cap=2.0)
    pg, clipped = algos.policy_loss(theta, prox, adv, mask * keep)
    assert_close(pg * weights, t64([[-2.4]]))
    assert clipped.item() == 1.0


def test_an_unknown_level_is_refused():
    with pytest.raises(ValueError, match="sequence"):
        algos.off_policy_ratios(PROX, BEHAV, MASK, "tokens")
