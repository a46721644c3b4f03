"""A discrete-event model of RL training on a cluster: synchronous, one-step-off and k-stale
asynchronous loops, for step time and utilisation at a scale these machines do not have (issue 29).

    python benchmarks/async_sim.py [--calibrate] [--no-record]

The model. Rollout engines (one per rollout GPU) decode their active sequences together: one
decode step of an engine with m active sequences takes `decode_base_s + decode_per_seq_s * m`
(memory-bound decoding: the weights are read once per step whatever m is), so an engine left with
a few long completions runs nearly empty; that is the long tail that asynchrony hides. A step
trains `prompts_per_step` groups of `n` completions; training costs `train_gpu_s_per_token`
GPU-seconds per token (prompt + response, every pass over them included) spread over the training
GPUs; after each update the weights go to the engines (`sync_s`, both sides wait). Completion
lengths are drawn per sample (lognormal with a cap: long-tailed, as reasoning RL's are).

- sync: a batch is generated, then trained (k = 0); colocated (veRL's hybrid engine) when both roles are given every GPU.
- one_step_off: a batch is generated while the previous one trains (staleness exactly <= 1; no partial rollouts).
- async (k): engines keep their slots full (a finished sample's slot takes the next prompt's sample);
  a new group starts only while groups started and not discarded < (v + k + 1) x groups per step
  (v: updates done, AReaL's rule); the trainer takes complete groups in arrival order whose oldest
  token is within k of its version (oldest weights first), and sends older ones back to be generated again; with partial
  rollouts (default) in-flight samples continue with the new weights after a sync (their oldest token keeps its version).

`--calibrate` measures the per-token costs of the tiny model with HF on this CPU (decode step time
at 1..16 sequences, forward+backward per token) and prints what the model predicts with them.
Without it, the published setups below are simulated; the numbers go to docs/benchmarks.md
(section `async_sim`) unless --no-record.
"""

from __future__ import annotations

import argparse
import heapq
import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@dataclass(frozen=True)
class Setup:
    """One cluster, model and workload. Costs are per GPU unless said otherwise."""

    rollout_gpus: int = 16  # rollout engines, one per GPU (the whole cluster when colocated)
    train_gpus: int = 16  # GPUs of the trainer (the whole cluster when colocated)
    decode_base_s: float = 0.01  # seconds of one decode step of an engine, whatever its sequences
    decode_per_seq_s: float = 1e-4  # seconds each active sequence adds to a decode step
    slots: int = 256  # sequences an engine decodes at once at most (vLLM's max_num_seqs)
    train_gpu_s_per_token: float = 5e-4  # GPU-seconds to train on one token (all passes over it)
    sync_s: float = 5.0  # seconds of a weight sync, both sides waiting
    prompt_len: int = 200  # prompt tokens (trained on with the response; not decoded)
    prompts_per_step: int = 512  # groups per update
    n: int = 16  # samples per group
    median_len: float = 2000.0  # response length: lognormal median ...
    sigma: float = 1.0  # ... and spread of log-length ...
    max_len: int = 28_000  # ... cut at the longest completion allowed
    seed: int = 0


@dataclass
class Result:
    mode: str
    k: int
    steps: int
    step_s: float  # mean seconds per update, warm-up steps left out
    samples_per_s: float
    rollout_busy: float  # fraction of engine-time with something to decode (and not syncing)
    trainer_busy: float  # fraction of the trainer's time spent training
    gen_tokens_per_s: float
    train_tokens_per_s: float
    staleness: list[int] = field(default_factory=list)  # per trained sample: version trained from - oldest token's version
    regenerated: int = 0  # groups sent back for being past the bound

    @property
    def staleness_mean(self) -> float:
        return float(np.mean(self.staleness)) if self.staleness else 0.0

    @property
    def staleness_max(self) -> int:
        return max(self.staleness) if self.staleness else 0


def lengths(setup: Setup, group: int, attempt: int = 0) -> np.ndarray:
    """The n response lengths of a group (the same in every mode, so modes compare on one workload)."""
    rng = np.random.default_rng([setup.seed, group, attempt])
    drawn = np.exp(rng.normal(math.log(setup.median_len), setup.sigma, setup.n))
    return np.clip(np.rint(drawn), 1, setup.max_len).astype(np.int64)


class Engine:
    """One rollout engine: its active sequences progress together, one token per decode step."""

    def __init__(self):
        self.progress = 0.0  # tokens each active sequence has decoded since the engine started
        self.heap: list[tuple[float, int, int]] = []  # (progress at which it finishes, sequence id, group)
        self.paused_until = 0.0
        self.busy = 0.0

    def step_s(self, setup: Setup) -> float:
        return setup.decode_base_s + setup.decode_per_seq_s * len(self.heap)

    def next_done(self, now: float, setup: Setup) -> float:
        if not self.heap:
            return math.inf
        start = max(now, self.paused_until)
        return start + (self.heap[0][0] - self.progress) * self.step_s(setup)

    def advance(self, now: float, until: float, setup: Setup) -> None:
        start = max(now, self.paused_until)
        if self.heap and until > start:
            self.progress += (until - start) / self.step_s(setup)
            self.busy += until - start


def simulate(setup: Setup, mode: str, k: int = 0, steps: int = 10, warmup: int = 2, partial: bool = True,
             max_events: int = 50_000_000) -> Result:
    """Run `steps` updates in `mode` (sync, one_step_off, async) and measure the steps after `warmup`.
    A colocated sync loop is a Setup whose rollout and train GPUs are both the whole cluster (k = 0:
    the two never run at once)."""
    if mode == "sync":
        k, streaming, partial = 0, False, True
    elif mode == "one_step_off":
        k, streaming, partial = 1, False, False
    elif mode == "async":
        streaming = True
    else:
        raise ValueError(f"unknown mode {mode!r}")
    engines = [Engine() for _ in range(setup.rollout_gpus)]
    B, n = setup.prompts_per_step, setup.n
    now, version = 0.0, 0
    issued = discarded = 0  # groups started, groups sent back
    next_group = 0
    attempts: dict[int, int] = {}
    start_version: dict[int, int] = {}  # group -> version its samples started from
    left: dict[int, int] = {}  # group -> samples not yet finished
    group_tokens: dict[int, int] = {}
    requeue: list[int] = []
    ready: list[int] = []  # complete groups, in arrival order
    trainer_until, trainer_busy, syncing_until = -1.0, 0.0, -1.0  # -1: idle
    training: list[int] = []
    staleness: list[int] = []
    regenerated = 0
    step_ends: list[float] = []
    snapshots: list[tuple[float, float, float, int, int]] = []  # at each update's end: time, busy engine-s, trainer-s, tokens
    gen_tokens = train_tokens = 0
    seq_id = 0

    def may_start_group() -> bool:
        """AReaL's rule: groups started and not sent back stay under (v + k + 1) x groups per step."""
        return issued - discarded < (version + k + 1) * B

    def start_group() -> None:
        nonlocal issued, next_group, seq_id
        g = requeue.pop(0) if requeue else next_group
        if g == next_group:
            next_group += 1
        attempts[g] = attempts.get(g, -1) + 1
        lens = lengths(setup, g, attempts[g])
        start_version[g], left[g] = version, n
        group_tokens[g] = int(lens.sum()) + n * setup.prompt_len
        for length in lens:
            e = min(engines, key=lambda x: len(x.heap))  # the least loaded engine (first of equals)
            heapq.heappush(e.heap, (e.progress + float(length), seq_id, g))
            seq_id += 1
        issued += 1

    def room() -> bool:
        return sum(setup.slots - len(e.heap) for e in engines) >= n

    for _ in range(max_events):
        if len(step_ends) >= steps:
            break
        # Start what may start: one group per n free slots (async), or a whole batch on idle engines
        # that hold the newest weights (sync, one-step-off; a batch may queue past the slots).
        if streaming:
            while room() and may_start_group():
                start_group()
        elif may_start_group() and now >= syncing_until and not any(e.heap for e in engines):
            for _ in range(B):
                start_group()
        # The trainer takes a batch when idle, synced, and enough fresh complete groups wait.
        if trainer_until < 0 and now >= syncing_until:
            fresh = [g for g in ready if version - start_version[g] <= k]
            for g in ready:
                if version - start_version[g] > k:  # past the bound: generate it again
                    requeue.append(g)
                    discarded += 1
                    regenerated += 1
            ready = fresh
            if len(ready) >= B:
                ready.sort(key=lambda g: start_version[g])  # oldest weights first (stable: then arrival order)
                training, ready = ready[:B], ready[B:]
                for g in training:
                    staleness += [version - start_version[g]] * n
                tokens = sum(group_tokens[g] for g in training)
                train_tokens += tokens
                trainer_until = now + tokens * setup.train_gpu_s_per_token / setup.train_gpus
                continue
        # The next event: a sample finishes, the trainer finishes, a sync ends.
        t_next = min([e.next_done(now, setup) for e in engines] + [trainer_until if trainer_until >= 0 else math.inf]
                     + [syncing_until if syncing_until > now else math.inf])
        if t_next == math.inf:
            raise RuntimeError(f"{mode}: nothing left to happen at t={now:.1f} (ready {len(ready)}, issued {issued})")
        for e in engines:
            e.advance(now, t_next, setup)
        if trainer_until >= 0:
            trainer_busy += t_next - now
        now = t_next
        for e in engines:
            while e.heap and e.heap[0][0] <= e.progress + 1e-9 and now >= e.paused_until:
                _, _, g = heapq.heappop(e.heap)
                left[g] -= 1
                if left[g] == 0:
                    ready.append(g)
                    gen_tokens += group_tokens[g] - n * setup.prompt_len
        if trainer_until >= 0 and now >= trainer_until:
            trainer_until = -1.0
            syncing_until = now + setup.sync_s
            # With partial rollouts the engines pause mid-generation to load the weights; without, the
            # weights wait on the engines' side and are loaded before the next batch (one-step-off
            # syncs at batch boundaries, which `may_start_group` waits for).
            if partial:
                for e in engines:
                    e.paused_until = max(e.paused_until, syncing_until)
            version += 1
            step_ends.append(syncing_until)
            snapshots.append((now, sum(e.busy for e in engines), trainer_busy, gen_tokens, train_tokens))
    else:
        raise RuntimeError(f"{mode}: {max_events} events without finishing")
    span = step_ends[-1] - step_ends[warmup - 1] if warmup else step_ends[-1]
    measured = steps - warmup
    # Utilisation and rates over the measured updates (from the end of the warm-up's last update).
    t0, e0, tr0, g0, n0 = snapshots[warmup - 1] if warmup else (0.0, 0.0, 0.0, 0, 0)
    t1, e1, tr1, g1, n1 = snapshots[-1]
    return Result(
        mode=mode if mode != "async" else f"async k={k}", k=k, steps=steps, step_s=span / measured,
        samples_per_s=measured * B * n / span,
        rollout_busy=(e1 - e0) / (len(engines) * (t1 - t0)), trainer_busy=(tr1 - tr0) / (t1 - t0),
        gen_tokens_per_s=(g1 - g0) / (t1 - t0), train_tokens_per_s=(n1 - n0) / (t1 - t0),
        staleness=staleness, regenerated=regenerated,
    )


# ---------------------------------------------------------------- calibration to a published sync loop


def tokens_per_step(setup: Setup) -> int:
    """Tokens trained per step (prompt + response), on the simulator's own draws of the first step."""
    return sum(int(lengths(setup, g).sum()) + setup.n * setup.prompt_len for g in range(setup.prompts_per_step))


def sync_generate_s(setup: Setup) -> float:
    """Seconds of the first sync step's generation (all engines, from start to the last completion)."""
    return simulate(replace(setup, train_gpu_s_per_token=0.0, sync_s=0.0), "sync", steps=1, warmup=0).step_s


def fit_decode_per_seq(setup: Setup, generate_s: float, lo: float = 0.0, hi: float = 1e-2, rounds: int = 30) -> float:
    """The decode_per_seq_s that makes the sync loop's generation take `generate_s` (bisection;
    generation time grows with it). Raises if even 0 is too slow (decode_base_s too large for the tail)."""
    if sync_generate_s(replace(setup, decode_per_seq_s=lo)) > generate_s:
        raise ValueError(f"generation takes over {generate_s} s with decode_per_seq_s=0: lower decode_base_s or max_len")
    for _ in range(rounds):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sync_generate_s(replace(setup, decode_per_seq_s=mid)) < generate_s else (lo, mid)
    return (lo + hi) / 2


@dataclass(frozen=True)
class Published:
    """A published sync-versus-async comparison (veRL's fully_async_policy recipe, docs/advance/fully_async.md:
    DAPO, Qwen2.5-Math-7B, H20 GPUs, rollout.n 16, 512 prompts per step, max response 28K tokens;
    seconds per step, the mean over 400 steps)."""

    name: str
    gpus: int
    sync_step: float
    sync_gen: float
    sync_old_logprob: float
    sync_update: float
    async_split: tuple[int, int]  # (rollout, trainer) GPUs
    async_step: float
    async_wait: float  # the trainer's wait for samples ("gen" in the async row)
    async_update: float
    speedup: str  # as published: total time over sync's at 100 / 200 / 300 / 400 steps


VERL_FULLY_ASYNC = [
    Published("veRL 32 GPUs", 32, 790.10, 357.41, 107.71, 313.81, (16, 16), 294.77, 21.26, 269.80, "1.72x / 1.70x / 2.31x / 2.66x"),
    Published("veRL 128 GPUs", 128, 356.30, 177.85, 53.92, 113.81, (64, 64), 150.63, 33.14, 113.16, "2.67x / 2.65x / 2.67x / 2.35x"),
]
# Assumed (not published): the length distribution of an average step of the run, the prompt length,
# and one decode step's fixed cost (a 7B model's 15 GB of bf16 weights read once per step at the
# H20's 4 TB/s is 3.8 ms; with kernels, 5 ms).
VERL_ASSUMED = Setup(prompts_per_step=512, n=16, prompt_len=200, median_len=2000, sigma=1.0, max_len=28_000,
                     decode_base_s=0.005, slots=512)


def calibrated_sync(pub: Published, assumed: Setup = VERL_ASSUMED) -> tuple[Setup, int]:
    """The colocated sync loop of `pub`: decode_per_seq_s fitted to its generation time, the trainer's
    cost per token to its old-log-prob and update times, the rest of its step as `sync_s`. Returns (setup, tokens per step)."""
    colocated = replace(assumed, rollout_gpus=pub.gpus, train_gpus=pub.gpus)
    tokens = tokens_per_step(colocated)
    other = pub.sync_step - pub.sync_gen - pub.sync_old_logprob - pub.sync_update  # reward, advantages, resharding
    return replace(colocated, decode_per_seq_s=fit_decode_per_seq(colocated, pub.sync_gen), sync_s=other,
                   train_gpu_s_per_token=(pub.sync_old_logprob + pub.sync_update) * pub.gpus / tokens), tokens


HEADERS = ["setup", "loop (rollout:train GPUs)", "trainer cost from", "s/step", "published s/step", "speedup",
           "published speedup", "rollout idle", "trainer idle", "staleness mean / max", "groups regenerated"]


def row(name: str, loop: str, cost: str, r: Result, base: Result, pub_step: str = "", pub_speedup: str = "") -> list[object]:
    return [name, loop, cost, f"{r.step_s:.0f}", pub_step, f"{base.step_s / r.step_s:.2f}x", pub_speedup,
            f"{1 - r.rollout_busy:.2f}", f"{1 - r.trainer_busy:.2f}", f"{r.staleness_mean:.2f} / {r.staleness_max}", r.regenerated]


def published_rows(pub: Published, k_values=(1, 2), steps: int = 8) -> list[list[object]]:
    """Calibrate to the published sync row, then predict the async split (k-stale, partial rollouts)
    two ways: with the trainer's cost per token from the sync row (its update alone: veRL's async
    trainer skips the old-log-prob pass) and from the published async row's update time."""
    sync, tokens = calibrated_sync(pub)
    base = simulate(sync, "sync", steps=3, warmup=1)
    rows = [row(pub.name, f"colocated sync ({pub.gpus})", "sync row", base, base, f"{pub.sync_step:.0f}", "1x")]
    r_gpus, t_gpus = pub.async_split
    # The published async step beyond its update and its wait for samples: the weight sync and the rest.
    split = replace(sync, rollout_gpus=r_gpus, train_gpus=t_gpus, sync_s=pub.async_step - pub.async_update - pub.async_wait)
    for label, cost in (("sync row's update", pub.sync_update * pub.gpus / tokens), ("async row's update", pub.async_update * t_gpus / tokens)):
        s = replace(split, train_gpu_s_per_token=cost)
        rows.append(row(pub.name, f"one-step-off ({r_gpus}:{t_gpus})", label, simulate(s, "one_step_off", steps=steps, warmup=2), base))
        for k in k_values:
            r = simulate(s, "async", k, steps=steps, warmup=2)
            published = k == 1 and label.startswith("async")
            rows.append(row(pub.name, f"async k={k}, partial ({r_gpus}:{t_gpus})", label, r, base,
                            f"{pub.async_step:.0f}" if published else "", pub.speedup if published else ""))
    return rows


# ---------------------------------------------------------------- calibration on this machine


def measure_cpu(tokens: int = 64, repeats: int = 5) -> dict[str, float]:
    """Per-token costs of the tiny model (orchestrator/entrypoints/tiny_model.py) with HF on this CPU:
    a decode step at 1, 4 and 16 sequences (fitted to a + b m; 8 sequences held out to check the
    fit), forward + backward + AdamW per trained token, and one load of the weights (a sync)."""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM

    from orchestrator.entrypoints.tiny_model import init_model

    def best(fn) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    with tempfile.TemporaryDirectory() as tmp:
        init_model(tmp)
        model = AutoModelForCausalLM.from_pretrained(tmp).eval()
    g = torch.Generator().manual_seed(0)

    @torch.no_grad()
    def decode_step_s(m: int) -> float:
        ids = torch.randint(0, 250, (m, 8), generator=g)
        run = lambda: model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,  # noqa: E731
                                     min_new_tokens=tokens, do_sample=False, pad_token_id=0)
        return best(run) / tokens

    decode_step_s(1)  # warm-up
    fit_at = {m: decode_step_s(m) for m in (1, 4, 16)}
    b, a = np.polyfit(list(fit_at), list(fit_at.values()), 1)
    held_out = decode_step_s(8)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, 250, (8, 64), generator=g)

    def train_step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()

    train_step()
    train_s = best(train_step)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    sync_s = best(lambda: model.load_state_dict(state))
    return {"decode_base_s": float(a), "decode_per_seq_s": float(b), "held_out_m": 8, "held_out_s": held_out,
            "held_out_predicted_s": float(a + 8 * b), "train_gpu_s_per_token": train_s / ids.numel(), "sync_s": sync_s,
            **{f"decode_step_s_m{m}": v for m, v in fit_at.items()}}


def cpu_rows(costs: dict[str, float], steps: int = 12) -> list[list[object]]:
    """What the model predicts for a job of this machine's size with the measured costs: 8 prompts x 4
    samples, lengths lognormal (median 24, sigma 0.8, up to 128), one device per role when split."""
    setup = Setup(rollout_gpus=1, train_gpus=1, slots=64, prompt_len=8, prompts_per_step=8, n=4, median_len=24, sigma=0.8,
                  max_len=128, **{k: costs[k] for k in ("decode_base_s", "decode_per_seq_s", "train_gpu_s_per_token", "sync_s")})
    base = simulate(setup, "sync", steps=steps, warmup=2)
    rows = [row("tiny model, CPU", "sync (one device, both roles)", "measured", base, base)]
    rows.append(row("tiny model, CPU", "one-step-off (1:1)", "measured", simulate(setup, "one_step_off", steps=steps, warmup=2), base))
    for k in (1, 2, 4):
        rows.append(row("tiny model, CPU", f"async k={k}, partial (1:1)", "measured", simulate(setup, "async", k, steps=steps, warmup=2), base))
    return rows


ASSUMPTIONS = (
    "Assumed for veRL's runs (not published): response lengths lognormal, median {m}, sigma {s}, cut at {c} "
    "(mean {mean:.0f} tokens), prompts {p} tokens, one decode step {a:.0f} ms + b per active sequence, b fitted so that "
    "the simulated sync generation takes the published `gen` time; the trainer's GPU-seconds per token from the published "
    "old_log_prob + update_actor times of the sync row; the rest of each published step as the weight sync. Published: "
    "veRL's fully_async_policy recipe (docs/advance/fully_async.md), DAPO on Qwen2.5-Math-7B, H20s, 512 prompts x 16, "
    "mean seconds per step over 400 steps; its speedups are total time at 100 / 200 / 300 / 400 steps over the sync run's."
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calibrate", action="store_true", help="measure the tiny model's costs on this CPU and predict with them")
    parser.add_argument("--no-record", action="store_true", help="print only; leave docs/benchmarks.md as it is")
    args = parser.parse_args()
    from benchmarks.record import markdown_table, record

    if args.calibrate:
        costs = measure_cpu()
        print({k: f"{v:.3g}" for k, v in costs.items()})
        rows = cpu_rows(costs)
        text = ("Costs measured with HF on this CPU (tiny Qwen2, best of 5): decode step "
                f"{costs['decode_base_s'] * 1e3:.2f} ms + {costs['decode_per_seq_s'] * 1e3:.3f} ms per sequence "
                f"(fitted at 1, 4, 16 sequences: {costs['decode_step_s_m1'] * 1e3:.2f}, {costs['decode_step_s_m4'] * 1e3:.2f}, "
                f"{costs['decode_step_s_m16'] * 1e3:.2f} ms; held out, 8 sequences: measured {costs['held_out_s'] * 1e3:.2f} ms, "
                f"predicted {costs['held_out_predicted_s'] * 1e3:.2f} ms), training {costs['train_gpu_s_per_token'] * 1e6:.1f} us "
                f"per token, a weight load {costs['sync_s'] * 1e3:.2f} ms. Predicted for 8 prompts x 4 samples per step.")
        section, title = "async_sim_cpu", "Async training simulator, calibrated on this CPU"
    else:
        text = ASSUMPTIONS.format(m=VERL_ASSUMED.median_len, s=VERL_ASSUMED.sigma, c=VERL_ASSUMED.max_len,
                                  mean=tokens_per_step(VERL_ASSUMED) / (VERL_ASSUMED.prompts_per_step * VERL_ASSUMED.n) - VERL_ASSUMED.prompt_len,
                                  p=VERL_ASSUMED.prompt_len, a=VERL_ASSUMED.decode_base_s * 1e3)
        rows = [r for pub in VERL_FULLY_ASYNC for r in published_rows(pub)]
        section, title = "async_sim", "Async training simulator against veRL's fully-async runs"
    table = markdown_table(HEADERS, rows)
    print(text + "\n\n" + table)
    if not args.no_record:
        record(section, text + "\n\n" + table, title=title)


if __name__ == "__main__":
    main()
