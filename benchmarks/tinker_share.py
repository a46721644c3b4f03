"""Throughput of the Tinker-compatible API when two tenants share one base model's adapter pool,
against each tenant alone: the official `tinker` SDK against `rlhf serve`, same machine, one run.

    python benchmarks/tinker_share.py [--rounds 5] [--steps 24] [--no-record]

Starts its own redis-server, Ray head and API on free 127.0.0.1 ports and a tiny local model in the
registry. Each tenant runs its own loop through the SDK (a ServiceClient, one LoRA training client):
- sft: forward_backward (cross_entropy, `--batch` sequences of `--seq-len` tokens) then optim_step, `--steps` times;
- sample: `--steps` sampling calls of `--samples` completions of `--new-tokens` tokens (from the base model).
Rounds alternate: tenant a alone, tenant b alone, both at once; the median round of each is reported.
Steps/s and tokens/s are each tenant's (tokens: those trained, or those generated); "sum" is both
tenants' together. Writes its table into docs/benchmarks.md (block `tinker_share`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._services import free_port, start, stop
from benchmarks.soak import RAY_ENV, wait

TENANTS = ("team-a", "team-b")


def services(tmp: Path, cpus: int) -> tuple[list[subprocess.Popen], str, dict[str, str], Path]:
    """redis-server, a Ray head and `rlhf serve` with a tiny model registered; (processes, API url, keys, model)."""
    import httpx

    from api.auth import add_key
    from orchestrator.entrypoints.tiny_model import init_model

    procs: list[subprocess.Popen] = []
    redis_port, gcs, dash, api_port = free_port(), free_port(), free_port(), free_port()
    procs.append(start(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--dir", str(tmp), "--appendonly", "yes"],
                       os.environ.copy(), tmp / "redis.log"))
    env = {**os.environ, **RAY_ENV}
    procs.append(start(["ray", "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
                        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--num-cpus", str(cpus),
                        "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
                        "--metrics-export-port", str(free_port()), "--temp-dir", str(tmp / "ray"), "--disable-usage-stats"],
                       env, tmp / "ray.log"))
    model = init_model(tmp / "tiny")
    (tmp / "registry.yaml").write_text(json.dumps({"models": {"tiny": {"path": str(model)}}}))
    keys = {t: add_key(tmp / "keys.yaml", t) for t in TENANTS}
    dashboard = f"http://127.0.0.1:{dash}"
    wait(lambda: httpx.get(f"{dashboard}/api/version", timeout=2).status_code < 500, 120, "the Ray dashboard")
    api_env = {**env, "RLHF_API_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0", "RLHF_API_RAY_ADDRESS": dashboard,
               "RLHF_API_API_KEYS_FILE": str(tmp / "keys.yaml"), "RLHF_API_PORT": str(api_port),
               "RLHF_API_REGISTRY_FILE": str(tmp / "registry.yaml"), "RLHF_API_STORAGE_ROOT": str(tmp / "store"),
               "RLHF_API_TINKER_RAY_ADDRESS": f"127.0.0.1:{gcs}", "RLHF_API_MAX_BODY_BYTES": str(16 << 20)}
    procs.append(start([sys.executable, "-m", "orchestrator.entrypoints.cli", "serve"], api_env, tmp / "api.log"))
    url = f"http://127.0.0.1:{api_port}"
    wait(lambda: httpx.get(f"{url}/healthz", timeout=2).status_code == 200, 60, "the API")
    return procs, url, keys, model


class Tenant:
    """One tenant's SDK session and training client, and its two loops."""

    def __init__(self, url: str, key: str, args, vocab: int, seed: int):
        import numpy as np
        import tinker
        from tinker import types

        self.types, self.args = types, args
        self.service = tinker.ServiceClient(base_url=url, api_key=key)
        self.training = self.service.create_lora_training_client(base_model="tiny", rank=8, seed=seed).result(timeout=300)
        self.sampler = self.service.create_sampling_client(base_model="tiny").result(timeout=300)
        rng = np.random.default_rng(seed)
        self.batch = []
        for _ in range(args.batch):
            ids = rng.integers(3, vocab, args.seq_len + 1).tolist()
            self.batch.append(types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                                          loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * args.seq_len}))
        self.prompt = types.ModelInput.from_ints(rng.integers(3, vocab, 8).tolist())

    def sft(self) -> int:
        """`steps` supervised steps; the tokens trained."""
        for _ in range(self.args.steps):
            fb = self.training.forward_backward(self.batch, "cross_entropy")
            opt = self.training.optim_step(self.types.AdamParams(learning_rate=1e-4))
            fb.result(timeout=600)
            opt.result(timeout=600)
        return self.args.steps * self.args.batch * self.args.seq_len

    def sample(self) -> int:
        """`steps` sampling calls, one after another; the tokens generated."""
        params = self.types.SamplingParams(max_tokens=self.args.new_tokens, temperature=1.0, stop=[])
        generated = 0
        for i in range(self.args.steps):
            out = self.sampler.sample(self.prompt, num_samples=self.args.samples, sampling_params=params).result(timeout=600)
            generated += sum(len(s.tokens) for s in out.sequences)
        return generated


def timed_round(tenants: list[Tenant], workload: str) -> list[tuple[float, int]]:
    """Run each tenant's loop at once (threads); (seconds, tokens) of each."""
    results: list[tuple[float, int] | None] = [None] * len(tenants)

    def run(i: int) -> None:
        start_t = time.perf_counter()
        tokens = getattr(tenants[i], workload)()
        results[i] = (time.perf_counter() - start_t, tokens)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(tenants))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if any(r is None for r in results):
        raise RuntimeError(f"a tenant's {workload} loop failed")
    return results


def measure(tenants: dict[str, Tenant], workload: str, rounds: int) -> dict[str, list[list[tuple[float, int]]]]:
    """Alternating rounds: a alone, b alone, both at once."""
    a, b = tenants[TENANTS[0]], tenants[TENANTS[1]]
    timed_round([a, b], workload)  # warm-up: first calls load adapters and compile paths
    out: dict[str, list] = {"a alone": [], "b alone": [], "both": []}
    for _ in range(rounds):
        out["a alone"].append(timed_round([a], workload))
        out["b alone"].append(timed_round([b], workload))
        out["both"].append(timed_round([a, b], workload))
    return out


def rows_for(workload: str, what: str, rounds: dict[str, list], steps: int) -> list[list[object]]:
    def median(mode: str) -> list[tuple[float, int]]:
        # The median round by its slowest tenant's time.
        ranked = sorted(rounds[mode], key=lambda r: max(s for s, _ in r))
        return ranked[len(ranked) // 2]

    alone = [median("a alone")[0], median("b alone")[0]]
    both = median("both")
    alone_steps = statistics.mean(steps / s for s, _ in alone)
    rows = []
    for label, tenants in (("alone (a, b)", alone), ("both at once", both)):
        per_steps = [steps / s for s, _ in tenants]
        per_tokens = [t / s for s, t in tenants]
        total_steps = sum(per_steps) if label == "both at once" else statistics.mean(per_steps)
        total_tokens = sum(per_tokens) if label == "both at once" else statistics.mean(per_tokens)
        rows.append([f"{workload}: {what}", label, " / ".join(f"{x:.2f}" for x in per_steps), f"{total_steps:.2f}",
                     " / ".join(f"{x:.0f}" for x in per_tokens), f"{total_tokens:.0f}", f"{total_steps / alone_steps:.2f}x"])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=24, help="Steps (sft) or sampling calls (sample) per tenant per round.")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--cpus", type=int, default=2, help="Logical CPUs of the Ray head (the pool takes 1).")
    parser.add_argument("--no-record", action="store_true", help="Print only; leave docs/benchmarks.md alone.")
    args = parser.parse_args(argv)
    os.environ.update(RAY_ENV)
    from transformers import AutoConfig

    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="rlhf-tinker-", dir="/tmp") as tmp:
        try:
            procs, url, keys, model = services(Path(tmp), args.cpus)
            vocab = AutoConfig.from_pretrained(model).vocab_size
            tenants = {t: Tenant(url, keys[t], args, vocab, seed=i) for i, t in enumerate(TENANTS)}
            rows = rows_for("sft", f"forward_backward {args.batch}x{args.seq_len} tokens + optim_step",
                            measure(tenants, "sft", args.rounds), args.steps)
            rows += rows_for("sample", f"{args.samples} x {args.new_tokens} new tokens",
                             measure(tenants, "sample", args.rounds), args.steps)
            for t in tenants.values():
                t.service.close("success").result(timeout=60)
        finally:
            for p in reversed(procs):
                stop(p)
    from benchmarks.record import markdown_table, record

    table = markdown_table(["workload", "mode", "steps/s per tenant (a / b)", "steps/s sum", "tokens/s per tenant (a / b)",
                            "tokens/s sum", "sum vs alone"], rows)
    text = (f"Two tenants on one base model's adapter pool (the tiny Qwen2, one Ray actor of 1 CPU, HF on the CPU) through the "
            f"`tinker` SDK against `rlhf serve`, against each alone; {args.rounds} rounds alternating a alone, b alone, both "
            f"at once, the median round of each (by its slowest tenant); {args.steps} steps per tenant per round. "
            "A step (sft) is a forward_backward and an optim_step; a sample step is one sampling call. "
            "\"sum vs alone\": both tenants' steps/s together over one tenant's alone.\n\n" + table)
    print(text)
    if not args.no_record:
        record("tinker_share", text, title="Two tenants sharing one base model (tinker_share)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
