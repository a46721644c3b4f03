"""Load test of the control plane on loopback: GET /v1/jobs/{id} and GET /v1/jobs beside a bare
FastAPI endpoint doing one Redis GET, same run, same server settings (uvicorn, 1 worker); a normal
tenant's latency and errors alone and beside a hostile tenant's burst; then one upload of a large
JSONL file (POST /v1/files) with the API process's peak RSS sampled throughout.

    python benchmarks/api_load.py [--clients 50] [--seconds 5] [--hostile-clients 200] [--upload-mb 200] [--no-record]

Starts its own redis-server and both servers on free 127.0.0.1 ports, seeds two tenants' jobs
(with full specs and metrics), then drives each endpoint with N concurrent keep-alive HTTP/1.1
clients (a minimal asyncio client, so the load generator costs little CPU) for a fixed time.
Target: p99 < 20 ms at 50 clients and >= 70% of the bare endpoint's requests/s; the upload's peak
RSS flat (not growing with the file: it streams to disk, and its rows are checked one at a time).

The hostile burst: `--hostile-clients` connections of another tenant (its own process, so that its
load generator does not delay the normal tenant's) send GET /v1/jobs?limit=100 back to back for the
whole measured time, while `--normal-clients` of the normal tenant send GET /v1/jobs. Target: the
normal tenant gets no error beside the burst (the hostile one gets 429 past
`max_concurrent_requests_per_tenant`; nothing waits on a Redis connection it holds). Prints the
tables and writes them to docs/benchmarks.md (section `api_load`, benchmarks/record.py) unless --no-record.
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
import uuid
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._services import free_port, start, stop
from benchmarks.record import markdown_table, record

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
    from orchestrator.core.spec import parse_spec
    from orchestrator.reporting.redis_reporter import RedisReporter

    spec = parse_spec(
        {"name": "bench", "model": {"path": "/models/tiny"}, "data": {"train_file": "/data/train.jsonl"}, "rewards": [{"function": "accuracy"}],
         "optim": {"steps": 20}}
    ).model_dump(mode="json")
    store = JobStore(redis_url)
    ids = []
    for i in range(n):
        job_id = "job-" + uuid.uuid4().hex[:24]  # the shape the API gives (and reads)
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
    """`clients` keep-alive connections sending GET `path` back to back for warmup + seconds; the
    measured seconds' latencies of 200s, and every answer's status (0: the connection failed)."""
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    raw = request.encode()
    latencies: list[float] = []
    codes: Counter[int] = Counter()
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + seconds

    async def one(reader, writer) -> tuple[int, bool]:
        writer.write(raw)
        head = await reader.readuntil(b"\r\n\r\n")
        length, close = 0, False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
            close = close or (name.lower() == b"connection" and value.strip().lower() == b"close")
        await reader.readexactly(length)
        return int(head[9:12]), close

    async def client():
        while time.perf_counter() < stop_at:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                codes[0] += 1
                await asyncio.sleep(0.05)
                continue
            try:
                while (t0 := time.perf_counter()) < stop_at:
                    try:
                        status, close = await one(reader, writer)
                    except (ConnectionError, asyncio.IncompleteReadError):
                        codes[0] += 1
                        break
                    codes[status] += 1
                    if status == 200 and t0 >= measure_from:
                        latencies.append(time.perf_counter() - t0)
                    if close:
                        break
            finally:
                writer.close()

    await asyncio.wait_for(asyncio.gather(*(client() for _ in range(clients))), warmup + seconds + 30)
    latencies.sort()
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [float("nan")] * 99
    return {"rps": len(latencies) / seconds, "p50_ms": q[49] * 1000, "p99_ms": q[98] * 1000, "requests": len(latencies),
            "errors": sum(n for code, n in codes.items() if code != 200), "codes": dict(codes)}


def drive_in_process(*args) -> dict:
    """`drive` in a process of its own (ProcessPoolExecutor): the hostile tenant's load generator
    must not hold the event loop that times the normal tenant's requests."""
    return asyncio.run(drive(*args))


def hostile_rounds(api_port: int, normal: dict[str, str], hostile: dict[str, str], args) -> dict[str, dict]:
    """The normal tenant's GET /v1/jobs alone, then beside the hostile burst, `args.rounds` times
    interleaved; each scenario's median round by p99."""
    rounds: dict[str, list[dict]] = {"alone": [], "beside": []}
    with ProcessPoolExecutor(1) as pool:
        for _ in range(args.rounds):
            rounds["alone"].append(asyncio.run(drive(api_port, "/v1/jobs", normal, args.normal_clients, args.seconds, args.warmup)))
            # The burst starts first and ends after the normal tenant's measured time.
            burst = pool.submit(drive_in_process, api_port, "/v1/jobs?limit=100", hostile, args.hostile_clients,
                                args.seconds + 2, args.warmup + 1)
            time.sleep(1)
            measured = asyncio.run(drive(api_port, "/v1/jobs", normal, args.normal_clients, args.seconds, args.warmup))
            rounds["beside"].append({**measured, "hostile": burst.result(timeout=args.warmup + args.seconds + 120)})
    return {name: sorted(rs, key=lambda r: r["p99_ms"])[len(rs) // 2] for name, rs in rounds.items()}


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


def start_services(tmp: Path, args, procs: list[subprocess.Popen]) -> dict:
    """redis-server, the bare app and two APIs on free loopback ports; two tenants' keys and seeded jobs.
    The first API lets one tenant have --clients requests in flight (for the endpoint rounds); the
    second, the hostile burst's, runs with the shipped limits but for the rate."""
    from api.auth import add_key

    redis_port, api_port, guarded_port, bare_port = free_port(), free_port(), free_port(), free_port()
    procs.append(start(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                       os.environ.copy(), tmp / "redis.log"))
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    keys = {t: add_key(tmp / "keys.yaml", t) for t in ("bench", "hostile")}
    time.sleep(0.5)
    ids = asyncio.run(seed(redis_url, "bench", args.jobs))
    asyncio.run(seed(redis_url, "hostile", args.jobs))
    (tmp / "bare_app.py").write_text(BARE_APP)
    env = {
        **os.environ, "BENCH_REDIS_URL": redis_url, "RLHF_API_REDIS_URL": redis_url, "RLHF_API_API_KEYS_FILE": str(tmp / "keys.yaml"),
        "RLHF_API_RAY_ADDRESS": f"http://127.0.0.1:{free_port()}", "PYTHONPATH": f"{tmp}:{ROOT}",
        # The per-tenant rate limit stays on, set above the load (a load test makes more requests a
        # minute than a tenant may): what holds the hostile burst back is the cap on requests in flight.
        "RLHF_API_REQUESTS_PER_MINUTE": str(10**9),
        "RLHF_API_STORAGE_ROOT": str(tmp / "artifacts"), "RLHF_API_UPLOAD_TMP_DIR": str(tmp),
        "RLHF_API_ALLOW_VOLATILE_REDIS": "true",  # a throwaway Redis
    }
    serve = [sys.executable, "-m", "orchestrator.entrypoints.cli", "serve"]
    procs.append(start(serve, {**env, "RLHF_API_PORT": str(api_port), "RLHF_API_MAX_CONCURRENT_REQUESTS_PER_TENANT": str(args.cap)},
                       tmp / "api.log"))
    api_pid = procs[-1].pid
    procs.append(start(serve, {**env, "RLHF_API_PORT": str(guarded_port)}, tmp / "api-guarded.log"))
    procs.append(start([sys.executable, "-m", "uvicorn", "bare_app:app", "--host", "127.0.0.1", "--port", str(bare_port),
                        "--no-access-log", "--log-level", "warning"], env, tmp / "bare.log"))
    for port, path in ((api_port, "/healthz"), (guarded_port, "/healthz"), (bare_port, "/bare/bare-key")):
        wait_http(port, path)
    return {"api_port": api_port, "guarded_port": guarded_port, "bare_port": bare_port, "api_pid": api_pid, "ids": ids,
            "auth": {t: {"Authorization": f"Bearer {k}"} for t, k in keys.items()}, "keys": keys}


def endpoint_rounds(svc: dict, args) -> dict[str, dict]:
    """Each endpoint in `args.rounds` interleaved rounds (load from elsewhere on a shared machine hits
    every endpoint alike); each endpoint's median round by requests/s."""
    ids, auth = svc["ids"], svc["auth"]["bench"]
    runs = [
        ("bare FastAPI + 1 Redis GET", svc["bare_port"], "/bare/bare-key", {}),
        ("GET /v1/jobs/{id}", svc["api_port"], f"/v1/jobs/{ids[len(ids) // 2]}", auth),
        ("GET /v1/jobs (limit 20)", svc["api_port"], "/v1/jobs", auth),
    ]
    rounds: dict[str, list[dict]] = {name: [] for name, *_ in runs}
    for _ in range(args.rounds):
        for name, port, path, headers in runs:
            rounds[name].append(asyncio.run(drive(port, path, headers, args.clients, args.seconds, args.warmup)))
    return {name: sorted(rs, key=lambda r: r["rps"])[len(rs) // 2] for name, rs in rounds.items()}


def endpoint_table(results: dict[str, dict]) -> str:
    bare = next(iter(results.values()))["rps"]
    return markdown_table(["endpoint", "req/s", "p50 ms", "p99 ms", "vs bare", "errors"],
                          [[name, f"{r['rps']:.0f}", f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}", f"{r['rps'] / bare:.0%}", r["errors"]]
                           for name, r in results.items()])


def hostile_table(results: dict[str, dict], args) -> str:
    rows = []
    for name, label in (("alone", "alone"), ("beside", f"beside {args.hostile_clients} hostile connections")):
        r = results[name]
        h = r.get("hostile", {}).get("codes", {})
        hostile = "-" if name == "alone" else (f"{h.get(200, 0)} / {h.get(429, 0)} / "
                                               f"{sum(n for c, n in h.items() if c >= 500 or c == 0)}")
        rows.append([label, f"{r['rps']:.0f}", f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}", r["errors"], hostile])
    return markdown_table(["normal tenant (GET /v1/jobs)", "req/s", "p50 ms", "p99 ms", "errors",
                           "hostile: 200 / 429 / 5xx or failed"], rows)


def upload_line(u: dict) -> str:
    mb = u["bytes"] / 1e6
    return (f"POST /v1/files: {mb:.0f} MB ({u['rows']} rows checked) in {u['seconds']:.1f} s = {mb / u['seconds']:.0f} MB/s; "
            f"API RSS {u['rss_before'] / 2**20:.0f} MiB before, peak {u['rss_peak'] / 2**20:.0f} MiB during "
            f"(+{(u['rss_peak'] - u['rss_before']) / 2**20:.0f} MiB)")


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50, help="Concurrent keep-alive connections per endpoint.")
    parser.add_argument("--seconds", type=float, default=5.0, help="Measured seconds per endpoint and round.")
    parser.add_argument("--rounds", type=int, default=3, help="Rounds over the endpoints, interleaved (the median round is shown).")
    parser.add_argument("--warmup", type=float, default=2.0, help="Unmeasured seconds first.")
    parser.add_argument("--jobs", type=int, default=50, help="Jobs seeded for each tenant.")
    parser.add_argument("--normal-clients", type=int, default=8, help="The normal tenant's connections beside the hostile burst.")
    parser.add_argument("--hostile-clients", type=int, default=200, help="The hostile tenant's concurrent connections (0: no burst).")
    parser.add_argument("--upload-mb", type=int, default=200, help="Size of the uploaded file (0: no upload).")
    parser.add_argument("--no-record", action="store_true", help="print only; leave docs/benchmarks.md as it is")
    args = parser.parse_args(argv)
    from api.settings import Settings

    args.cap = max(args.clients, Settings.model_fields["max_concurrent_requests_per_tenant"].default)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="rlhf-bench-") as tmp:
        try:
            svc = start_services(Path(tmp), args, procs)
            results = endpoint_rounds(svc, args)
            hostile = hostile_rounds(svc["guarded_port"], svc["auth"]["bench"], svc["auth"]["hostile"], args) if args.hostile_clients else None
            uploaded = upload_run(svc["api_port"], svc["keys"]["bench"], Path(tmp), args.upload_mb, svc["api_pid"]) if args.upload_mb else None
        finally:
            for p in reversed(procs):
                stop(p)
    setup = (f"{args.clients} concurrent clients, {args.rounds} x {args.seconds:.0f} s per endpoint (median round), loopback, "
             f"{os.cpu_count()} CPUs shared by servers and load generator; max_concurrent_requests_per_tenant {args.cap}, "
             "requests_per_minute above the load.")
    parts = [setup, endpoint_table(results)]
    if hostile:
        parts += [(f"A normal tenant's {args.normal_clients} connections alone and beside a hostile tenant's {args.hostile_clients} "
                   f"(GET /v1/jobs?limit=100 back to back, from a process of its own), {args.rounds} rounds of {args.seconds:.0f} s "
                   "interleaved (the median round by p99), on an API with the shipped limits (requests_per_minute above the load):"),
                  hostile_table(hostile, args)]
    if uploaded:
        parts.append(upload_line(uploaded))
    print("\n\n".join(parts))
    if not args.no_record:
        record("api_load", "\n\n".join(parts), title="Control plane under load (api_load)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
