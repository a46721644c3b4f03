"""A node lost under a running job, for real (issue 27, item 13): a second Ray node joins the session's
head on this machine, a job's roles are placed across both nodes, and the second node's raylet is
killed mid-job. The job resumes from its checkpoint once the node is back, each step once in its
history; the admission queue's capacity follows the node leaving and coming back.

The second node is started through Ray's own Node class in a process of its own (its process group
is what the test kills and cleans up): `ray start --address` would refuse on this machine, whose
tests run with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, and with it set would resolve 127.0.0.1 to an
address the head does not listen on.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from api.launcher import RayLauncher
from api.reconciler import Reconciler
from api.settings import Settings
from tests.api.conftest import (  # noqa: F401  (fixtures)
    ARITHMETIC,
    ApiServer,
    api_env,
    keys,
    operator,
    upload,
    wait_status,
    workdir,
)
from tests.conftest import RAY_ENV, free_port, stop_group, wait_until
from tests.test_redis_outage import start_redis

NODE2_CPUS = 2

# Ray's Node class, as `ray start` uses it, on loopback; the process lives until SIGTERM or SIGKILL.
NODE2 = r"""
import signal, sys, time
from ray._private.node import Node
from ray._private.parameter import RayParams

params = RayParams(gcs_address=sys.argv[1], node_ip_address="127.0.0.1", num_cpus=int(sys.argv[2]), num_gpus=0,
                   resources={"node2": 1}, min_worker_port=0, max_worker_port=0, include_log_monitor=False,
                   dashboard_agent_listen_port=None, object_store_memory=200 * 1024 * 1024)
node = Node(params, head=False, shutdown_at_exit=True, spawn_reaper=False)
print("NODE", node.unique_id, flush=True)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
deadline = time.monotonic() + 1800  # never outlives a test that lost track of it
while time.monotonic() < deadline:
    time.sleep(1)
"""


class SecondNode:
    """A worker node of the session's Ray head, with NODE2_CPUS CPUs and the custom resource `node2`."""

    def __init__(self, head, log: Path):
        self.head, self.log = head, log
        self.proc: subprocess.Popen | None = None
        self.node_id: str | None = None

    def start(self) -> SecondNode:
        with open(self.log, "a") as out:
            self.proc = subprocess.Popen([sys.executable, "-c", NODE2, self.head.address, str(NODE2_CPUS)], stdout=out,
                                         stderr=subprocess.STDOUT, env={**os.environ, **RAY_ENV}, start_new_session=True)
        pid = self.proc.pid

        def alive():
            if self.proc.poll() is not None:
                raise RuntimeError(f"the second node's process exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            return next((n.node_id for n in nodes(self.head) if n.state == "ALIVE" and n.resources_total.get("node2")
                         and n.node_id != self.node_id), None)

        self.node_id = wait_until(alive, 120, f"the second Ray node (process {pid}) to join")
        return self

    def kill(self) -> list[str]:
        """The node lost as a machine is: SIGKILL to its raylet, then to every process it started (the
        actors' workers: with the raylet alone killed they went on answering the driver's direct calls,
        and a job ran to its end on them). What was killed."""
        pids = [pid for pid in group_pids(self.proc.pid) if pid != self.proc.pid]
        raylet = [pid for pid in pids if _cmdline(pid).split("\0")[0].endswith("/raylet")]
        assert len(raylet) == 1, f"the second node's raylet among {[_cmdline(p)[:80] for p in pids]}"
        pids += [pid for pid in children(raylet[0]) if pid not in pids]  # its workers have sessions of their own
        names = {pid: _cmdline(pid).split("\0")[0][-40:] for pid in pids}
        killed = []
        for pid in raylet + [p for p in pids if p not in raylet]:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(names[pid])
            except ProcessLookupError:
                pass
        return killed

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def children(parent: int) -> list[int]:
    """The processes whose parent is `parent`."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = Path(f"/proc/{name}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                out.append(int(name))
    return out


def group_pids(pgid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.getpgid(int(name)) == pgid:
                    out.append(int(name))
            except OSError:
                pass
    return out


def nodes(head):
    from ray.util.state import list_nodes

    return list_nodes(address=head.dashboard, limit=1000, timeout=10)


def cluster_cpus(head) -> float:
    """What the admission queue counts: the launcher's capacity (the alive nodes' CPUs)."""
    return asyncio.run(RayLauncher(Settings(ray_address=head.dashboard)).capacity()).total["CPU"]


def job_actor_nodes(head, job_id: str) -> dict[str, str]:
    """The job's alive actors -> the node each runs on."""
    from ray.util.state import list_actors

    actors = list_actors(address=head.dashboard, filters=[("state", "=", "ALIVE")], limit=10000, timeout=10)
    return {a.name: a.node_id for a in actors if (a.name or "").startswith(f"{job_id}/")}


def spread_job(file_id: str, steps: int) -> dict:
    """A tiny GRPO job of 4.5 CPUs: a trainer and a rollout actor of 2 CPUs each and a reward actor.
    The head has 4: one of them has to run on the second node."""
    return {
        "api_version": "rlhf/v1", "name": "node-loss", "model": {"path": "tiny"},
        "data": {"train_file": file_id, "max_prompt_length": 16},
        "rollout": {"backend": "hf", "n": 4, "max_new_tokens": 4},
        "rewards": [{"function": "accuracy"}],
        "optim": {"lr": 1e-4, "steps": steps, "prompts_per_step": 4},
        "resources": {"torch_threads": 1, "rollout_in": "actor", "reward_in": "actor",
                      "trainer": {"num_cpus": 2}, "rollout": {"num_cpus": 2}},
        "checkpoint": {"every": 1},
        "fault_tolerance": {"max_restarts": 2},
    }


@pytest.fixture()
def own_api(ray_head, keys, workdir, operator, tmp_path):  # noqa: F811
    """An API of this test's own, on its own Redis (no other test's jobs in its queue), on the session's Ray head."""
    port = free_port()
    redis_proc = start_redis(port, tmp_path)
    api_port = free_port()
    server = ApiServer(api_env(f"redis://127.0.0.1:{port}/0", ray_head, keys["path"], api_port, operator), api_port, tmp_path / "api.log")
    server.start()
    server.redis_url = f"redis://127.0.0.1:{port}/0"
    try:
        yield server
    finally:
        server.stop()
        stop_group(redis_proc)


@pytest.mark.slow
def test_a_node_lost_mid_job_is_recovered_and_capacity_follows_it(ray_head, own_api, keys, tmp_path):  # noqa: F811
    steps = 48  # (about 30 s here: the node is killed while it trains)
    node2 = SecondNode(ray_head, tmp_path / "node2.log")
    head_cpus = cluster_cpus(ray_head)
    job_id, created = None, []
    try:
        node2.start()
        wait_until(lambda: cluster_cpus(ray_head) == head_cpus + NODE2_CPUS, 60, "the capacity to count the second node")
        with own_api.client(keys["alpha"]) as alpha:
            r = upload(alpha, ARITHMETIC)
            assert r.status_code == 201, r.text
            file_id = r.json()["id"]
            r = alpha.post("/v1/jobs", json=spread_job(file_id, steps))
            assert r.status_code == 201, r.text
            job_id = r.json()["id"]
            created.append(job_id)

            # Its roles run on both nodes; it trains a step and checkpoints it.
            def placed():
                on = job_actor_nodes(ray_head, job_id)
                return on if len(set(on.values())) == 2 else None

            on = wait_until(placed, 240, f"job {job_id}'s actors on both nodes")
            assert node2.node_id in on.values(), on
            wait_until(lambda: (alpha.get(f"/v1/jobs/{job_id}").json().get("step") or 0) >= 1, 240, "the job's first step")

            killed = node2.kill()
            assert any(k.startswith("ray::") for k in killed), killed  # an actor of the job was there

            def restarted():
                events = alpha.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
                return [e for e in events if e["type"] == "restart"]

            wait_until(restarted, 120, f"job {job_id} to see its actor on the lost node die")
            # The admission queue's capacity follows the node leaving: a job of the same size could never fit now.
            wait_until(lambda: cluster_cpus(ray_head) == head_cpus, 90, "the capacity to drop the lost node")
            time.sleep(Reconciler.CAPACITY_TTL_S + 1)  # the API's cached capacity is renewed at its next use
            r = alpha.post("/v1/jobs", json=spread_job(file_id, 2))
            assert r.status_code == 422 and r.json()["error"]["code"] == "never_fits", r.text
            assert f"the cluster has {head_cpus:g}" in r.json()["error"]["message"], r.text

            # ... and coming back: the same job is taken again, and runs (after the first, which held what it needs).
            node2.stop()
            node2.start()
            wait_until(lambda: cluster_cpus(ray_head) == head_cpus + NODE2_CPUS, 60, "the capacity to count the node again")
            time.sleep(Reconciler.CAPACITY_TTL_S + 1)
            r = alpha.post("/v1/jobs", json=spread_job(file_id, 2))
            assert r.status_code == 201, r.text
            second = r.json()["id"]
            created.append(second)

            # The job placed its actors again (on the node back) and resumed from its checkpoint.
            job = wait_status(alpha, job_id, {"succeeded", "failed", "cancelled"}, 420)
            events = alpha.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
            restarts = [e for e in events if e["type"] == "restart"]
            assert job["status"] == "succeeded", (job["error"], history(alpha, job_id))
            assert restarts and restarts[0]["data"]["resume_step"] >= 1, [e["message"] for e in events]
            metrics = alpha.get(f"/v1/jobs/{job_id}/metrics", params={"limit": 1000}).json()["data"]
            assert [m["step"] for m in metrics] == list(range(1, steps + 1))
            after = wait_status(alpha, second, {"succeeded", "failed", "cancelled"}, 300)
            assert after["status"] == "succeeded", (after["error"], history(alpha, second), records(own_api, job_id, second))
    finally:
        with own_api.client(keys["alpha"]) as alpha:
            for job in created:
                if alpha.get(f"/v1/jobs/{job}").json().get("status") not in ("succeeded", "failed", "cancelled"):
                    alpha.post(f"/v1/jobs/{job}/cancel")
                    wait_status(alpha, job, {"succeeded", "failed", "cancelled"}, 120)
        node2.stop()
    for job in created:
        wait_until(lambda job=job: not job_actor_nodes(ray_head, job), 60, f"job {job}'s actors to be gone")


def history(client, job_id: str) -> tuple[str, list[str]]:
    """A job's status and its last events' messages, for a failure's message."""
    events = client.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
    return client.get(f"/v1/jobs/{job_id}").json()["status"], [f"{e['type']}: {e['message'][:300]}" for e in events[-10:]]


def records(api, *ids: str) -> dict:
    """What the admission queue reads of these jobs in Redis, for a failure's message."""
    import redis

    from orchestrator.core.records import ACTIVE_KEY, job_key

    r = redis.Redis.from_url(api.redis_url, decode_responses=True)
    out = {"active": sorted(r.smembers(ACTIVE_KEY))}
    for i in ids:
        out[i] = {k: v[:200] for k, v in r.hgetall(job_key(i)).items() if k in ("status", "demand", "admitted_at", "queue")}
    return out
