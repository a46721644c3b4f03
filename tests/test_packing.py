"""Token-budget micro-batches (`optim.micro_batch_tokens`), activation checkpointing and bf16
autocast: the trainer, critic and reference as plain classes (no Ray) on the tiny model. Packing and
checkpointing change how the compute is cut, never the loss or the gradients."""

from __future__ import annotations

import pytest
import torch

from orchestrator.core.batch import Batch, build_batch, micro_batches, token_budget_groups
from orchestrator.core.spec import OptimSpec, RolloutSpec
from workers.common import batched_logprobs, response_logprobs
from workers.critic import Critic
from workers.trainer import PolicyTrainer


def test_token_budget_groups_by_hand():
    # totals 7, 4+1=5, 3+3=6, 1+2=3 -> order 0, 2, 1, 3. [0] alone (adding 2 would be 2 x (3+5) = 16);
    # [2] alone (adding 1: 2 x (4+3) = 14); [1, 3]: 2 x (4+2) = 12 fits.
    assert token_budget_groups([2, 4, 3, 1], [5, 1, 3, 2], 12) == [[0], [2], [1, 3]]
    # A row longer than the budget is a micro-batch of its own; every row appears once.
    assert token_budget_groups([10, 1, 1], [10, 1, 1], 8) == [[0], [1, 2]]
    assert sorted(sum(token_budget_groups([3] * 7, [2] * 7, 10), [])) == list(range(7))


def hand_batch() -> Batch:
    # prompt_len 4, R 4: row 0 = 2-token prompt, 2-token response; row 1 = 3-token prompt, 1-token response.
    responses = torch.tensor([[11, 12, 0, 0], [13, 0, 0, 0]])
    valid = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]])
    return build_batch([[5, 6], [7, 8, 9]], responses, valid, pad_id=0, n=1, logprobs=torch.ones(2, 4))


def test_trim_cuts_the_padding_no_row_uses():
    b = hand_batch()
    assert b.input_ids.shape == (2, 7) and b.prompt_len == 3  # build_batch pads to the longest prompt (3), R = 4
    t = b.select(torch.tensor([0])).trim()  # row 0 alone: 2-token prompt, 2-token response
    assert t.prompt_len == 2 and t.input_ids.tolist() == [[5, 6, 11, 12]]
    assert t.response_mask.tolist() == [[1.0, 1.0]] and t.logprobs.shape == (1, 2)
    t = b.select(torch.tensor([1])).trim()
    assert t.prompt_len == 3 and t.input_ids.tolist() == [[7, 8, 9, 13]] and t.response_mask.shape == (1, 1)
    assert b.trim().input_ids.shape == (2, 5)  # together: every prompt column, the first 2 response columns
    parts = micro_batches(b, tokens=4)  # each row alone: 4 tokens each
    assert [p.input_ids.shape for p in parts] == [(1, 4), (1, 4)]


def varied_batch(n: int = 12, seed: int = 0) -> Batch:
    """Prompts of 2..9 tokens, responses of 1..12 tokens: padding dominates a row-count micro-batch."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 200, (int(torch.randint(2, 10, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]
    lengths = torch.randint(1, 13, (n,), generator=g)
    responses = torch.randint(3, 200, (n, 12), generator=g)
    valid = (torch.arange(12)[None] < lengths[:, None]).long()
    batch = build_batch(prompts, responses, valid, pad_id=259, n=1)
    return batch.replace(advantages=torch.randn(n, 12, generator=g) * batch.response_mask,
                         returns=torch.randn(n, 12, generator=g) * batch.response_mask,
                         values=torch.randn(n, 12, generator=g) * batch.response_mask)


def grads_after_step(role, batch: Batch, **micro) -> tuple[dict, dict[str, torch.Tensor]]:
    """One optimiser step with lr 0: the stats and the gradients it summed (the weights do not move)."""
    if isinstance(role, PolicyTrainer):
        loss_fn = lambda mb, t, s: role._loss(mb, True, t, s)  # noqa: E731
    else:
        loss_fn = role._loss
    for group in role.optimizer.param_groups:
        group["lr"] = 0.0
    stats = role.optimizer_step(batch, micro.get("size"), loss_fn, micro.get("tokens"))
    return stats, {n: p.grad.clone() for n, p in role.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_packed_and_unpacked_micro_batches_give_the_same_loss_and_gradients(tiny_model, loss_agg):
    optim = OptimSpec(lr=1e-3, prompts_per_step=12, loss_agg=loss_agg, grad_clip=None)
    trainer = PolicyTrainer(str(tiny_model), optim, RolloutSpec(n=1, max_new_tokens=12), threads=1)
    batch = varied_batch()
    shapes: list[tuple[int, int]] = []
    hook = trainer.model.register_forward_pre_hook(lambda m, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    plain_stats, plain = grads_after_step(trainer, batch, size=3)
    plain_shapes, shapes[:] = list(shapes), []
    packed_stats, packed = grads_after_step(trainer, batch, tokens=40)
    hook.remove()
    # The forwards the step ran: 4 of 3 full-width rows, then micro-batches within the budget that pad less.
    assert plain_shapes == [(3, batch.input_ids.shape[1])] * 4
    assert all(rows * width <= 40 or rows == 1 for rows, width in shapes) and sum(r for r, _ in shapes) == 12
    assert sum(r * w for r, w in shapes) < sum(r * w for r, w in plain_shapes)
    assert plain_stats.keys() == packed_stats.keys()
    for k in plain_stats:
        assert packed_stats[k] == pytest.approx(plain_stats[k], rel=1e-4, abs=1e-6), k
    for name in plain:
        torch.testing.assert_close(packed[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)


def test_the_critic_packs_too(tiny_model):
    critic = Critic(str(tiny_model), OptimSpec(critic_lr=1e-3, prompts_per_step=12, grad_clip=None), threads=1)
    batch = varied_batch(seed=1)
    plain_stats, plain = grads_after_step(critic, batch, size=4)
    packed_stats, packed = grads_after_step(critic, batch, tokens=30)
    assert packed_stats["value_loss"] == pytest.approx(plain_stats["value_loss"], rel=1e-5)
    for name in plain:
        torch.testing.assert_close(packed[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)


def test_reference_logprobs_are_the_same_packed(tiny_model):
    from workers.common import load_model

    model = load_model(str(tiny_model)).eval()
    batch = varied_batch(seed=2)
    plain = batched_logprobs(model, batch, 1.0, None) * batch.response_mask
    packed = batched_logprobs(model, batch, 1.0, None, micro_batch_tokens=25) * batch.response_mask
    torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-5)


def test_activation_checkpointing_changes_no_gradient(tiny_model):
    batch = varied_batch(seed=3)
    results = []
    for checkpointing in (False, True):
        optim = OptimSpec(lr=1e-3, prompts_per_step=12, grad_clip=None, gradient_checkpointing=checkpointing)
        trainer = PolicyTrainer(str(tiny_model), optim, RolloutSpec(n=1, max_new_tokens=12), threads=1)
        assert trainer.model.is_gradient_checkpointing == checkpointing
        results.append(grads_after_step(trainer, batch, size=6))
    (stats_a, grads_a), (stats_b, grads_b) = results
    assert stats_a["policy_loss"] == pytest.approx(stats_b["policy_loss"], rel=1e-6)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-7, msg=name)


def test_bf16_autocast_keeps_fp32_weights_and_logprobs_close_to_fp32(tiny_model):
    optim = OptimSpec(lr=1e-3, prompts_per_step=12, mixed_precision="bf16")
    trainer = PolicyTrainer(str(tiny_model), optim, RolloutSpec(n=1, max_new_tokens=12), threads=1)
    batch = varied_batch(seed=4)
    mask = batch.response_mask.bool()
    with torch.no_grad():
        fp32, _ = response_logprobs(trainer.model, batch)
        with trainer.autocast():
            bf16, _ = response_logprobs(trainer.model, batch)
    assert bf16.dtype == torch.float32  # the log-softmax runs in fp32 on the bf16 logits
    # The bound: bf16 keeps 8 bits of mantissa; on this model the log-probs (about -5.6) move by < 0.05.
    assert (bf16 - fp32)[mask].abs().max() < 0.05
    assert (bf16 - fp32)[mask].abs().max() > 0  # autocast did run in bf16
    stats, grads = grads_after_step(trainer, batch, size=6)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # master weights
    assert all(g.dtype == torch.float32 for g in grads.values()) and stats["grad_norm"] > 0
