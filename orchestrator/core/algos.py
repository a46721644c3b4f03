"""The RL math: advantage estimators, losses, KL estimators and masking helpers.

Pure functions on tensors; this module imports only torch. Shapes use
b = batch of samples, t = response length. `mask` is 1 on response tokens, 0 on padding.
"""

from __future__ import annotations

from typing import Callable

import torch

# ---------------------------------------------------------------- masking helpers


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over positions where mask is 1 (over all, or along `dim`). An empty mask gives 0."""
    return masked_sum(x, mask, dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked positions; with shift_mean=False the mean is added back."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


# ---------------------------------------------------------------- advantage estimators
# Outcome estimators take one scalar score per sample, `scores: (b,)`, and the prompt
# index of each sample, `group_ids: (b,)`; they return token advantages `(b, t)`.


def _group_stats(scores: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample mean, std (unbiased) and size of the sample's group."""
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    zeros = torch.zeros(len(counts), dtype=scores.dtype, device=scores.device)
    sums = zeros.index_add(0, inverse, scores)
    means = sums / counts
    sq = zeros.index_add(0, inverse, (scores - means[inverse]) ** 2)
    stds = torch.sqrt(sq / (counts - 1).clamp(min=1))
    return means[inverse], stds[inverse], counts[inverse].to(scores.dtype)


def grpo_advantages(
    scores: torch.Tensor, group_ids: torch.Tensor, mask: torch.Tensor, norm_by_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO (Shao et al. 2024, arXiv:2402.03300): A_i = (r_i - mean_g) / (std_g + eps).

    With norm_by_std=False this is Dr. GRPO's A_i = r_i - mean_g (Liu et al. 2025, arXiv:2503.20783).
    """
    mean, std, _ = _group_stats(scores, group_ids)
    adv = scores - mean
    if norm_by_std:
        adv = adv / (std + eps)
    return adv[:, None] * mask


def dr_grpo_advantages(scores: torch.Tensor, group_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return grpo_advantages(scores, group_ids, mask, norm_by_std=False)


def rloo_advantages(scores: torch.Tensor, group_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024, arXiv:2402.14740): A_i = r_i - mean_{j != i} r_j."""
    mean, _, n = _group_stats(scores, group_ids)
    baseline = (mean * n - scores) / (n - 1).clamp(min=1)
    return (scores - baseline)[:, None] * mask


def discounted_returns(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = r_t + gamma * G_{t+1}, over (b, t), restarting at padding."""
    returns = torch.zeros_like(token_rewards)
    running = torch.zeros(token_rewards.shape[0], dtype=token_rewards.dtype, device=token_rewards.device)
    for t in reversed(range(token_rewards.shape[1])):
        # Masking the sum, not just the carry, keeps rewards on padding out of the response's returns.
        running = (token_rewards[:, t] + gamma * running) * mask[:, t]
        returns[:, t] = running
    return returns * mask


def reinforce_pp_advantages(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """REINFORCE++ (Hu 2025, arXiv:2501.03262): discounted token returns, whitened over the whole batch.

    token_rewards: (b, t), the score on the last response token plus any per-token KL penalty.
    """
    return masked_whiten(discounted_returns(token_rewards, mask, gamma), mask)


def gae_advantages(
    token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE (Schulman et al. 2016, arXiv:1506.02438). Returns (advantages, returns), both (b, t).

    delta_t = r_t + gamma * V(s_{t+1}) - V(s_t);  A_t = delta_t + gamma * lam * A_{t+1}.
    Past the last response token V = 0 and A = 0. Advantages are whitened over the batch;
    returns = A + V use the raw advantages.
    """
    values = values * mask
    b, t_len = token_rewards.shape
    adv = torch.zeros_like(token_rewards)
    next_value = torch.zeros(b, dtype=values.dtype, device=values.device)
    next_adv = torch.zeros(b, dtype=values.dtype, device=values.device)
    for t in reversed(range(t_len)):
        m = mask[:, t]
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * next_adv
        adv[:, t] = a * m
        # Padding between tokens never happens in a right-padded response, but keep the carry clean.
        next_value = torch.where(m > 0, values[:, t], next_value)
        next_adv = torch.where(m > 0, a, next_adv)
    returns = (adv + values) * mask
    return masked_whiten(adv, mask), returns


def token_level_rewards(
    scores: torch.Tensor, mask: torch.Tensor, kl: torch.Tensor | None = None, kl_coef: float = 0.0
) -> torch.Tensor:
    """Place each sample's score on its last response token and subtract kl_coef * kl on every token. (b,) -> (b, t)."""
    rewards = torch.zeros_like(mask, dtype=scores.dtype)
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(scores)), last] = scores
    if kl is not None and kl_coef:
        rewards = rewards - kl_coef * kl
    return rewards * mask


# ---------------------------------------------------------------- KL estimators


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (http://joschu.net/blog/kl-approx.html).

    k1 = log r', k2 = (log r')^2 / 2, k3 = r - 1 - log r, with log r' = logp - ref_logp and r = 1/r'.
    """
    log_ratio = logprobs - ref_logprobs
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        neg = (-log_ratio).clamp(max=20.0)  # exp overflow guard; at 20 the estimate is ~5e8 anyway
        return torch.exp(neg) - neg - 1
    raise ValueError(f"unknown KL estimator {kind!r}; expected k1, k2 or k3")


# ---------------------------------------------------------------- losses


def aggregate_loss(
    loss: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    norm_len: int | None = None,
) -> torch.Tensor:
    """Reduce a (b, t) per-token loss to a scalar.

    token-mean:              sum(loss * mask) / num_tokens                       (DAPO)
    seq-mean-token-mean:     sum_i mean_t(loss_i) / num_seqs                     (GRPO paper)
    seq-mean-token-sum-norm: sum_i sum_t(loss_i) / norm_len / num_seqs          (Dr. GRPO)

    num_tokens / num_seqs default to this batch's; pass the whole mini-batch's when the batch is
    one of several gradient-accumulation micro-batches (or data-parallel shards), so the summed
    gradients equal those of the full mini-batch. norm_len defaults to t.
    """
    num_seqs = num_seqs if num_seqs is not None else loss.shape[0]
    if mode == "token-mean":
        num_tokens = num_tokens if num_tokens is not None else mask.sum()
        return masked_sum(loss, mask) / max(float(num_tokens), 1.0)
    if mode == "seq-mean-token-mean":
        return masked_mean(loss, mask, dim=1).sum() / num_seqs
    if mode == "seq-mean-token-sum-norm":
        return masked_sum(loss, mask, dim=1).sum() / (norm_len or loss.shape[1]) / num_seqs
    raise ValueError(f"unknown loss aggregation {mode!r}")


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    dual_clip: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped surrogate (Schulman et al. 2017, arXiv:1707.06347), per token. All inputs (b, t).

    L = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)); eps_high > eps_low is DAPO's clip-higher
    (arXiv:2503.14476). With dual_clip = c > 1, for A < 0 the loss is further capped at -A c
    (Ye et al. 2020, arXiv:1912.09729). Returns (loss (b, t), clipped (b, t) as 0/1 floats).
    """
    ratio = torch.exp(logprobs - old_logprobs)
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * torch.clamp(ratio, 1 - clip_eps_low, 1 + clip_eps_high)
    loss = torch.maximum(loss_unclipped, loss_clipped)
    clipped = (loss_clipped > loss_unclipped).float()
    if dual_clip is not None:
        capped = torch.minimum(loss, -advantages * dual_clip)
        loss = torch.where(advantages < 0, capped, loss)
    return loss * mask, clipped * mask


def truncated_importance_weights(
    old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor, cap: float = 2.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Truncated IS for the trainer/rollout-engine mismatch (Yao et al. 2025, "Your efficient RL
    framework secretly brings you off-policy RL training"; TRL's vllm_importance_sampling_correction).

    w_t = min(exp(old_t - rollout_t), C), detached. All inputs (b, t). Returns (w (b, t), per-token
    sums over the mask: `ratio` of w before truncation, `truncated` count, `logp_diff` of
    |old - rollout|) so callers can normalise by their own token count.
    """
    log_ratio = (old_logprobs - rollout_logprobs).detach()
    ratio = torch.exp(log_ratio)
    weights = torch.clamp(ratio, max=cap) * mask
    sums = {
        "ratio": masked_sum(ratio, mask),
        "truncated": masked_sum((ratio > cap).float(), mask),
        "logp_diff": masked_sum(log_ratio.abs(), mask),
    }
    return weights, sums


OFF_POLICY_LEVELS = ("token", "sequence", "geometric")


def off_policy_ratios(proximal_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, mask: torch.Tensor,
                      level: str = "token") -> torch.Tensor:
    """The importance ratio pi_prox / pi_behav of each token, detached. All inputs (b, t) -> (b, t).

    token:     r_t = exp(prox_t - behav_t)
    sequence:  r_i = exp(sum_t (prox_t - behav_t)) on every token of sample i (the product of its token ratios)
    geometric: r_i = exp(mean_t (prox_t - behav_t)), the sequence ratio normalised by length, which
               does not explode (or vanish) with length as the product does.
    Padding gets ratio 1.
    """
    log_ratio = (proximal_logprobs - behaviour_logprobs).detach() * mask
    if level == "token":
        pass
    elif level == "sequence":
        log_ratio = log_ratio.sum(1, keepdim=True).expand_as(mask)
    elif level == "geometric":
        log_ratio = (log_ratio.sum(1) / mask.sum(1).clamp(min=1))[:, None].expand_as(mask)
    else:
        raise ValueError(f"unknown importance-ratio level {level!r}; expected one of {', '.join(OFF_POLICY_LEVELS)}")
    # exp(88) overflows float32; a ratio that large is masked or truncated anyway.
    return torch.exp(log_ratio.clamp(max=80.0)) * mask + (1 - mask)


def off_policy_correction(proximal_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, mask: torch.Tensor,
                          level: str = "token", tis_cap: float | None = 2.0,
                          mask_band: tuple[float, float] | None = None) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Off-policy correction for samples generated by an older (stale) or different (engine) policy
    than the trainer's. All inputs (b, t); `proximal_logprobs` are the trainer's log-probs of the
    weights the update starts from (its old log-probs), `behaviour_logprobs` those recorded at generation.

    In asynchronous training the behaviour policy is up to k versions behind. Decoupled PPO (Hilton et
    al. 2022, arXiv:2110.00641; AReaL, Fu et al. 2025, arXiv:2505.24298, eq. 5) clips the ratio
    pi_theta / pi_prox as usual and weights each token by pi_prox / pi_behav, which is what this returns:

    - truncated IS (TIS, `tis_cap` = C): w = min(r, C), Yao et al. 2025 ("Your efficient RL framework
      secretly brings you off-policy RL training"); C = 2 as `truncated_importance_weights` and the
      spec's `rollout.importance_sampling.cap` default. None: no truncation (w = r).
    - masking (`mask_band` = (lo, hi)): tokens (or whole samples, at the sequence levels) whose ratio
      leaves [lo, hi] get no gradient: keep = 0. MIS / IcePop (Ling team 2025, "Small leak can sink a
      great ship", band [0.5, 5]; Liu, Yao et al. 2025, "When speed kills stability", sequence-level
      masking): a ratio far from 1 means a sample the trainer would almost never draw, whose gradient is noise.
      Masked tokens get weight 0.

    Returns (weights (b, t) detached, keep (b, t) 0/1, metrics): `off_policy/ratio_mean|max|min` over
    the response tokens (at the sequence levels, over samples), `off_policy/truncated_frac` (tokens
    with r > C), `off_policy/masked_frac` (tokens masked).
    """
    ratio = off_policy_ratios(proximal_logprobs, behaviour_logprobs, mask, level)
    keep = mask.clone()
    if mask_band is not None:
        lo, hi = mask_band
        keep = keep * ((ratio >= lo) & (ratio <= hi)).to(mask.dtype)
    weights = (ratio if tis_cap is None else torch.clamp(ratio, max=tis_cap)) * keep
    tokens = mask.sum().clamp(min=1)
    rows = mask.sum(1) > 0
    per_unit = ratio[mask > 0] if level == "token" else (masked_sum(ratio, mask, 1) / mask.sum(1).clamp(min=1))[rows]
    metrics = {
        "off_policy/ratio_mean": per_unit.mean().item() if len(per_unit) else 1.0,
        "off_policy/ratio_max": per_unit.max().item() if len(per_unit) else 1.0,
        "off_policy/ratio_min": per_unit.min().item() if len(per_unit) else 1.0,
        "off_policy/truncated_frac": (masked_sum((ratio > tis_cap).to(mask.dtype), keep) / tokens).item() if tis_cap is not None else 0.0,
        "off_policy/masked_frac": ((mask - keep).sum() / tokens).item(),
    }
    return weights, keep, metrics


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float | None = 0.2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss, per token: 0.5 * max((V - R)^2, (V_clip - R)^2), V_clip = V_old + clip(V - V_old, +-c).

    Returns (loss (b, t), clipped (b, t)).
    """
    unclipped = (values - returns) ** 2
    if clip is None:
        return 0.5 * unclipped * mask, torch.zeros_like(mask, dtype=values.dtype)
    v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    clipped_loss = (v_clipped - returns) ** 2
    return 0.5 * torch.maximum(unclipped, clipped_loss) * mask, (clipped_loss > unclipped).float() * mask


# ---------------------------------------------------------------- preference losses
# Pairs: p = number of (chosen, rejected) pairs. Sequence log-probs are summed over each
# completion's tokens by `sequence_logprobs`.


def sequence_logprobs(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log pi(y | x) = sum_t log pi(y_t | x, y_<t) over the masked tokens: (b, t) -> (b,)."""
    return masked_sum(logprobs, mask, dim=1)


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None) -> torch.Tensor:
    """Reward-model loss on pairs, per pair: -log sigmoid(r_c - r_r - m). All inputs (p,) -> (p,).

    The Bradley-Terry model (Bradley & Terry 1952) P(c > r) = sigmoid(r_c - r_r), fitted by maximum
    likelihood as in InstructGPT (Ouyang et al. 2022, arXiv:2203.02155, eq. 1). The optional margin m
    (how much better the chosen response is) asks for a gap of at least m, as in Llama 2 (Touvron et
    al. 2023, arXiv:2307.09288, eq. 2) and TRL's RewardTrainer.
    """
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    return -torch.nn.functional.logsigmoid(diff)


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    lengths: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct preference losses, per pair. All inputs are summed sequence log-probs (p,), as TRL's.

    h = (log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r)), the policy's log-ratio margin.
      sigmoid: -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
               DPO (Rafailov et al. 2023, arXiv:2305.18290, eq. 7); eps > 0 is conservative DPO, which
               treats each label as flipped with probability eps (Mitchell 2023, "A note on DPO with
               noisy preferences and relationship to IPO"), as earlier TRL releases' `sigmoid` did: TRL
               1.16's `sigmoid` ignores `label_smoothing` (only its `robust`, `exo_pair` and `aot` use it).
      ipo:     (h' - 1 / (2 beta))^2, IPO (Azar et al. 2023, arXiv:2310.12036, eq. 17) with h' the margin
               of length-averaged log-ratios, each divided by its completion's token count
               (`lengths` = (chosen counts, rejected counts), required), as TRL.
      hinge:   max(0, 1 - beta h), the SLiC hinge (Zhao et al. 2023, arXiv:2305.10425).
    Returns (losses (p,), chosen rewards (p,), rejected rewards (p,)); the implicit rewards
    beta (log pi - log ref), on summed log-probs whatever the loss (TRL's `rewards/*`), are detached.
    """
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    if loss_type == "sigmoid":
        h, logsig = chosen_ratio - rejected_ratio, torch.nn.functional.logsigmoid
        losses = -(1 - label_smoothing) * logsig(beta * h) - label_smoothing * logsig(-beta * h)
    elif loss_type == "ipo":
        if lengths is None:
            raise ValueError("the ipo loss averages each log-ratio over its completion: pass lengths=(chosen, rejected) token counts")
        h = chosen_ratio / lengths[0].clamp(min=1) - rejected_ratio / lengths[1].clamp(min=1)
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * (chosen_ratio - rejected_ratio))
    else:
        raise ValueError(f"unknown DPO loss {loss_type!r}; expected sigmoid, ipo or hinge")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


# ---------------------------------------------------------------- log-probs and entropy


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token]. logits (b, t, v), tokens (b, t) -> (b, t)."""
    logits = logits.float()
    return torch.gather(logits, -1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H = logsumexp(z) - sum softmax(z) z. (b, t, v) -> (b, t)."""
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


# ---------------------------------------------------------------- registry

OUTCOME_ESTIMATORS: dict[str, Callable[..., torch.Tensor]] = {
    "grpo": grpo_advantages,
    "dr_grpo": dr_grpo_advantages,
    "rloo": rloo_advantages,
}
