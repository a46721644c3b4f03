"""benchmarks/async_sim.py, the discrete-event model of sync and async loops: a sync loop with fixed
completion lengths takes the step time worked out by hand, and the async loops keep their bound."""

from __future__ import annotations

import pytest

from benchmarks.async_sim import Setup, simulate

# One engine, one trainer device; every completion exactly 50 tokens (sigma 0).
FIXED = Setup(rollout_gpus=1, train_gpus=1, decode_base_s=0.01, decode_per_seq_s=0.001, slots=64, train_gpu_s_per_token=1e-3,
              sync_s=0.5, prompt_len=10, prompts_per_step=2, n=4, median_len=50, sigma=0.0, max_len=100)


def test_a_sync_step_with_fixed_lengths_takes_the_hand_computed_time():
    # Generation: 50 decode steps of 8 sequences, each 0.01 + 8 x 0.001 s = 0.9 s. Training: 8 samples x
    # (10 + 50) tokens x 1e-3 s = 0.48 s. Then the weight sync, 0.5 s. One step: 1.88 s.
    r = simulate(FIXED, "sync", steps=4, warmup=1)
    assert r.step_s == pytest.approx(1.88)
    assert r.samples_per_s == pytest.approx(8 / 1.88)
    assert r.rollout_busy == pytest.approx(0.9 / 1.88) and r.trainer_busy == pytest.approx(0.48 / 1.88)
    assert r.staleness == [0] * 8 * 4 and r.regenerated == 0


@pytest.mark.parametrize("k", [1, 2])
def test_async_keeps_the_bound_and_beats_sync_on_a_long_tail(k):
    tail = Setup(rollout_gpus=1, train_gpus=1, decode_base_s=0.01, decode_per_seq_s=0.001, slots=32, train_gpu_s_per_token=1e-3,
                 sync_s=0.05, prompt_len=10, prompts_per_step=4, n=4, median_len=20, sigma=1.0, max_len=200)
    sync = simulate(tail, "sync", steps=8, warmup=2)
    r = simulate(tail, "async", k, steps=8, warmup=2)
    assert r.staleness_max <= k and len(r.staleness) == 8 * 4 * 4
    assert r.samples_per_s > sync.samples_per_s
