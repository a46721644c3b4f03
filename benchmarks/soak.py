"""Soak test of the admission queue: two tenants submit 20 small jobs at once to a cluster with room
for two; prints how many ran at once (never more than fit), each job's wait in the queue, the order
of admission between the tenants (fair share), and whether all succeeded.

    python benchmarks/soak.py [--jobs-per-tenant 10] [--cpus 3]
    python benchmarks/soak.py --fault-every 20 --steps 8     # and SIGKILL a process of a running job every 20 s

With `--fault-every S`, every S seconds one process of a running job (one that has trained a step
since its last fault) is SIGKILLed, picked at random among its actors (reward, rollout, trainer)
and its Python driver; it then prints each fault, the
restart it caused, the steps it cost (the step reached when it struck, less the step the job resumed
from) and whether every job still succeeded with each step reported once.

Starts its own redis-server (AOF), Ray head (`--num-cpus`, default 3: room for two tiny jobs of 1.5
CPUs) and API on free 127.0.0.1 ports, a tiny local model in the registry; each job is 2 GRPO steps,
its rewards on a reward actor and its completions on a rollout actor (`resources.reward_in: actor`,
`rollout_in: actor`: three actors of 0.5 CPU, three to kill, as docs/benchmarks.md's soak numbers were measured).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
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
    parser.add_argument("--steps", type=int, default=2, help="GRPO steps per job (checkpoint every 2).")
    parser.add_argument("--fault-every", type=float, default=0, help="SIGKILL a process of a running job every this many seconds (0: none).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.update(RAY_ENV)  # this process asks Ray's state API too (fault injection)
    sys.path.insert(0, str(ROOT))
    import httpx

    from api.auth import add_key
    from orchestrator.entrypoints.tiny_model import init_model

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
            procs.append(start([sys.executable, "-m", "orchestrator.entrypoints.cli", "serve"], api_env, tmp / "api.log"))
            url = f"http://127.0.0.1:{api_port}"
            wait(lambda: httpx.get(f"{url}/healthz", timeout=2).status_code == 200, 60, "the API")
            clients = {t: httpx.Client(base_url=url, headers={"Authorization": f"Bearer {k}"}, timeout=60) for t, k in keys.items()}
            data = "".join(json.dumps({"prompt": f"{a}+{b}=", "answer": a + b}) + "\n" for a in range(4) for b in range(4))
            files = {t: c.post("/v1/files", files={"file": ("train.jsonl", data)}, data={"purpose": "train"}).json()["id"] for t, c in clients.items()}

            def body(t: str, i: int) -> dict:
                return {"name": f"{t}-{i}", "model": {"path": "tiny"}, "data": {"train_file": files[t], "max_prompt_length": 16},
                        "rollout": {"n": 4, "max_new_tokens": 4}, "rewards": [{"function": "accuracy"}],
                        "optim": {"lr": 1e-4, "steps": args.steps, "prompts_per_step": 4}, "resources": {"torch_threads": 1, "reward_in": "actor", "rollout_in": "actor"},
                        "checkpoint": {"every": 2}}

            # Tenant a's jobs first, then b's, all at once: fair share should still alternate.
            order = [(t, i) for t in clients for i in range(args.jobs_per_tenant)]
            with ThreadPoolExecutor(8) as pool:
                submitted = list(pool.map(lambda ti: (ti[0], clients[ti[0]].post("/v1/jobs", json=body(*ti)).json()["id"]), order))
            start_t, peak, samples = time.monotonic(), 0, 0
            jobs: dict[str, dict] = {}
            faults: list[dict] = []
            rng, next_fault = random.Random(args.seed), time.monotonic() + args.fault_every
            while time.monotonic() - start_t < args.timeout:
                for t, c in clients.items():
                    for j in c.get("/v1/jobs", params={"limit": 100}).json()["data"]:
                        jobs[j["id"]] = {**j, "tenant": t}
                running = [j for j in jobs.values() if j["status"] in ("starting", "running", "cancelling")]
                peak, samples = max(peak, len(running)), samples + 1
                if args.fault_every and time.monotonic() >= next_fault:
                    # A job that has trained since its last fault (not one still restarting from it).
                    hit = {f["job"]: f["step"] for f in faults}
                    ready = [j for j in running if j["status"] == "running" and j["step"] >= 1 and j["step"] > hit.get(j["id"], 0)]
                    fault = inject_fault(rng, ready, dashboard)
                    if fault:
                        faults.append({**fault, "time": time.monotonic() - start_t})
                        next_fault = time.monotonic() + args.fault_every
                if len(jobs) == len(submitted) and all(j["status"] in ("succeeded", "failed", "cancelled") for j in jobs.values()):
                    break
                time.sleep(0.5)
            elapsed = time.monotonic() - start_t
            admitted = []
            for t, job_id in submitted:
                events = clients[t].get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
                adm = next((e for e in events if e["type"] == "admitted"), None)
                admitted.append((adm["created_at"] if adm else float("inf"), t, job_id, adm["data"]["waited_s"] if adm else None))
                jobs.setdefault(job_id, {})["restart_events"] = restart_events(events)
                steps = [m["step"] for m in clients[t].get(f"/v1/jobs/{job_id}/metrics", params={"limit": 1000}).json()["data"]]
                jobs[job_id]["steps_once"] = steps == list(range(1, args.steps + 1))
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
    ok = sum(1 for j in jobs.values() if j.get("status") == "succeeded")
    once = sum(1 for j in jobs.values() if j.get("steps_once"))
    print(f"succeeded: {ok} of {len(submitted)}; each step's metrics exactly once: {once} of {len(submitted)}")
    if args.fault_every:
        report_faults(faults, jobs)
    return 0 if ok == len(submitted) == once else 1


def restart_events(events: list[dict]) -> list[dict]:
    """A job's restart events; a driver's (written by the control plane) gets the step its next
    attempt resumed from (that attempt's `resumed` event, or 0 when it had no checkpoint)."""
    out = []
    for i, e in enumerate(events):
        if e["type"] != "restart":
            continue
        data = dict(e["data"])
        if "resume_step" not in data:
            resumed = next((x for x in events[i + 1:] if x["type"] in ("resumed", "restart")), None)
            data["resume_step"] = resumed["data"].get("step", 0) if resumed and resumed["type"] == "resumed" else 0
        out.append(data)
    return out


def inject_fault(rng, running: list[dict], dashboard: str) -> dict | None:
    """SIGKILL one process of a running job: one of its live actors or its Python driver."""
    import psutil
    from ray.util.state import list_actors

    if not running:
        return None
    job = rng.choice(running)
    victims = [(f"actor {a.name}", a.pid) for a in list_actors(address=dashboard, filters=[("state", "=", "ALIVE")], limit=1000)
               if (a.name or "").startswith(job["id"] + "/") and a.pid]
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if "orchestrator.entrypoints.run" in (proc.info["cmdline"] or []) and proc.environ().get("RLHF_JOB_ID") == job["id"]:
                victims.append(("driver", proc.pid))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    if not victims:
        return None
    what, pid = rng.choice(victims)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return None
    return {"job": job["id"], "what": what, "step": job["step"]}


def report_faults(faults: list[dict], jobs: dict[str, dict]) -> None:
    """Each fault beside the restart it caused (the job's restart events, in order) and the steps it cost."""
    print(f"\nfaults injected: {len(faults)}; restarts recorded: {sum(j.get('restarts') or 0 for j in jobs.values())}")
    print(f"{'t s':>6} {'job':28} {'killed':34} {'step':>4} {'restart':>7} {'resumed':>7} {'lost':>4}")
    seen: dict[str, int] = {}
    lost_total = 0
    for f in faults:
        index = seen.get(f["job"], 0)
        seen[f["job"]] = index + 1
        restarts = jobs.get(f["job"], {}).get("restart_events", [])
        r = restarts[index] if index < len(restarts) else None
        lost = max(f["step"] - r["resume_step"], 0) if r and "resume_step" in r else None
        lost_total += lost or 0
        resumed = r["resume_step"] if r else "-"
        print(f"{f['time']:6.0f} {f['job']:28} {f['what'][-34:]:34} {f['step']:4} {r['restart'] if r else '-':>7} {resumed!s:>7} "
              f"{lost if lost is not None else '?':>4}")
    print(f"steps redone in all (lost work, at least): {lost_total}")


if __name__ == "__main__":
    sys.exit(main())
