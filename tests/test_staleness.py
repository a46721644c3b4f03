"""orchestrator/core/staleness.py: the bounded rollout buffer, by hand, and a simulated async loop
killed at every point of an epoch (each prompt trained exactly once). Pure Python, no Ray."""

from __future__ import annotations

import json

import pytest

from orchestrator.core.staleness import RolloutBuffer, Sample, StalenessError, check_staleness, staleness_metrics


def group(version: int, n: int = 2, scores=(0.0, 1.0)) -> list[Sample]:
    return [Sample(versions=[version], score=scores[i % len(scores)]) for i in range(n)]


def test_take_returns_only_complete_groups_within_the_bound_and_requeues_the_stale():
    buf = RolloutBuffer(order=[10, 11, 12, 13], group_size=2, groups_per_step=2, max_staleness=1, capacity=4)
    assert buf.draw() == [10, 11, 12, 13]
    buf.put(10, [Sample([0, 0, 1])])  # half a group: not ready
    buf.put(11, group(1))
    buf.put(12, group(2))
    assert [g.prompt_id for g in buf.ready] == [11, 12]
    buf.put(10, [Sample([1, 2])])  # now whole; its oldest token is version 0
    # An update from version 2 with k = 1: version 0 is 2 behind (stale), 1 and 2 are within.
    taken = buf.take(version=2)
    assert [g.prompt_id for g in taken.groups] == [11, 12]
    assert taken.stale == [10] and buf.requeued == [10]
    assert sorted(taken.staleness) == [0, 0, 1, 1]
    assert buf.counts["stale_regenerated"] == 1 and buf.counts["taken_groups"] == 2
    # The requeued prompt is drawn again before the rest of the order.
    assert buf.draw() == [10]


def test_stale_groups_are_dropped_and_counted_under_drop():
    buf = RolloutBuffer(order=[0, 1], group_size=1, groups_per_step=1, max_staleness=0, stale_policy="drop")
    buf.draw()
    buf.put(0, [Sample([0])])
    taken = buf.take(version=1)
    assert taken.groups == [] and taken.stale == [0] and buf.requeued == [] and buf.counts["stale_dropped"] == 1


def test_back_pressure_asks_for_no_more_than_the_capacity():
    buf = RolloutBuffer(order=range(10), group_size=1, groups_per_step=2, max_staleness=1)
    assert buf.capacity == 4  # (k + 1) * groups_per_step
    assert buf.draw() == [0, 1, 2, 3]
    assert buf.want() == 0 and buf.draw() == []  # the producer waits
    buf.put(0, [Sample([0])])
    assert buf.want() == 0  # a ready group still holds its place
    buf.put(1, [Sample([0])])
    assert len(buf.take(version=0).groups) == 2
    assert buf.want() == 2 and buf.draw() == [4, 5]


def test_not_enough_ready_gives_nothing_unless_flushed():
    buf = RolloutBuffer(order=[0, 1, 2], group_size=1, groups_per_step=2)
    buf.draw()
    buf.put(0, [Sample([0])])
    assert buf.take(version=0).groups == []
    assert [g.prompt_id for g in buf.take(version=0, flush=True).groups] == [0]


def test_dynamic_sampling_drops_zero_spread_groups_and_asks_for_another_prompt():
    buf = RolloutBuffer(order=range(6), group_size=3, groups_per_step=2, drop_zero_spread=True)
    assert buf.draw() == [0, 1]
    assert buf.put(0, group(0, 3, scores=(1.0, 1.0, 1.0))) is None  # all the same: no GRPO signal
    assert buf.counts["filtered"] == 1
    assert buf.want() == 1 and buf.draw() == [2]  # the batch is refilled, not shrunk
    assert buf.put(1, group(0, 3, scores=(0.0, 1.0, 1.0))) is not None
    # Unscored samples are never filtered (the filter needs rewards).
    assert buf.put(2, [Sample([0]), Sample([0]), Sample([0])]) is not None
    assert len(buf.take(version=0).groups) == 2
    assert buf.filtered == [0]
    again = RolloutBuffer(order=range(6), group_size=3, groups_per_step=2, drop_zero_spread=True)
    again.load_state_dict(json.loads(json.dumps(buf.state_dict())))
    assert again.filtered == [0] and again.counts["filtered"] == 1  # a resumed run knows what was dropped


def test_an_unbounded_order_is_kept_as_a_range():
    """Dynamic sampling draws past the stage's steps (orchestrator/stages/async_loop.py): its order is open-ended."""
    import sys

    buf = RolloutBuffer(order=range(10, sys.maxsize), group_size=1, groups_per_step=2)
    assert buf.draw() == [10, 11] and buf.want() == 0 and not buf.exhausted()


def test_put_refuses_what_is_not_in_flight_or_overfills_a_group():
    buf = RolloutBuffer(order=[0], group_size=2, groups_per_step=1)
    with pytest.raises(KeyError):
        buf.put(0, group(0))
    buf.draw()
    with pytest.raises(ValueError):
        buf.put(0, group(0, 3))


def test_check_staleness_names_the_versions():
    check_staleness([3, 4, 5], version=5, max_staleness=2)
    with pytest.raises(StalenessError, match="2..5 outside \\[3, 5\\]"):
        check_staleness([2, 5], version=5, max_staleness=2)
    with pytest.raises(StalenessError):  # a token from a version the trainer has not made yet
        check_staleness([6], version=5, max_staleness=2)


def test_staleness_metrics_by_hand():
    # Samples 0, 0, 1, 2 behind with k = 2: mean 3/4, max 2, fractions 1/2, 1/4, 1/4.
    assert staleness_metrics([0, 0, 1, 2], 2) == {
        "staleness/mean": 0.75, "staleness/max": 2.0, "staleness/frac_0": 0.5, "staleness/frac_1": 0.25, "staleness/frac_2": 0.25}


def test_state_dict_is_plain_data_and_in_flight_prompts_come_back_first():
    buf = RolloutBuffer(order=[5, 6, 7, 8], group_size=1, groups_per_step=1, max_staleness=2)
    buf.draw()  # 5, 6, 7 in flight (capacity 3)
    buf.put(6, [Sample([0], 0.5, {"ids": [1, 2]})])
    state = json.loads(json.dumps(buf.state_dict()))
    other = RolloutBuffer(order=[5, 6, 7, 8], group_size=1, groups_per_step=1, max_staleness=2)
    other.load_state_dict(state)
    assert other.position == 3 and other.in_flight == {} and other.requeued == [5, 7]
    assert [(g.prompt_id, g.samples[0].payload) for g in other.ready] == [(6, {"ids": [1, 2]})]
    assert other.draw() == [5, 7]


# ---------------------------------------------------------------- an async loop, killed anywhere


ORDER = list(range(23))
K, N, PER_STEP = 1, 2, 3


def gen_ticks(pid: int) -> int:
    """How long prompt pid takes to generate: lengths 1..6 ticks, so groups finish out of order
    and some run past an update (partial rollouts: the second half gets the newer version)."""
    return (pid * 7) % 6 + 1


def zero_spread(pid: int) -> bool:
    return pid % 5 == 0


class Job:
    """One process of the job: the buffer, the weights' version, generations under way, and what the
    model has learned from (`trained`, part of the weights, so it is checkpointed with them)."""

    def __init__(self, ckpt: dict | None):
        self.buf = RolloutBuffer(ORDER, N, PER_STEP, max_staleness=K, drop_zero_spread=True)
        self.version, self.trained, self.running = 0, [], {}  # running: pid -> (start version, ticks left)
        if ckpt is not None:
            self.buf.load_state_dict(ckpt["buffer"])
            self.version, self.trained = ckpt["version"], list(ckpt["trained"])

    def checkpoint(self) -> dict:
        return json.loads(json.dumps({"buffer": self.buf.state_dict(), "version": self.version, "trained": self.trained}))

    def tick(self) -> dict | None:
        """One unit of time: generation advances, complete groups arrive, the trainer takes a batch if
        it can (and checkpoints after every second update). Returns a new checkpoint, if one was made."""
        for pid in self.buf.draw():
            self.running[pid] = (self.version, gen_ticks(pid))
        for pid, (start, left) in list(self.running.items()):
            if left > 1:
                self.running[pid] = (start, left - 1)
                continue
            del self.running[pid]
            scores = (1.0, 1.0) if zero_spread(pid) else (0.0, 1.0)
            self.buf.put(pid, [Sample([start, self.version], scores[i], {"pid": pid}) for i in range(N)])
        flush = self.buf.position == len(ORDER) and not self.running and not self.buf.requeued
        taken = self.buf.take(self.version, flush=flush)
        if not taken.groups:
            return None
        assert max(taken.staleness) <= K
        self.trained += [g.prompt_id for g in taken.groups]
        self.version += 1
        return self.checkpoint() if self.version % 2 == 0 else None


def run(kills: set[int], limit: int = 400) -> tuple[list[int], int]:
    """Tick until the epoch is done; at each tick in `kills` the process dies after the tick and the
    job resumes from its last checkpoint. Returns (prompts trained on, in order; ticks)."""
    ckpt, job = None, Job(None)
    for t in range(limit):
        if job.buf.exhausted() and not job.running:
            return job.trained, t
        ckpt = job.tick() or ckpt
        if t in kills:
            job = Job(ckpt)
    raise AssertionError("the epoch did not finish")


def expected() -> list[int]:
    return sorted(p for p in ORDER if not zero_spread(p))


def test_the_loop_trains_every_prompt_once_and_stays_within_the_bound():
    trained, ticks = run(set())
    assert sorted(trained) == expected()
    assert ticks > 5


def test_a_kill_at_every_point_of_the_epoch_trains_every_prompt_exactly_once():
    _, ticks = run(set())
    for t in range(ticks + 1):
        trained, _ = run({t})
        assert sorted(trained) == expected(), f"killed after tick {t}"


def test_repeated_kills_still_train_every_prompt_exactly_once():
    for first in range(0, 12):
        trained, _ = run({first, first + 4, first + 9})
        assert sorted(trained) == expected(), f"killed after ticks {first}, {first + 4}, {first + 9}"


def test_take_by_prompt_ids_waits_for_exactly_those_groups():
    """In-order consumption (the async driver): the step's prompts once all are complete, whatever finished first."""
    buf = RolloutBuffer(range(4), group_size=2, groups_per_step=2, max_staleness=1)
    buf.draw(4)
    buf.put(2, group(0))
    buf.put(1, group(0))
    assert buf.take(0, prompt_ids=[0, 1]).groups == []  # prompt 0 is still generating
    buf.put(0, group(1))
    taken = buf.take(1, prompt_ids=[0, 1])
    assert sorted(g.prompt_id for g in taken.groups) == [0, 1] and [g.prompt_id for g in buf.ready] == [2]
    assert sorted(taken.staleness) == [0, 0, 1, 1]
