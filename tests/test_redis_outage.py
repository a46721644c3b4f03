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
from orchestrator.reporting.redis_reporter import RedisReporter
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


def test_a_resumed_driver_brings_back_the_steps_a_dead_one_never_sent(tmp_path):
    """A driver killed inside a Redis outage took its queued writes with it; the run directory has
    them. The resumed driver's rewind completes the stream from metrics.jsonl: each step once, in order,
    with the file's values, however often it rewinds."""
    from api.store import JobStore
    from orchestrator.reporting.reporters import FileReporter

    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    (tmp_path / "redis").mkdir()
    server = start_redis(port, tmp_path / "redis")
    job_id = "job-lost-writes"
    try:
        async def record():
            store = JobStore(url)
            await store.create(job_id, "acme", "lost", {"name": "lost"}, {}, None)
            await store.close()

        asyncio.run(record())
        run_dir = FileReporter(tmp_path / "run")
        dead = RedisReporter(url, job_id)  # the first driver: its steps 1-3 and 5 reached Redis, 4 and 6-10 died with it
        for step in range(1, 11):
            values = {"stage_index": 0.0, "reward/mean": step / 10}
            run_dir.metrics(step, {"stage": "train", **values})
            if step in (1, 2, 3, 5):
                dead.metrics(step, values)
        dead.close()
        run_dir.rewind(8)  # the resumed driver: back to its checkpoint at step 8, in the run directory first
        resumed = RedisReporter(url, job_id, history=run_dir.metrics_path)
        try:
            resumed.rewind(8)
            for step in (9, 10):
                values = {"stage_index": 0.0, "reward/mean": step / 100}
                run_dir.metrics(step, {"stage": "train", **values})
                resumed.metrics(step, values)
            resumed.rewind(10)  # (an actor lost at the end: nothing to add or remove)
        finally:
            resumed.close()
        client = redis.Redis(port=port, decode_responses=True)
        stream = [json.loads(f["data"]) for _, f in client.xrange(metrics_key(job_id))]
        lines = [json.loads(line) for line in run_dir.metrics_path.read_text().splitlines()]
        assert [m["step"] for m in stream] == list(range(1, 11))
        assert [m["values"] for m in stream] == [{k: v for k, v in line.items() if k not in ("step", "time", "stage")} for line in lines]
    finally:
        stop_group(server)


def test_a_write_that_fails_of_its_own_is_dropped_and_the_later_ones_still_go(tmp_path, capfd):
    """Not an outage: the rewind cannot read the run directory's history (here a directory stands where
    metrics.jsonl should be). That write is reported and dropped; the sender thread lives on, so the
    steps after it still reach Redis."""
    port = free_port()
    server = start_redis(port, tmp_path)
    (tmp_path / "metrics.jsonl").mkdir()
    rep = RedisReporter(f"redis://127.0.0.1:{port}/0", "job-unreadable", history=tmp_path / "metrics.jsonl")
    try:
        rep.metrics(1, {"reward/mean": 0.1})
        rep.rewind(1)
        rep.metrics(2, {"reward/mean": 0.2})
        rep.close()
        steps = [json.loads(f[b"data"])["step"] for _, f in redis.Redis(port=port).xrange(metrics_key("job-unreadable"))]
        assert steps == [1, 2]
        assert "could not write the rewind to step 1 of job job-unreadable: IsADirectoryError" in capfd.readouterr().err
    finally:
        stop_group(server)
