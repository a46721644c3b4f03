"""The driver's Redis reporter across a Redis restart: a real redis-server (AOF on, as the README's
recipe runs it) killed with SIGKILL mid-job and started again on the same port and directory; the
steps written meanwhile arrive once each, in order, and the final status arrives."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time

import redis

from orchestrator.core.records import events_key, job_key, metrics_key
from orchestrator.redis_reporter import RedisReporter
from tests.conftest import free_port, stop_group, wait_until


def start_redis(port: int, data) -> subprocess.Popen:
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data), "--appendonly", "yes",
                             "--appendfsync", "always", "--save", ""], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    client = redis.Redis(port=port)
    wait_until(lambda: _pings(client), 15, f"redis-server on port {port}")
    return proc


def _pings(client) -> bool:
    try:
        return client.ping()
    except redis.ConnectionError:
        return False


def test_a_redis_restart_mid_job_loses_no_step_and_repeats_none(tmp_path):
    from api.store import JobStore

    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    server = start_redis(port, tmp_path)
    job_id = "job-outage"

    async def record():
        store = JobStore(url)
        await store.create(job_id, "acme", "outage", {"name": "outage"}, {}, None)
        await store.close()

    asyncio.run(record())
    rep = RedisReporter(url, job_id)
    rep.RETRY_S = 0.2
    try:
        rep.event("status", "running", status="running", total_steps=12)
        for step in range(1, 4):
            rep.metrics(step, {"reward/mean": step / 10})
        wait_until(lambda: redis.Redis(port=port).xlen(metrics_key(job_id)) == 3, 15, "the first three steps")

        server.kill()  # SIGKILL: no shutdown save
        server.wait(10)
        for step in range(4, 9):  # written while Redis is down
            rep.metrics(step, {"reward/mean": step / 10})
        rep.event("warning", "written during the outage")
        time.sleep(1.0)  # several failed tries
        server = start_redis(port, tmp_path)
        for step in range(9, 13):
            rep.metrics(step, {"reward/mean": step / 10})
        rep.event("status", "succeeded", status="succeeded", step=12)
    finally:
        rep.close()
    try:
        client = redis.Redis(port=port, decode_responses=True)
        steps = [json.loads(f["data"])["step"] for _, f in client.xrange(metrics_key(job_id))]
        assert steps == list(range(1, 13))
        events = [json.loads(f["data"]) for _, f in client.xrange(events_key(job_id))]
        assert [e.get("status") for e in events if e["type"] == "status"] == ["queued", "running", "succeeded"]
        assert [e["message"] for e in events if e["type"] == "warning"] == ["written during the outage"]
        assert client.hget(job_key(job_id), "status") == "succeeded" and client.hget(job_key(job_id), "step") == "12"
    finally:
        stop_group(server)
