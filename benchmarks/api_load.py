"""Load test of the control plane on loopback: GET /v1/jobs/{id} and GET /v1/jobs beside a bare
FastAPI endpoint doing one Redis GET, same run, same server settings (uvicorn, 1 worker); then one
upload of a large JSONL file (POST /v1/files) with the API process's peak RSS sampled throughout.

    python benchmarks/api_load.py [--clients 50] [--seconds 10] [--upload-mb 200]

Starts its own redis-server and both servers on free 127.0.0.1 ports, seeds one tenant's jobs
(with full specs and metrics), then drives each endpoint with N concurrent keep-alive HTTP/1.1
clients (a minimal asyncio client, so the load generator costs little CPU) for a fixed time.
Target: p99 < 20 ms at 50 clients and >= 70% of the bare endpoint's requests/s; the upload's peak
RSS flat (not growing with the file: it streams to disk, and its rows are checked one at a time).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._services import free_port, start, stop  # noqa: E402

BARE_APP = textwrap.dedent(
    """
    import os
    import redis.asyncio as aioredis
    from fastapi import FastAPI

    app = FastAPI()
    r = aioredis.Redis.from_url(os.environ["BENCH_REDIS_URL"], decode_responses=True)

    @app.get("/bare/{key}")
    async def bare(key: str):
        return {"value": await r.get(key)}
    """
)



def wait_http(port: int, path: str, timeout: float = 30) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}{path}", timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"nothing answered on 127.0.0.1:{port}{path} within {timeout:.0f} s")


async def seed(redis_url: str, tenant: str, n: int) -> list[str]:
    """n finished jobs with a full spec, a metrics history and latest metrics."""
    from api.store import JobStore
    from orchestrator.redis_reporter import RedisReporter
    from orchestrator.core.spec import parse_spec

    spec = parse_spec(
        {"name": "bench", "model": {"path": "/models/tiny"}, "data": {"train_file": "/data/train.jsonl"}, "rewards": [{"function": "accuracy"}],
         "optim": {"steps": 20}}
    ).model_dump(mode="json")
    store = JobStore(redis_url)
    ids = []
    for i in range(n):
        job_id = f"job-bench{i:06d}"
        await store.create(job_id, tenant, "bench", spec, {"i": str(i)}, None)
        rep = RedisReporter(redis_url, job_id)
        rep.event("status", "running", status="running", total_steps=20)
        for step in range(1, 21):
            rep.metrics(step, {f"m{k}": step * 0.01 + k for k in range(24)})
        rep.event("status", "succeeded", status="succeeded", step=20)
        rep.close()
        ids.append(job_id)
    await store.redis.set("bare-key", json.dumps({"status": "succeeded"}))
    await store.close()
    return ids


async def drive(port: int, path: str, headers: dict[str, str], clients: int, seconds: float, warmup: float) -> dict:
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    raw = request.encode()
    latencies: list[float] = []
    errors = 0
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + seconds

    async def client():
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while True:
                t0 = time.perf_counter()
                if t0 >= stop_at:
                    return
                writer.write(raw)
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                await reader.readexactly(length)
                t1 = time.perf_counter()
                if not head.startswith(b"HTTP/1.1 200"):
                    errors += 1
                elif t0 >= measure_from:
                    latencies.append(t1 - t0)
        finally:
            writer.close()

    await asyncio.wait_for(asyncio.gather(*(client() for _ in range(clients))), warmup + seconds + 30)
    latencies.sort()
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [float("nan")] * 99
    return {"rps": len(latencies) / seconds, "p50_ms": q[49] * 1000, "p99_ms": q[98] * 1000, "requests": len(latencies), "errors": errors}


def upload_run(port: int, key: str, tmp: Path, megabytes: int, api_pid: int) -> dict:
    """Write a JSONL file of `megabytes`, upload it, sample the API's RSS every 20 ms meanwhile."""
    import threading

    import httpx
    import psutil

    path = tmp / "big.jsonl"
    line = (json.dumps({"prompt": "What is 12345 + 67890? Show the steps. " * 4, "answer": 80235}) + "\n").encode()
    with path.open("wb") as f:
        for _ in range(megabytes * (1 << 20) // len(line)):
            f.write(line)
    size = path.stat().st_size
    proc = psutil.Process(api_pid)
    before = proc.memory_info().rss
    peak, done = before, threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    with path.open("rb") as f:
        r = httpx.post(f"http://127.0.0.1:{port}/v1/files", files={"file": ("big.jsonl", f)}, data={"purpose": "train"},
                       headers={"Authorization": f"Bearer {key}"}, timeout=900)
    elapsed = time.perf_counter() - t0
    done.set()
    sampler.join()
    if r.status_code != 201:
        raise RuntimeError(f"upload failed: {r.status_code} {r.text[:300]}")
    return {"bytes": size, "rows": r.json()["rows"], "seconds": elapsed, "rss_before": before, "rss_peak": peak}



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50, help="Concurrent keep-alive connections.")
    parser.add_argument("--seconds", type=float, default=5.0, help="Measured seconds per endpoint and round.")
    parser.add_argument("--rounds", type=int, default=3, help="Rounds over the endpoints, interleaved (the median round is shown).")
    parser.add_argument("--warmup", type=float, default=2.0, help="Unmeasured seconds first.")
    parser.add_argument("--jobs", type=int, default=50, help="Jobs seeded for the tenant.")
    parser.add_argument("--upload-mb", type=int, default=200, help="Size of the uploaded file (0: no upload).")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from api.auth import add_key

    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="rlhf-bench-") as tmp:
        tmp = Path(tmp)
        try:
            redis_port, api_port, bare_port = free_port(), free_port(), free_port()
            procs.append(start(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], os.environ.copy(), tmp / "redis.log"))
            redis_url = f"redis://127.0.0.1:{redis_port}/0"
            key = add_key(tmp / "keys.yaml", "bench")
            time.sleep(0.5)
            ids = asyncio.run(seed(redis_url, "bench", args.jobs))
            (tmp / "bare_app.py").write_text(BARE_APP)
            env = {
                **os.environ, "BENCH_REDIS_URL": redis_url, "RLHF_API_REDIS_URL": redis_url, "RLHF_API_API_KEYS_FILE": str(tmp / "keys.yaml"),
                "RLHF_API_RAY_ADDRESS": f"http://127.0.0.1:{free_port()}", "RLHF_API_PORT": str(api_port), "PYTHONPATH": f"{tmp}:{ROOT}",
                # The per-tenant rate limit stays on (its Redis call is part of every request), set above the load.
                "RLHF_API_REQUESTS_PER_MINUTE": str(10**9), "RLHF_API_STORAGE_ROOT": str(tmp / "artifacts"),
                "RLHF_API_UPLOAD_TMP_DIR": str(tmp), "RLHF_API_ALLOW_VOLATILE_REDIS": "true",  # a throwaway Redis
            }
            procs.append(start([sys.executable, "-m", "orchestrator.cli", "serve"], env, tmp / "api.log"))
            procs.append(start([sys.executable, "-m", "uvicorn", "bare_app:app", "--host", "127.0.0.1", "--port", str(bare_port), "--no-access-log", "--log-level", "warning"], env, tmp / "bare.log"))
            wait_http(api_port, "/healthz")
            wait_http(bare_port, "/bare/bare-key")
            auth = {"Authorization": f"Bearer {key}"}
            runs = [
                ("bare FastAPI + 1 Redis GET", bare_port, "/bare/bare-key", {}),
                ("GET /v1/jobs/{id}", api_port, f"/v1/jobs/{ids[len(ids) // 2]}", auth),
                ("GET /v1/jobs (limit 20)", api_port, "/v1/jobs", auth),
            ]
            # Interleaved rounds, so that load from elsewhere on a shared machine hits every endpoint alike.
            rounds: dict[str, list[dict]] = {name: [] for name, *_ in runs}
            for _ in range(args.rounds):
                for name, port, path, headers in runs:
                    rounds[name].append(asyncio.run(drive(port, path, headers, args.clients, args.seconds, args.warmup)))
            results = {name: sorted(rs, key=lambda r: r["rps"])[len(rs) // 2] for name, rs in rounds.items()}
            uploaded = upload_run(api_port, key, tmp, args.upload_mb, procs[1].pid) if args.upload_mb else None
        finally:
            for p in reversed(procs):
                stop(p)
    bare = results[runs[0][0]]["rps"]
    print(f"{args.clients} concurrent clients, {args.rounds} x {args.seconds:.0f} s per endpoint (median round), loopback, "
          f"{os.cpu_count()} CPUs shared by servers and load generator, load average {os.getloadavg()[0]:.1f}")
    print(f"{'endpoint':30} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'vs bare':>8} {'errors':>7}")
    for name, r in results.items():
        print(f"{name:30} {r['rps']:9.0f} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} {r['rps'] / bare:8.0%} {r['errors']:7d}")
    if uploaded:
        mb = uploaded["bytes"] / 1e6
        print(f"\nPOST /v1/files: {mb:.0f} MB ({uploaded['rows']} rows checked) in {uploaded['seconds']:.1f} s = "
              f"{mb / uploaded['seconds']:.0f} MB/s; API RSS {uploaded['rss_before'] / 2**20:.0f} MiB before, "
              f"peak {uploaded['rss_peak'] / 2**20:.0f} MiB during (+{(uploaded['rss_peak'] - uploaded['rss_before']) / 2**20:.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
