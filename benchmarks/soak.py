"""Soak test of the admission queue: two tenants submit 20 small jobs at once to a cluster with room
for two; prints how many ran at once (never more than fit), each job's wait in the queue, the order
of admission between the tenants (fair share), and whether all succeeded.

    python benchmarks/soak.py [--jobs-per-tenant 10] [--cpus 3]

Starts its own redis-server (AOF), Ray head (`--num-cpus`, default 3: room for two tiny jobs of 1.5
CPUs) and API on free 127.0.0.1 ports, a tiny local model in the registry; each job is 2 GRPO steps.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._services import free_port, start, stop  # noqa: E402
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token"}



def wait(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got = check()
            if got:
                return got
        except Exception:  # not up yet
            pass
        time.sleep(0.3)
    raise TimeoutError(f"timed out waiting for {what}")



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs-per-tenant", type=int, default=10)
    parser.add_argument("--cpus", type=int, default=3, help="Logical CPUs of the Ray head (each job holds 1.5).")
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import httpx

    from api.auth import add_key
    from orchestrator.tiny_model import init_model

    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="rlhf-soak-", dir="/tmp") as tmp:
        tmp = Path(tmp)
        try:
            redis_port, gcs, dash, api_port = free_port(), free_port(), free_port(), free_port()
            procs.append(start(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--dir", str(tmp), "--appendonly", "yes"],
                               os.environ.copy(), tmp / "redis.log"))
            env = {**os.environ, **RAY_ENV}
            procs.append(start(["ray", "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
                                "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--num-cpus", str(args.cpus),
                                "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
                                "--metrics-export-port", str(free_port()), "--temp-dir", str(tmp / "ray"), "--disable-usage-stats"],
                               env, tmp / "ray.log"))
            model = init_model(tmp / "tiny")
            (tmp / "registry.yaml").write_text(json.dumps({"models": {"tiny": {"path": str(model)}}}))
            keys = {t: add_key(tmp / "keys.yaml", t) for t in ("team-a", "team-b")}
            dashboard = f"http://127.0.0.1:{dash}"
            wait(lambda: httpx.get(f"{dashboard}/api/version", timeout=2).status_code < 500, 120, "the Ray dashboard")
            api_env = {**env, "RLHF_API_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0", "RLHF_API_RAY_ADDRESS": dashboard,
                       "RLHF_API_API_KEYS_FILE": str(tmp / "keys.yaml"), "RLHF_API_PORT": str(api_port),
                       "RLHF_API_REGISTRY_FILE": str(tmp / "registry.yaml"), "RLHF_API_STORAGE_ROOT": str(tmp / "store"),
                       "RLHF_API_RECONCILE_INTERVAL_S": "0.5"}
            procs.append(start([sys.executable, "-m", "orchestrator.cli", "serve"], api_env, tmp / "api.log"))
            url = f"http://127.0.0.1:{api_port}"
            wait(lambda: httpx.get(f"{url}/healthz", timeout=2).status_code == 200, 60, "the API")
            clients = {t: httpx.Client(base_url=url, headers={"Authorization": f"Bearer {k}"}, timeout=60) for t, k in keys.items()}
            data = "".join(json.dumps({"prompt": f"{a}+{b}=", "answer": a + b}) + "\n" for a in range(4) for b in range(4))
            files = {t: c.post("/v1/files", files={"file": ("train.jsonl", data)}, data={"purpose": "train"}).json()["id"] for t, c in clients.items()}

            def body(t: str, i: int) -> dict:
                return {"name": f"{t}-{i}", "model": {"path": "tiny"}, "data": {"train_file": files[t], "max_prompt_length": 16},
                        "rollout": {"n": 4, "max_new_tokens": 4}, "rewards": [{"function": "accuracy"}],
                        "optim": {"lr": 1e-4, "steps": 2, "prompts_per_step": 4}, "resources": {"torch_threads": 1}}

            # Tenant a's jobs first, then b's, all at once: fair share should still alternate.
            order = [(t, i) for t in clients for i in range(args.jobs_per_tenant)]
            with ThreadPoolExecutor(8) as pool:
                submitted = list(pool.map(lambda ti: (ti[0], clients[ti[0]].post("/v1/jobs", json=body(*ti)).json()["id"]), order))
            start_t, peak, samples = time.monotonic(), 0, 0
            jobs: dict[str, dict] = {}
            while time.monotonic() - start_t < args.timeout:
                for t, c in clients.items():
                    for j in c.get("/v1/jobs", params={"limit": 100}).json()["data"]:
                        jobs[j["id"]] = {**j, "tenant": t}
                running = [j for j in jobs.values() if j["status"] in ("starting", "running", "cancelling")]
                peak, samples = max(peak, len(running)), samples + 1
                if len(jobs) == len(submitted) and all(j["status"] in ("succeeded", "failed", "cancelled") for j in jobs.values()):
                    break
                time.sleep(0.5)
            elapsed = time.monotonic() - start_t
            admitted = []
            for t, job_id in submitted:
                events = clients[t].get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
                adm = next((e for e in events if e["type"] == "admitted"), None)
                admitted.append((adm["created_at"] if adm else float("inf"), t, job_id, adm["data"]["waited_s"] if adm else None))
        finally:
            for p in reversed(procs):
                stop(p)
    admitted.sort()
    # Admitted at once: the most [admitted, finished] intervals that overlap (from the records, not sampled).
    spans = sorted((adm, +1) for adm, _, job_id, _ in admitted if adm != float("inf")) + \
        sorted((jobs[job_id]["finished_at"] or float("inf"), -1) for adm, _, job_id, _ in admitted if job_id in jobs)
    overlap = held = 0
    for _, delta in sorted(spans, key=lambda x: (x[0], x[1])):
        held += delta
        overlap = max(overlap, held)
    print(f"{len(submitted)} jobs from 2 tenants submitted at once to a Ray head with {args.cpus} CPUs (room for "
          f"{int(args.cpus // 1.5)} jobs of 1.5 CPUs); all done in {elapsed:.0f} s")
    print(f"most jobs admitted at once: {overlap} (from admission and end times); most seen starting or running: {peak} "
          f"(sampled {samples} times)")
    print("admission order: " + " ".join(t[-1] for _, t, _, _ in admitted))
    print(f"{'job':28} {'tenant':7} {'waited s':>9} {'status':10}")
    for _, t, job_id, waited in admitted:
        j = jobs.get(job_id, {})
        print(f"{job_id:28} {t:7} {waited if waited is None else f'{waited:9.1f}'} {j.get('status', '?'):10}")
    ok = sum(1 for j in jobs.values() if j["status"] == "succeeded")
    print(f"succeeded: {ok} of {len(submitted)}")
    return 0 if ok == len(submitted) else 1


if __name__ == "__main__":
    sys.exit(main())
