"""Asynchronous GRPO and PPO (issue 29): the rollout actors generate while the trainer updates.

The plan's `loop` is `async` (rollout.max_staleness k >= 1). Two loops share one `RolloutBuffer`
(orchestrator/core/staleness.py):

- the rollout side (a thread of this driver, `produce`): draws prompts while the buffer has room,
  advances every completion in flight one chunk on the rollout actors (`HFRollout.stream` or
  `VLLMRollout.stream`, each replica its own prompts, all at once: partial
  rollouts, each token tagged with the version of the weights that drew it, behaviour log-probs
  recorded), scores the prompts whose `n` completions finished and puts their groups in the buffer;
  between two chunks it loads the newest weights the trainer published;
- the trainer side (`train_step`, this driver's main thread): takes the next `prompts_per_step`
  groups of the order once complete, within the bound (every trained sample is checked), reference log-probs if any,
  the critic's values (ppo), advantages, the update with the off-policy correction (workers/trainer.py), then publishes its
  weights to the object store for the rollout side to load.

Policy version v is the weights after v updates, i.e. after step v. Every wait is timed
(`Orchestrator.wait`, orchestrator/runtime/waits.py): a rollout that stops delivering fails the
job naming the phase. The checkpoint holds the buffer's state (data position, ready groups with
their samples, prompts in flight or queued again), so a resumed job trains every prompt once.
"""

from __future__ import annotations

import collections
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from orchestrator.core import checkpoint, storage
from orchestrator.core.batch import Batch, concat
from orchestrator.core.staleness import RolloutBuffer, Sample
from orchestrator.runtime.waits import PhaseTimeout
from orchestrator.stages.driver import Orchestrator, rollout_metrics

BUFFER_FILE = "rollout_buffer.pt"


class AsyncOrchestrator(Orchestrator):
    """The driver of a stage whose plan's loop is `async`: the same phases as the synchronous driver,
    the rollout side running beside them."""

    # Dynamic sampling draws on while groups are dropped: past this many steps' worth of dropped groups while one step
    # waits, the job fails naming why (a constant reward would otherwise draw prompts forever).
    MAX_DROPPED_STEPS = 10

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        loop, per_step = self.stage.loop, self.spec.optim.prompts_per_step
        # The draws of the stage's steps, in the synchronous loop's order: key p is prompt `prompt_of(p)`. Dynamic
        # sampling drops groups and draws on, into the next epochs' orders: its keys do not end with the stage's steps.
        dynamic = self.spec.rollout.dynamic_sampling
        order = range((self.stage.first_step - 1) * per_step, sys.maxsize if dynamic else self.stage.last_step * per_step)
        self.buffer = RolloutBuffer(order, self.spec.rollout.n, per_step, loop.max_staleness, capacity=loop.buffer_groups,
                                    drop_zero_spread=dynamic)
        self.filtered_reported = 0  # the buffer's dropped prompts already named in a `trained_prompts` event
        self.replica_of: dict[int, int] = {}  # key in flight -> the rollout replica generating it
        self.generated_by: dict[int, int] = {}  # key generated, not trained yet -> the replica that generated it
        self.groups_ready: dict[int, tuple[Batch, dict[str, torch.Tensor]]] = {}  # key -> its scored batch, each reward's scores
        self.cond = threading.Condition()  # guards the buffer, `groups_ready`, `published`, the counters below
        self.version = 0  # updates done (the trainer's weights)
        self.published: tuple[int, object] | None = None  # (version, weights ref) the rollout side has not loaded yet
        self.rollout_version = 0
        self.producer: threading.Thread | None = None
        self.producer_error: BaseException | None = None
        self.stopping = threading.Event()
        self.rollout_clock = {"idle": 0.0, "tokens": 0.0, "weight_sync": 0.0}  # cumulative, read per step
        self.in_call = False  # the rollout side waits for an actor call (which has its own deadline)
        self.last_put = time.perf_counter()  # when a group last reached the buffer
        self.last_mark = (time.perf_counter(), dict(self.rollout_clock))

    @property
    def weights_in_update(self) -> bool:
        return False  # the trainer publishes after its update; the rollout side loads between chunks

    def prompt_of(self, key: int) -> int:
        step, j = divmod(key, self.spec.optim.prompts_per_step)
        return self.sampler.indices(step)[j]

    # ------------------------------------------------------------ the loop
    def fit(self, start_step: int = 0) -> dict[str, float]:
        self.version = self.rollout_version = start_step
        self.producer = threading.Thread(target=self.produce, name="rollout-side", daemon=True)
        self.producer.start()
        try:
            return super().fit(start_step)
        finally:
            self.stopping.set()
            with self.cond:
                self.cond.notify_all()

    def train_step(self, step: int) -> dict[str, float]:
        timing: dict[str, float] = {}
        start = time.perf_counter()
        taken, batch, per_source, versions = self.take(step, timing)
        batch = self.reference(batch, timing)
        batch = self.advantages(batch, timing)
        metrics = self.update(batch, step, timing)
        self.publish(step)
        timing["step"] = time.perf_counter() - start
        metrics.update(self.async_metrics(taken, batch, timing))
        metrics.update(rollout_metrics(batch, per_source, self.spec, self.eos_token_id))
        if self.stage.rollout_mode == "multi_turn":
            metrics.update(self.report_episodes(step, batch))
        with self.cond:
            filtered, self.filtered_reported = self.buffer.filtered[self.filtered_reported:], len(self.buffer.filtered)
        if self.spec.rollout.dynamic_sampling:
            metrics["dynamic_sampling/filtered_groups"] = float(len(filtered))
        self.reporter.event("trained_prompts", f"step {step}: {len(taken.groups)} groups, staleness up to {max(taken.staleness)}"
                            + (f", {len(filtered)} zero-spread groups dropped" if filtered else ""),
                            step=step, prompts=[self.prompt_of(g.prompt_id) for g in taken.groups], versions=versions,
                            filtered=[self.prompt_of(k) for k in filtered],
                            # (positions in the stage's draw order: a prompt drawn again in a later epoch has another)
                            draws=[g.prompt_id for g in taken.groups], filtered_draws=filtered,
                            replicas=[self.generated_by.pop(g.prompt_id, None) for g in taken.groups])
        return {**metrics, **self.throughput(batch, timing), **{f"timing/{k}": v for k, v in timing.items()}}

    # ------------------------------------------------------------ the trainer side
    def take(self, step: int, timing: dict):
        """The step's groups from the buffer, within the staleness bound. The rollout side may go
        `fault_tolerance.call_timeout_s` without delivering a group, but for a call of its own in progress
        (whose timed wait names its phase when it hangs). Returns (Taken, the batch, each reward's scores, the versions seen)."""
        t0 = time.perf_counter()
        limit = self.spec.fault_tolerance.call_timeout_s
        with self.cond:
            while True:
                if self.producer_error is not None:
                    raise self.producer_error
                b, keys = self.buffer, self.next_keys()
                if not keys:
                    raise RuntimeError(f"step {step}: the epoch's prompts are used up (rollout buffer: {dict(b.counts)})")
                taken = b.take(self.version, prompt_ids=keys)
                self.cond.notify_all()  # stale groups went back to be generated again
                if taken.groups:
                    break
                dropped = len(b.filtered) - self.filtered_reported
                if dropped > self.MAX_DROPPED_STEPS * b.groups_per_step:
                    raise RuntimeError(f"step {step}: rollout.dynamic_sampling dropped {dropped} groups in a row (every sample of each "
                                       f"scored the same) without filling the step: {self.MAX_DROPPED_STEPS} steps' worth of prompts "
                                       "gave no signal; check the rewards (a constant one?) or turn dynamic_sampling off")
                left = None if limit is None else max(t0, self.last_put) + limit - time.perf_counter()
                if left is not None and left <= 0 and not self.in_call:
                    raise PhaseTimeout(f"the rollout phase of step {step} delivered {len(b.ready)} of {b.groups_per_step} groups "
                                       f"within fault_tolerance.call_timeout_s={limit:g} s")
                self.cond.wait(1.0 if left is None else min(max(left, 0.05), 1.0))
            scored = [self.groups_ready.pop(g.prompt_id) for g in taken.groups]
        batch = concat([b for b, _ in scored])
        per_source = {k: torch.cat([s[k] for _, s in scored]) for k in scored[0][1]}
        timing["wait_for_rollouts"] = time.perf_counter() - t0
        versions = sorted({v for g in taken.groups for s in g.samples for v in s.versions})
        return taken, batch, per_source, versions

    def next_keys(self) -> list[int]:
        """The step's prompts: the next `prompts_per_step` of the order not trained yet. Taken in order, not as
        they finish: a loop that trains whatever finishes first trains shorter completions than were drawn."""
        b, per_step = self.buffer, self.spec.optim.prompts_per_step
        started = sorted({g.prompt_id for g in b.ready} | set(b.in_flight) | set(b.requeued))
        return (started + list(b.order[b.position:b.position + per_step]))[:per_step]  # (undrawn keys come after drawn ones)

    def reference(self, batch: Batch, timing: dict) -> Batch:
        """The taken groups' reference log-probs (if `kl_coef`) and, with a critic (ppo), their values under the critic
        as it is now (GAE's bootstrap is the current critic's, whatever weights drew the samples), both at once."""
        ref_refs = self.reference_group.call_sharded("compute_logprobs", batch) if self.reference_group is not None else None
        critic_refs = self.groups["critic"].call_sharded("compute_values", batch) if "critic" in self.groups else None
        if ref_refs is not None:
            results = self.wait(ref_refs, "reference")
            timing["reference"] = max(t for _, t in results)
            batch = batch.replace(ref_logprobs=torch.cat([lp for lp, _ in results]))
        if critic_refs is not None:
            results = self.wait(critic_refs, "critic")
            timing["critic"] = max(t for _, t in results)
            batch = batch.replace(values=torch.cat([v for v, _ in results]))
        return batch

    def evaluate(self, dataset) -> dict[str, float]:
        """Held-out metrics of the trainer's current weights: the rollout actor samples them, so this waits
        until the rollout side has loaded them (between two chunks), within `fault_tolerance.call_timeout_s`."""
        limit = self.spec.fault_tolerance.call_timeout_s
        t0 = time.perf_counter()
        with self.cond:
            while self.rollout_version < self.version:
                if self.producer_error is not None:
                    raise self.producer_error
                left = None if limit is None else t0 + limit - time.perf_counter()
                if left is not None and left <= 0 and not self.in_call:
                    raise PhaseTimeout(f"the eval phase of step {self.current_step}: the rollout side did not load the weights of "
                                       f"version {self.version} within fault_tolerance.call_timeout_s={limit:g} s")
                self.cond.wait(1.0 if left is None else min(max(left, 0.05), 1.0))
        return super().evaluate(dataset)

    def publish(self, step: int) -> None:
        """The new weights into the object store; the rollout side loads them between two chunks."""
        ref = self.weight_sync.publish()
        with self.cond:
            self.version = step
            self.published = (step, ref)

    # ------------------------------------------------------------ the rollout side
    def produce(self) -> None:
        """Generate until the trainer stops: draw what the buffer has room for, one chunk for every
        completion in flight, score and put the finished groups; new weights between chunks."""
        try:
            while not self.stopping.is_set():
                self.load_new_weights()
                with self.cond:
                    keys = self.buffer.draw(self.admissible())
                    if not self.buffer.in_flight:  # no room (back-pressure), or the epoch is done
                        t0 = time.perf_counter()
                        self.cond.wait(0.5)
                        self.rollout_clock["idle"] += time.perf_counter() - t0
                        continue
                    version = self.rollout_version
                refs = self.stream_chunk(keys, version)
                with self.calling():
                    results = self.wait(refs, "generate (a chunk of the partial rollouts)")
                done = [group for finished, _, _ in results for group in finished]
                for key, _, _ in done:
                    self.generated_by[key] = self.replica_of.pop(key)
                self.rollout_clock["tokens"] += sum(tokens for _, tokens, _ in results)
                if done:
                    self.put(done)
        except BaseException as err:  # noqa: BLE001 - the trainer side raises it (a lost actor then restarts the stage)
            if not self.stopping.is_set():
                with self.cond:
                    self.producer_error = err
                    self.cond.notify_all()

    def stream_chunk(self, keys: list[int], version: int) -> list:
        """One chunk on every rollout replica with completions in flight: the new prompts `keys` join the replica with
        the fewest prompts in flight (each keeps its own), and the replicas advance at once. Returns the calls' refs."""
        actors = self.groups["rollout"].actors
        load = collections.Counter(self.replica_of.values())
        joining: dict[int, list[int]] = collections.defaultdict(list)
        for key in keys:
            replica = min(range(len(actors)), key=lambda r: load[r])
            joining[replica].append(key)
            load[replica] += 1
            self.replica_of[key] = replica
        calls = []
        for replica, actor in enumerate(actors):
            if load[replica]:
                new = joining[replica]
                calls.append(actor.stream.remote(new, [self.dataset.prompt_ids[self.prompt_of(k)] for k in new],
                                                 [self.dataset.extras[self.prompt_of(k)] for k in new], version, self.stage.loop.chunk_tokens))
        return calls

    def admissible(self) -> int:
        """How many prompts may start now: AReaL's admission rule (Fu et al. 2025, arXiv:2505.24298, sec. 5.1),
        a generation starts only if it is among the first (v + k + 1) x prompts_per_step of the stage, v the
        updates its weights have seen, so that it is trained before it is more than k versions old."""
        b, per_step = self.buffer, self.spec.optim.prompts_per_step
        # (requeued prompts are not in flight: they start again; dropped ones take no step's place)
        started = b.position - len(b.requeued) - len(b.filtered)
        return max(0, (self.rollout_version - self.stage.first_step + 1 + b.max_staleness + 1) * per_step - started)

    def load_new_weights(self) -> None:
        with self.cond:
            published, self.published = self.published, None
        if published is None:
            return
        t0 = time.perf_counter()
        with self.calling():
            self.weight_sync.load(published[1])
        self.rollout_clock["weight_sync"] += time.perf_counter() - t0
        with self.cond:
            self.rollout_version = published[0]
            self.cond.notify_all()  # an evaluation may wait for these weights

    @contextmanager
    def calling(self):
        """Marks a timed actor call of the rollout side: the trainer side leaves its deadline to that call's."""
        self.in_call = True
        try:
            yield
        finally:
            self.in_call = False

    def put(self, done: list[tuple[int, Batch, torch.Tensor]]) -> None:
        """Score the finished groups (one reward call) and put them in the buffer."""
        batch = concat([b for _, b, _ in done])
        with self.calling():
            scores, per_source, _ = self.wait(self.score_rewards(batch), "reward")
        n = self.spec.rollout.n
        with self.cond:
            for i, (key, group_batch, versions) in enumerate(done):
                rows = torch.arange(i * n, (i + 1) * n)
                samples = [Sample([v for v in row.tolist() if v >= 0], float(scores[r])) for row, r in zip(versions, rows.tolist())]
                self.groups_ready[key] = (group_batch.replace(scores=scores[rows]), {k: v[rows] for k, v in per_source.items()})
                if self.buffer.put(key, samples) is None:  # (dynamic sampling dropped it)
                    self.groups_ready.pop(key)
                    self.generated_by.pop(key, None)
            self.last_put = time.perf_counter()
            self.cond.notify_all()

    # ------------------------------------------------------------ metrics
    def async_metrics(self, taken, batch: Batch, timing: dict) -> dict[str, float]:
        """Staleness and buffer (the buffer's), idle fractions of both sides and tokens/s of each, since the last step."""
        now = time.perf_counter()
        with self.cond:
            out = self.buffer.metrics(taken)
            clock = dict(self.rollout_clock)
        since, before = self.last_mark
        self.last_mark = (now, clock)
        wall = max(now - since, 1e-9)
        out["async/rollout_idle_frac"] = (clock["idle"] - before["idle"] + clock["weight_sync"] - before["weight_sync"]) / wall
        out["async/trainer_idle_frac"] = timing["wait_for_rollouts"] / max(timing["step"], 1e-9)
        out["async/policy_version"] = float(self.version)
        out["throughput/rollout_tokens_per_s"] = (clock["tokens"] - before["tokens"]) / wall
        out["throughput/trainer_tokens_per_s"] = float(batch.attention_mask.sum()) / max(timing.get("update_compute", 0.0), 1e-9)
        return out

    # ------------------------------------------------------------ checkpoints
    def save_checkpoint(self, step: int) -> None:
        """The buffer's state beside the weights, written before `state.json` marks the checkpoint complete."""
        with self.cond:
            state = {"buffer": self.buffer.state_dict(), "groups": {k: self.groups_ready[k] for k in
                                                                     (g.prompt_id for g in self.buffer.ready)},
                     "filtered_reported": self.filtered_reported}
        with storage.local_dir_for(str(checkpoint.step_dir(self.spec.checkpoint_dir, step))) as out:
            torch.save(state, Path(out) / BUFFER_FILE)
        super().save_checkpoint(step)

    def load_checkpoint(self, path) -> int:
        step = super().load_checkpoint(path)
        saved = Path(storage.local_copy(str(path))) / BUFFER_FILE
        if not saved.exists():  # a synchronous run's checkpoint: its steps took the order's prompts in turn
            self.buffer.position = (step - self.stage.first_step + 1) * self.spec.optim.prompts_per_step
            return step
        state = torch.load(saved, weights_only=False)
        with self.cond:
            self.buffer.load_state_dict(state["buffer"])
            self.groups_ready = dict(state["groups"])
            self.filtered_reported = state.get("filtered_reported", len(self.buffer.filtered))
        return step
