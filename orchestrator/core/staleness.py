"""The rollout buffer of asynchronous training, with a staleness bound (issue 29).

Rollout workers generate continuously; the trainer takes complete GRPO groups from this buffer.
Policy version v is the trainer's weights after v updates. Every sample carries the version(s) that
generated it (one per token with partial rollouts, where a generation may span weight updates);
its staleness at an update from version v is v minus its oldest token's version. `max_staleness`
k guarantees that no sample trained on is more than k versions behind: `take` returns only groups
within the bound, and sends the others back to be generated again (or drops them, counted).
k = 0 is the synchronous loop: every sample comes from the weights being updated.

The buffer also owns the epoch's data position, so that its state (`state_dict`) is everything a
resume needs to train every prompt of the epoch exactly once: the position in the epoch's order,
the prompts handed out and not yet back (in flight: generated again after a resume, as their
generations died with the process), the prompts to generate again, and the complete groups waiting.

Pure Python (no Ray, no torch): the driver wires it to actors; tests drive it by hand.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence


@dataclass
class Sample:
    """One completion of a prompt. `versions`: the policy version of each response token (or one
    for the whole sample); `score`: its reward, when known (dynamic sampling reads it); `payload`:
    whatever the caller trains on (token ids, log-probs, a Batch row), kept as given."""

    versions: Sequence[int]
    score: float | None = None
    payload: Any = None

    @property
    def oldest(self) -> int:
        return min(self.versions)


@dataclass
class Group:
    """The `n` samples of one prompt: GRPO's advantages need all of them, so only whole groups are taken."""

    prompt_id: int
    samples: list[Sample] = field(default_factory=list)

    @property
    def oldest(self) -> int:
        return min(s.oldest for s in self.samples)

    def staleness(self, version: int) -> int:
        return version - self.oldest

    def zero_spread(self, eps: float = 1e-6) -> bool:
        """Every sample scored the same (GRPO gives each a zero advantage). Unscored groups never are."""
        scores = [s.score for s in self.samples]
        if any(x is None for x in scores):
            return False
        return max(scores) - min(scores) < eps


@dataclass
class Taken:
    """What one `take` gives the trainer, and what it sent back."""

    groups: list[Group]
    stale: list[int]  # prompt ids found past the bound: queued again (`stale_policy: regenerate`) or dropped
    staleness: list[int]  # per sample taken: version - oldest token version, each in [0, k]


class StalenessError(AssertionError):
    """A sample past the bound reached the trainer: the guarantee is broken, never silently."""


def check_staleness(versions: Iterable[int], version: int, max_staleness: int) -> None:
    """Raise unless every token version is within [version - k, version] (a newer one is a bug too)."""
    versions = list(versions)
    if versions and (min(versions) < version - max_staleness or max(versions) > version):
        raise StalenessError(f"token versions {min(versions)}..{max(versions)} outside [{version - max_staleness}, {version}]"
                             f" (update from version {version}, max_staleness {max_staleness})")


class RolloutBuffer:
    """Complete groups waiting for the trainer, and the epoch's prompts: drawn, in flight, queued again.

    capacity: groups buffered plus in flight at most; `want` never asks for more (back-pressure: a
        producer asked for 0 prompts waits). Default (k + 1) * groups_per_step, AReaL's bound on how
        far generation may run ahead (Fu et al. 2025, arXiv:2505.24298, sec. 5.1).
    drop_zero_spread: DAPO's dynamic sampling (Yu et al. 2025, arXiv:2503.14476, sec. 3.2): a group
        whose samples all scored the same is dropped when it arrives (counted); its place is taken by
        a new prompt (`want` then asks for one more), so a step's batch does not shrink.
    stale_policy: `regenerate` (its prompt is generated again, lossless) or `drop` (counted, lost).
    """

    def __init__(self, order: Sequence[int], group_size: int, groups_per_step: int, max_staleness: int = 0,
                 capacity: int | None = None, drop_zero_spread: bool = False, stale_policy: str = "regenerate"):
        if stale_policy not in ("regenerate", "drop"):
            raise ValueError(f"stale_policy {stale_policy!r}: expected regenerate or drop")
        if max_staleness < 0 or group_size < 1 or groups_per_step < 1:
            raise ValueError("max_staleness >= 0, group_size >= 1 and groups_per_step >= 1")
        self.order = order if isinstance(order, range) else list(order)
        self.group_size, self.groups_per_step, self.max_staleness = group_size, groups_per_step, max_staleness
        self.capacity = capacity or (max_staleness + 1) * groups_per_step
        if self.capacity < groups_per_step:
            raise ValueError(f"capacity {self.capacity} < groups_per_step {groups_per_step}: no step could ever fill")
        self.drop_zero_spread, self.stale_policy = drop_zero_spread, stale_policy
        self.position = 0  # next index into `order`
        self.requeued: list[int] = []  # prompts to generate again, drawn before `order`
        self.in_flight: dict[int, list[Sample]] = {}  # prompt id -> samples arrived so far
        self.ready: list[Group] = []  # complete groups, in arrival order
        self.filtered: list[int] = []  # prompts dynamic sampling dropped
        self.counts: Counter = Counter()  # filtered, stale_regenerated, stale_dropped, taken_groups
        self.staleness_seen: Counter = Counter()  # staleness -> samples taken

    # ------------------------------------------------------------ the producer's side
    def want(self) -> int:
        """How many prompts to draw now: room left under the capacity, bounded by what the epoch has left."""
        room = self.capacity - len(self.ready) - len(self.in_flight)
        return max(0, min(room, len(self.requeued) + len(self.order) - self.position))

    def draw(self, count: int | None = None) -> list[int]:
        """Hand out up to `count` prompt ids (default `want()`), queued-again ones first; they are in flight until complete."""
        count = self.want() if count is None else min(count, self.want())
        drawn = []
        while len(drawn) < count and self.requeued:
            drawn.append(self.requeued.pop(0))
        while len(drawn) < count and self.position < len(self.order):
            drawn.append(self.order[self.position])
            self.position += 1
        for pid in drawn:
            self.in_flight[pid] = []
        return drawn

    def put(self, prompt_id: int, samples: Sequence[Sample]) -> Group | None:
        """Samples of an in-flight prompt arrive (all of them, or some); returns its group once complete
        (and kept), None while incomplete or when dynamic sampling dropped it."""
        if prompt_id not in self.in_flight:
            raise KeyError(f"prompt {prompt_id} is not in flight (drawn and not yet complete)")
        arrived = self.in_flight[prompt_id]
        arrived.extend(samples)
        if len(arrived) > self.group_size:
            raise ValueError(f"prompt {prompt_id}: {len(arrived)} samples for a group of {self.group_size}")
        if len(arrived) < self.group_size:
            return None
        group = Group(prompt_id, self.in_flight.pop(prompt_id))
        if self.drop_zero_spread and group.zero_spread():
            self.counts["filtered"] += 1
            self.filtered.append(prompt_id)
            return None
        self.ready.append(group)
        return group

    # ------------------------------------------------------------ the trainer's side
    def take(self, version: int, num_groups: int | None = None, flush: bool = False, prompt_ids: Sequence[int] | None = None) -> Taken:
        """`num_groups` (default groups_per_step) complete groups within the bound for an update from
        `version`, those of the oldest weights first (then in arrival order, as Tinker's cookbook takes them); none when fewer are ready (unless `flush`: the epoch's last,
        smaller batch). Groups past the bound leave the buffer first (requeued or dropped).
        With `prompt_ids`: exactly those prompts' groups, once all are ready (in-order consumption)."""
        num_groups = num_groups or self.groups_per_step
        stale = [g for g in self.ready if g.staleness(version) > self.max_staleness]
        if stale:
            self.ready = [g for g in self.ready if g.staleness(version) <= self.max_staleness]
            for g in stale:
                if self.stale_policy == "regenerate":
                    self.requeued.append(g.prompt_id)
                self.counts["stale_regenerated" if self.stale_policy == "regenerate" else "stale_dropped"] += 1
        if prompt_ids is not None:
            wanted = set(prompt_ids)
            if len(wanted & {g.prompt_id for g in self.ready}) < len(wanted):
                return Taken([], [g.prompt_id for g in stale], [])
            groups = [g for g in self.ready if g.prompt_id in wanted]
            self.ready = [g for g in self.ready if g.prompt_id not in wanted]
            return self._taken(groups, stale, version)
        if len(self.ready) < num_groups and not flush:
            return Taken([], [g.prompt_id for g in stale], [])
        # Oldest weights first (then arrival order): a group left waiting only grows staler.
        self.ready.sort(key=lambda g: g.oldest)
        groups, self.ready = self.ready[:num_groups], self.ready[num_groups:]
        return self._taken(groups, stale, version)

    def _taken(self, groups: list[Group], stale: list[Group], version: int) -> Taken:
        staleness = []
        for g in groups:
            for s in g.samples:
                check_staleness(s.versions, version, self.max_staleness)
                staleness.append(version - s.oldest)
        self.staleness_seen.update(staleness)
        self.counts["taken_groups"] += len(groups)
        return Taken(groups, [g.prompt_id for g in stale], staleness)

    def exhausted(self) -> bool:
        """Every prompt of the epoch drawn, back, and taken (or dropped)."""
        return self.position == len(self.order) and not (self.requeued or self.in_flight or self.ready)

    # ------------------------------------------------------------ metrics
    def metrics(self, taken: Taken | None = None) -> dict[str, float]:
        """Buffer fill and counters; with `taken`, the staleness of the samples it gave (mean, max, one count per value 0..k)."""
        out = {
            "async/buffer_fill": len(self.ready) / self.capacity,
            "async/in_flight": float(len(self.in_flight)),
            **{f"async/{k}": float(v) for k, v in sorted(self.counts.items())},
        }
        if taken is not None and taken.staleness:
            out.update(staleness_metrics(taken.staleness, self.max_staleness))
        return out

    # ------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        """Plain data (lists, dicts, numbers and the payloads as given): the data position, the ready
        groups, and the prompts in flight or queued again. Partial samples of in-flight prompts are not
        kept: their generations die with the process, so `load_state_dict` queues those prompts again."""
        return {
            "position": self.position,
            "requeued": list(self.requeued),
            "in_flight": list(self.in_flight),
            "ready": [{"prompt_id": g.prompt_id, "samples": [dataclasses.asdict(s) for s in g.samples]} for g in self.ready],
            "counts": dict(self.counts),
            "filtered": list(self.filtered),
            "staleness_seen": {str(k): v for k, v in self.staleness_seen.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])
        # In-flight prompts go first: they were drawn before anything still queued behind them in `order`.
        self.requeued = [int(p) for p in state["in_flight"]] + [int(p) for p in state["requeued"]]
        self.in_flight = {}
        self.ready = [Group(int(g["prompt_id"]), [Sample(**s) for s in g["samples"]]) for g in state["ready"]]
        self.counts = Counter(state.get("counts", {}))
        self.filtered = [int(p) for p in state.get("filtered", [])]
        self.staleness_seen = Counter({int(k): v for k, v in state.get("staleness_seen", {}).items()})


def staleness_metrics(staleness: Sequence[int], max_staleness: int) -> dict[str, float]:
    """Mean, max and a histogram (the fraction of samples at each staleness 0..k) of a batch's samples."""
    hist = Counter(staleness)
    n = len(staleness)
    out = {"staleness/mean": sum(staleness) / n, "staleness/max": float(max(staleness))}
    out.update({f"staleness/frac_{s}": hist.get(s, 0) / n for s in range(max_staleness + 1)})
    return out
