"""From a scored rollout to token advantages: the spec's estimator, with the KL penalty folded
into the rewards when `optim.kl_in` is `reward`. The glue between the Batch, the spec and the pure
math in `algos.py`."""

from __future__ import annotations

from orchestrator.core import algos
from orchestrator.core.batch import Batch
from orchestrator.core.spec import JobSpec


def compute_advantages(batch: Batch, spec: JobSpec) -> Batch:
    """Token advantages (and returns, for GAE) from scores, KL and values, by the spec's estimator."""
    opt, est, mask = spec.optim, spec.algorithm.estimator, batch.response_mask
    kl = algos.kl_estimate(batch.logprobs, batch.ref_logprobs, opt.kl_estimator) * mask if batch.ref_logprobs is not None else None
    kl_coef = opt.kl_coef if opt.kl_in == "reward" else 0.0
    if est in algos.OUTCOME_ESTIMATORS:
        # A sequence-level KL penalty for outcome estimators: r_i - beta * sum_t kl_t.
        scores = batch.scores - kl_coef * kl.sum(1) if kl is not None and kl_coef else batch.scores
        kwargs = {"norm_by_std": spec.algorithm.norm_adv_by_std, "eps": spec.algorithm.adv_std_eps} if est == "grpo" else {}
        return batch.replace(advantages=algos.OUTCOME_ESTIMATORS[est](scores, batch.group_ids, mask, **kwargs))
    token_rewards = algos.token_level_rewards(batch.scores, mask, kl, kl_coef)
    if est == "reinforce_pp":
        return batch.replace(token_rewards=token_rewards, advantages=algos.reinforce_pp_advantages(token_rewards, mask, opt.gamma))
    advantages, returns = algos.gae_advantages(token_rewards, batch.values, mask, opt.gamma, opt.lam)
    return batch.replace(token_rewards=token_rewards, advantages=advantages, returns=returns)
