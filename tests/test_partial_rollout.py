"""workers/partial_rollout.py on the tiny Qwen2 (real transformers, CPU): chunked generation equals
one-shot greedy generation token for token, and a weight swap between chunks shows in the tokens'
versions and behaviour log-probs from that chunk on."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from orchestrator.core.batch import left_pad, response_mask_until_eos
from workers.common import response_logprobs
from workers.partial_rollout import PartialRollout, generate_chunked

PROMPTS = [[5, 9, 13], [40, 41, 42, 43, 44, 45, 46], [7], [100, 3, 60, 2]]
MAX_NEW = 10


@pytest.fixture(scope="module")
def model_and_tok(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model).eval(), AutoTokenizer.from_pretrained(tiny_model)


def rollout(tok, **kw) -> PartialRollout:
    return PartialRollout(PROMPTS, tok.eos_token_id, tok.pad_token_id, max_new_tokens=MAX_NEW, greedy=True, **kw)


@torch.no_grad()
def one_shot(model, tok) -> list[list[int]]:
    ids, mask = left_pad(PROMPTS, tok.pad_token_id)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    responses = out[:, ids.shape[1]:]
    keep = response_mask_until_eos(responses, tok.eos_token_id)
    return [[t for t, k in zip(r.tolist(), m.tolist()) if k and t != tok.pad_token_id] for r, m in zip(responses, keep)]


@pytest.mark.parametrize("chunk", [1, 3, MAX_NEW])
def test_chunked_greedy_equals_one_shot_greedy(model_and_tok, chunk):
    model, tok = model_and_tok
    r = generate_chunked(model, rollout(tok), chunk, version=lambda: 0)
    assert r.tokens == one_shot(model, tok)
    batch, versions = r.batch()
    assert len(batch) == len(PROMPTS) and (versions[batch.response_mask > 0] == 0).all()


def test_a_weight_swap_between_chunks_tags_the_tokens_after_it(model_and_tok):
    model, tok = model_and_tok
    old = {k: v.clone() for k, v in model.state_dict().items()}
    swapped = {"version": 0}

    def between(chunk: int) -> None:
        if chunk == 2:  # new weights arrive before the third chunk
            g = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.5 * torch.randn(p.shape, generator=g))
            swapped["version"] = 1

    try:
        r = generate_chunked(model, rollout(tok), 3, version=lambda: swapped["version"], between_chunks=between)
        new_state = {k: v.clone() for k, v in model.state_dict().items()}
    finally:
        model.load_state_dict(old)
    batch, versions = r.batch()
    for row, tokens in zip(versions.tolist(), r.tokens):
        n = len(tokens)
        assert row[:n] == [0] * min(n, 6) + [1] * max(0, n - 6)  # chunks 0 and 1 are tokens 0..5
    assert (versions[:, 6:][batch.response_mask[:, 6:] > 0] == 1).all() and (batch.response_mask[:, 6:] > 0).any()
    # Each recorded log-prob is the log-prob of the weights that drew it: the old model's before the
    # swap, the new model's after (teacher-forced over the whole sequence).
    mask = batch.response_mask
    with torch.no_grad():
        old_lp, _ = response_logprobs(model, batch)
        model.load_state_dict(new_state)
        new_lp, _ = response_logprobs(model, batch)
        model.load_state_dict(old)
    expected = torch.where(versions == 0, old_lp, new_lp) * mask
    assert_close(batch.logprobs, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(old_lp * mask, new_lp * mask, atol=1e-3)  # the swap changed what the model gives


def test_prompts_join_in_flight_and_leave_once_their_group_finished(model_and_tok):
    """Asynchronous training's rollout keeps one PartialRollout: prompts added after some chunks stop at
    their own token budget, and each prompt is handed out once, when its rows have all finished."""
    model, tok = model_and_tok
    r = PartialRollout(PROMPTS[:2], tok.eos_token_id, tok.pad_token_id, max_new_tokens=MAX_NEW, greedy=True)
    r.advance(model, 0, 3)
    assert r.add(PROMPTS[2:]) == [2, 3]
    taken = {}
    while not r.finished:
        r.advance(model, 1, 3)
        for index, batch, versions in r.take_finished():
            assert index not in taken
            taken[index] = (batch, versions)
    assert sorted(taken) == [0, 1, 2, 3] and r.take_finished() == []
    expected = one_shot(model, tok)
    for index, (batch, versions) in taken.items():
        n = int(batch.response_mask.sum())
        assert batch.responses[0, :n].tolist() == expected[index]  # the same tokens as one-shot greedy, whoever it shared chunks with
        first = 3 if index < 2 else 0  # the chunk of version 0 had only the first two prompts
        assert versions[0, :n].tolist() == [0] * min(n, first) + [1] * max(0, n - first)
