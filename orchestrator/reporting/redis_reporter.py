"""Reports a job's status, events and per-step metrics into Redis, where the control plane reads them.

The driver (`python -m orchestrator.entrypoints.run`, launched by the API with RLHF_REDIS_URL and RLHF_JOB_ID)
writes as things happen; the API only reads, plus the transitions it owns itself (queued,
cancelling, and what its reconciler learns from Ray). The job's Redis user reaches the job's own
three keys only (job hash, events, metrics), and runs no scripts: a status change here is a
WATCHed transaction on the job hash by `records.status_change`'s rules (those of the control
plane's script), so a terminal status can never change, whoever writes second; the control plane
brings the shared indexes in line with it.
"""

from __future__ import annotations

import collections
import json
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator.core.records import (
    event_record,
    events_key,
    job_key,
    json_safe,
    metrics_key,
    status_change,
    status_fields,
)


class RedisReporter:
    """The Reporter protocol over Redis, for the driver. A Redis outage never stops training, and
    loses nothing: every write waits in an ordered queue that a background thread sends, retrying
    while Redis is away, so the history reaches the control plane complete and in order once Redis
    is back. Each write is one MULTI/EXEC that also records its sequence number in the job's hash;
    after a connection broke mid-write, that number says whether it was applied, so none is applied
    twice. `close()` waits (up to CLOSE_WAIT_S) for the queue to drain.

    `history`: the run directory's metrics.jsonl. A driver that died with writes still queued (in a
    Redis outage) took them with it; `rewind`, which a resumed driver calls, adds back the steps that
    file holds and the stream lacks, so the history over REST is the run directory's."""

    RETRY_S = 0.5
    CLOSE_WAIT_S = 120.0
    MAX_PENDING = 100_000  # about a day of steps; beyond it the oldest writes go (and the job says so on stderr)

    def __init__(self, url: str, job_id: str, history: str | Path | None = None):
        import redis

        self.job_id = job_id
        self.history = Path(history) if history is not None else None
        self.client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5, health_check_interval=30)
        self._writer = uuid.uuid4().hex[:12]  # this process's writes, as marked in the job's hash
        self._pending: collections.deque[tuple[int, str, Callable]] = collections.deque()
        self._seq = 0
        self._cond = threading.Condition()
        self._closing = False
        self._warned: set[str] = set()
        self._thread = threading.Thread(target=self._send_loop, name=f"redis-reporter-{job_id}", daemon=True)
        self._thread.start()

    # --- what the driver calls -----------------------------------------------------------------

    def event(self, type: str, message: str = "", **data: Any) -> None:
        now = time.time()
        if type == "status":
            status = data.pop("status")
            fields, record = status_fields(status, message, data, now)
            self._put("a status change", lambda pipe: self._status(pipe, status, fields, record, repr(now)))
            return
        record = json.dumps(event_record(type, message, data, now), default=str)
        listing = None
        if type == "checkpoint" and data.get("path"):
            try:
                listing = _checkpoints_beside(data["path"])
            except OSError as err:  # the record keeps its last list rather than lose it to a storage error
                print(f"warning: job {self.job_id}: could not list the checkpoints beside {data['path']} ({err.__class__.__name__}: {err}); "
                      "its record keeps the list of the checkpoint before", file=sys.stderr)

        def write(pipe):
            pipe.xadd(events_key(self.job_id), {"data": record})
            if listing is not None:
                pipe.hset(job_key(self.job_id), "checkpoints", json.dumps(listing))
            if type == "restart":
                pipe.hset(job_key(self.job_id), "restarts", int(data["restart"]))
            pipe.hset(job_key(self.job_id), "updated_at", repr(now))

        self._put(f"a {type} event", write)

    def metrics(self, step: int, values: dict[str, float]) -> None:
        now = time.time()
        safe = json_safe(dict(values))
        record = json.dumps({"step": step, "time": now, "values": safe})

        def write(pipe):
            pipe.xadd(metrics_key(self.job_id), {"data": record})
            pipe.hset(job_key(self.job_id), mapping={"step": step, "metrics": json.dumps(safe), "updated_at": repr(now)})

        self._put(f"the metrics of step {step}", write)

    def _status(self, pipe, status: str, fields: dict[str, str], record: str, now: str) -> None:
        """A status change on the job hash, WATCHed: a change the control plane makes meanwhile (a cancel)
        fails the EXEC, and the write is tried again on what it wrote."""
        pipe.watch(job_key(self.job_id))
        cur, started = pipe.hmget(job_key(self.job_id), "status", "started_at")
        pipe.multi()
        applied, mapping = status_change(cur.decode() if cur else None, bool(started), status, fields, now)
        if mapping:
            pipe.hset(job_key(self.job_id), mapping=mapping)
        if applied:
            pipe.xadd(events_key(self.job_id), {"data": record})

    def rewind(self, after_step: int) -> None:
        """Delete the metric entries of steps past `after_step` (they are redone after a restart or a
        resume), in order with the other writes: the history then has each step once. From the first
        step up to `after_step` that `history` holds and the stream lacks, the stream is rewritten
        from `history` (in step order: a later entry of the stream goes and comes back after it)."""

        def write(pipe):
            entries = [(eid, json.loads(fields[b"data"]).get("step", 0)) for eid, fields in self.client.xrange(metrics_key(self.job_id))]
            gone = [eid for eid, step in entries if step > after_step]
            lines = _history(self.history, after_step) if self.history is not None else []
            have = {step for _, step in entries}
            first = next((step for step, _ in lines if step not in have), None)
            if first is not None:
                gone += [eid for eid, step in entries if first <= step <= after_step]
            if gone:
                pipe.xdel(metrics_key(self.job_id), *gone)
            for step, record in lines:
                if first is not None and step >= first:
                    pipe.xadd(metrics_key(self.job_id), {"data": record})

        self._put(f"the rewind to step {after_step}", write)

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(self.CLOSE_WAIT_S)
        if self._thread.is_alive():
            self._say("close", f"warning: Redis stayed unreachable; {len(self._pending)} writes of job {self.job_id} were not sent "
                      "(the run directory has them all)")
        self.client.close()

    # --- the sender ------------------------------------------------------------------------------

    def _put(self, what: str, write: Callable) -> None:
        with self._cond:
            self._seq += 1
            self._pending.append((self._seq, what, write))
            if len(self._pending) > self.MAX_PENDING:
                _, lost, _ = self._pending.popleft()
                self._say("overflow", f"warning: Redis unreachable for long; dropped {lost} of job {self.job_id} (and older)")
            self._cond.notify_all()

    def _send_loop(self) -> None:
        import redis

        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if not self._pending:
                    return  # closing, and everything was sent
                seq, what, write = self._pending[0]
            try:
                self._send(seq, write)
            except redis.WatchError:
                continue  # the control plane changed the job hash under a status change: again, on what it wrote
            except (redis.ConnectionError, redis.TimeoutError) as err:
                self._broke = True
                self._say("outage", f"warning: Redis unreachable ({err}); job {self.job_id} keeps its writes and retries")
                time.sleep(self.RETRY_S)
                continue
            except Exception as err:  # not an outage (Redis refused it, the run directory is unreadable): this write cannot succeed; the next ones may
                self._say(what, f"warning: RedisReporter could not write {what} of job {self.job_id}: {type(err).__name__}: {err}")
            with self._cond:
                self._pending.popleft()

    def _send(self, seq: int, write: Callable) -> None:
        mark = f"{self._writer}:{seq}"
        if self._sent_already(seq):
            return
        with self.client.pipeline(transaction=True) as pipe:  # (reset on the way out: a WATCH holds its connection)
            write(pipe)
            pipe.hset(job_key(self.job_id), "reporter_mark", mark)
            pipe.execute()

    def _sent_already(self, seq: int) -> bool:
        """Whether the job's hash shows this write applied (a reply lost with the connection)."""
        if not self._broke:
            return False
        mark = self.client.hget(job_key(self.job_id), "reporter_mark")
        self._broke = False
        writer, _, done = (mark or b"").decode().partition(":")
        return writer == self._writer and done.isdigit() and int(done) >= seq

    _broke = False  # set by a connection error: the next write first reads the mark

    def _say(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            print(message, file=sys.stderr)


def _history(path: Path, last_step: int) -> list[tuple[int, str]]:
    """(step, metrics-stream record) of each line of a run directory's metrics.jsonl up to `last_step`,
    in step order; a line that does not parse (one being written) is skipped. The file's `stage` name
    stays in the file: the stream's values are numbers (`stage_index` says the stage)."""
    out: dict[int, str] = {}
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    for line in text.splitlines():
        try:
            row = json.loads(line)
            step = int(row.pop("step"))
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
        if step <= last_step:
            when = row.pop("time", None)
            row.pop("stage", None)
            out[step] = json.dumps({"step": step, "time": when, "values": row})
    return sorted(out.items())


def _checkpoints_beside(path: str, attempts: int = 3, wait_s: float = 0.5) -> list[dict]:
    """The finished checkpoints in the directory of the one just saved (after pruning), as the
    driver sees them: the API may share no filesystem with the driver. Object stores fail now and
    then: tried `attempts` times before the last OSError is raised."""
    from pathlib import Path

    from orchestrator.core import storage
    from orchestrator.core.checkpoint import listing

    root = path.rstrip("/").rsplit("/", 1)[0] if storage.is_url(path) else Path(path).parent
    for _ in range(attempts - 1):
        try:
            return listing(root)
        except OSError:
            time.sleep(wait_s)
    return listing(root)
