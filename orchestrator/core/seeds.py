"""Every seed of a run derives from (optim.seed, step) alone, so a resumed run draws the same
prompts, samples and mini-batch orders as one that never stopped."""

from __future__ import annotations


def step_seed(seed: int, step: int, offset: int = 0) -> int:
    """The seed of a step's random draws (sampling, mini-batch order); `offset` separates streams."""
    return int(seed) * 1_000_003 + step + offset


def request_seed(seed: int, step: int, index: int) -> int:
    """One seed per prompt of a step: vLLM seeds each request's generator alone, so equal seeds
    would give every prompt the same random stream."""
    return (step_seed(seed, step) * 65_537 + index) % (2**31 - 1)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of an epoch's shuffle of the prompts."""
    return int(seed) * 100_003 + epoch
