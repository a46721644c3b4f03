"""The batch contract (`orchestrator.core.batch`): sharding, row selection, padding helpers,
build_batch's layout and concat's re-padding, each against values written out by hand. CPU only."""

import pytest
import torch

from orchestrator.core.batch import (
    Batch,
    build_batch,
    concat,
    even_bounds,
    left_pad,
    response_mask_until_eos,
    right_pad,
)

PAD = 0


def numbered(rows: int, groups: list[int] | None = None, extras: list[dict] | None = None) -> Batch:
    """`rows` samples whose every tensor field holds the row number, so any row can be traced."""
    r = torch.arange(rows)
    groups = groups if groups is not None else list(range(rows))
    return Batch(
        input_ids=r[:, None].repeat(1, 3),
        attention_mask=torch.ones(rows, 3, dtype=torch.long),
        response_mask=torch.ones(rows, 2),
        group_ids=torch.tensor(groups),
        prompt_len=1,
        logprobs=r[:, None].repeat(1, 2).double(),
        scores=r.double(),
        extras=extras if extras is not None else [{"g": g} for g in range(max(groups) + 1)],
    )


@pytest.mark.parametrize(("total", "parts", "bounds"), [
    (10, 4, [(0, 3), (3, 6), (6, 8), (8, 10)]),  # 10 = 3 + 3 + 2 + 2: the first 10 % 4 ranges are longer
    (3, 4, [(0, 1), (1, 2), (2, 3), (3, 3)]),  # fewer rows than parts: one empty range, last
    (8, 4, [(0, 2), (2, 4), (4, 6), (6, 8)]),
    (7, 1, [(0, 7)]),
    (0, 2, [(0, 0), (0, 0)]),
])
def test_even_bounds_by_hand(total, parts, bounds):
    assert even_bounds(total, parts) == bounds


@pytest.mark.parametrize(("rows", "parts", "sizes"), [(10, 4, [3, 3, 2, 2]), (3, 4, [1, 1, 1, 0]), (12, 3, [4, 4, 4]), (5, 2, [3, 2])])
def test_split_covers_every_row_once(rows, parts, sizes):
    shards = numbered(rows).split(parts)
    assert [len(s) for s in shards] == sizes
    # In order, nothing dropped, nothing repeated, and every field cut along the same rows.
    assert torch.cat([s.scores for s in shards]).tolist() == list(range(rows))
    for s in shards:
        assert torch.equal(s.input_ids[:, 0], s.scores.long()) and torch.equal(s.logprobs[:, 0], s.scores)


def test_split_keeps_groups_and_remaps_their_ids():
    # Prompts 0, 1, 2 with 3 samples each; 9 rows into 2 shards of 5 and 4 cut prompt 1 in two.
    extras = [{"answer": 10}, {"answer": 11}, {"answer": 12}]
    a, b = numbered(9, [0, 0, 0, 1, 1, 1, 2, 2, 2], extras).split(2)
    assert a.group_ids.tolist() == [0, 0, 0, 1, 1] and a.extras == [{"answer": 10}, {"answer": 11}]
    assert b.group_ids.tolist() == [0, 1, 1, 1] and b.extras == [{"answer": 11}, {"answer": 12}]


def test_select_remaps_group_ids_to_the_prompts_still_present():
    extras = [{"p": 0}, {"p": 1}, {"p": 2}, {"p": 3}]
    b = numbered(8, [0, 0, 1, 1, 2, 2, 3, 3], extras)
    picked = b.select(torch.tensor([6, 2, 7, 3]))
    # Groups 3 and 1 remain; ids become 0, 1 in ascending order of the old ids, extras follow.
    assert picked.scores.tolist() == [6.0, 2.0, 7.0, 3.0]
    assert picked.group_ids.tolist() == [1, 0, 1, 0]
    assert picked.extras == [{"p": 1}, {"p": 3}]
    assert picked.prompt_len == 1 and picked.advantages is None
    # A batch without extras stays without.
    assert numbered(4, [0, 0, 1, 1], extras=[]).select(slice(2, 4)).extras == []


def test_left_pad_by_hand():
    ids, mask = left_pad([[5, 6, 7], [8], [9, 10]], pad_id=PAD)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 9, 10]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert ids.dtype == mask.dtype == torch.long


def test_right_pad_by_hand():
    values, valid = right_pad([[1.5, 2.5], [], [3.5, 4.5, 5.5]], pad_id=-1, dtype=torch.float64)
    assert values.tolist() == [[1.5, 2.5, -1.0], [-1.0, -1.0, -1.0], [3.5, 4.5, 5.5]]
    assert valid.tolist() == [[1, 1, 0], [0, 0, 0], [1, 1, 1]]
    assert values.dtype == torch.float64 and valid.dtype == torch.long


def test_response_mask_until_eos_by_hand():
    responses = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9]])
    # Up to and including the first EOS (2); a second EOS does not reopen the mask.
    assert response_mask_until_eos(responses, eos_id=2).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_build_batch_layout_by_hand():
    prompts = [[11, 12], [13]]
    responses = torch.tensor([[21, 22, 23], [24, 25, 99], [26, 99, 99], [27, 28, 29]])
    valid = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]])
    logprobs = torch.full((4, 3), -0.5)
    b = build_batch(prompts, responses, valid, pad_id=PAD, n=2, logprobs=logprobs, extras=[{"a": 1}, {"a": 2}])
    assert b.prompt_len == 2
    # [left-padded prompt | right-padded response]; tokens outside the attention mask become pad.
    assert b.input_ids.tolist() == [
        [11, 12, 21, 22, 23],
        [11, 12, 24, 25, 0],
        [0, 13, 26, 0, 0],
        [0, 13, 27, 28, 29],
    ]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [0, 1, 1, 0, 0], [0, 1, 1, 1, 1]]
    assert b.response_mask.tolist() == valid.float().tolist()
    assert b.group_ids.tolist() == [0, 0, 1, 1]
    assert b.responses.tolist() == [[21, 22, 23], [24, 25, 0], [26, 0, 0], [27, 28, 29]]
    # Log-probs are zeroed where no loss falls.
    assert b.logprobs.tolist() == [[-0.5] * 3, [-0.5, -0.5, 0.0], [-0.5, 0.0, 0.0], [-0.5] * 3]
    assert b.extras == [{"a": 1}, {"a": 2}]


def test_build_batch_separate_loss_mask():
    # The model sees all three tokens, but the loss stops after the first.
    b = build_batch([[1]], torch.tensor([[4, 5, 6]]), torch.ones(1, 3), PAD, response_mask=torch.tensor([[1.0, 0, 0]]),
                    logprobs=torch.tensor([[-1.0, -2.0, -3.0]]))
    assert b.attention_mask.tolist() == [[1, 1, 1, 1]]
    assert b.response_mask.tolist() == [[1.0, 0.0, 0.0]]
    assert b.logprobs.tolist() == [[-1.0, 0.0, 0.0]]


def test_concat_repads_to_the_widest_prompt_and_response():
    first = build_batch([[11, 12, 13]], torch.tensor([[21], [22]]), torch.ones(2, 1), PAD, n=2,
                        logprobs=torch.tensor([[-1.0], [-2.0]]), extras=[{"p": "a"}])
    second = build_batch([[14]], torch.tensor([[31, 32, 33]]), torch.tensor([[1, 1, 0]]), PAD, n=1,
                         logprobs=torch.tensor([[-3.0, -4.0, -5.0]]), extras=[{"p": "b"}])
    b = concat([first, second])
    assert b.prompt_len == 3 and len(b) == 3
    # Prompts gain padding on the left, responses on the right.
    assert b.input_ids.tolist() == [[11, 12, 13, 21, 0, 0], [11, 12, 13, 22, 0, 0], [0, 0, 14, 31, 32, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0]]
    assert b.response_mask.tolist() == [[1, 0, 0], [1, 0, 0], [1, 1, 0]]
    assert b.logprobs.tolist() == [[-1.0, 0, 0], [-2.0, 0, 0], [-3.0, -4.0, 0]]
    # The second batch's prompt 0 is prompt 1 of the whole.
    assert b.group_ids.tolist() == [0, 0, 1]
    assert b.extras == [{"p": "a"}, {"p": "b"}]
    assert b.responses.tolist() == [[21, 0, 0], [22, 0, 0], [31, 32, 0]]


def test_concat_then_split_round_trips():
    parts = [build_batch([[i + 1] * (i + 1)], torch.tensor([[i + 5] * (3 - i)]), torch.ones(1, 3 - i), PAD, extras=[{"i": i}])
             for i in range(3)]
    whole = concat(parts)
    shards = whole.split(3)
    for i, shard in enumerate(shards):
        assert shard.extras == [{"i": i}] and shard.group_ids.tolist() == [0]
        assert shard.responses[0, : 3 - i].tolist() == [i + 5] * (3 - i)
        assert shard.input_ids[0, : whole.prompt_len].tolist() == [0] * (2 - i) + [i + 1] * (i + 1)


def test_concat_of_one_is_that_batch():
    b = numbered(2)
    assert concat([b]) is b


def test_pickling_keeps_every_field_and_sends_a_shard_without_the_rest():
    import pickle

    whole = numbered(64, groups=[i // 8 for i in range(64)], extras=[{"answer": g} for g in range(8)])
    whole = whole.replace(scores=torch.arange(64, dtype=torch.bfloat16), values=None)
    back = pickle.loads(pickle.dumps(whole, protocol=5))
    for f in ("input_ids", "attention_mask", "response_mask", "group_ids", "logprobs", "scores"):
        assert getattr(back, f).dtype == getattr(whole, f).dtype and torch.equal(getattr(back, f), getattr(whole, f)), f
    assert (back.prompt_len, back.values, back.extras) == (1, None, whole.extras)
    back.input_ids += 1  # writable, like any tensor
    # A shard is a view of the whole batch's storage; it is sent as its own rows only.
    shard = whole.split(8)[0]
    assert len(pickle.dumps(shard, protocol=5)) < len(pickle.dumps(whole, protocol=5)) / 2
    assert torch.equal(pickle.loads(pickle.dumps(shard, protocol=5)).input_ids, whole.input_ids[:8])
