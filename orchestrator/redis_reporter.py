"""Reports a job's status, events and per-step metrics into Redis, where the control plane reads them.

The driver (`python -m orchestrator.run`, launched by the API with RLHF_REDIS_URL and RLHF_JOB_ID)
writes as things happen; the API only reads, plus the transitions it owns itself (queued,
cancelling, and what its reconciler learns from Ray). Both sides share the key layout and the one
status-transition script in `orchestrator/core/records.py`, so a terminal status can never change,
whoever writes second.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from orchestrator.core.records import (
    TRANSITION_LUA,
    event_record,
    events_key,
    job_key,
    json_safe,
    metrics_key,
    transition_args,
)


class RedisReporter:
    """The Reporter protocol over Redis, for the driver. A Redis outage never stops training: a
    failed write is reported once on stderr and the job goes on (the run dir still has everything)."""

    def __init__(self, url: str, job_id: str):
        import redis

        self.job_id = job_id
        self.client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5, health_check_interval=30)
        self._transition = self.client.register_script(TRANSITION_LUA)
        self._warned = False

    def _guard(self, what: str, fn) -> Any:
        import redis

        try:
            return fn()
        except redis.RedisError as err:
            if not self._warned:
                print(f"warning: RedisReporter could not write {what} of job {self.job_id}: {err}", file=sys.stderr)
                self._warned = True
            return None

    def event(self, type: str, message: str = "", **data: Any) -> None:
        now = time.time()
        if type == "status":
            keys, args = transition_args(self.job_id, data.pop("status"), message, data, now)
            self._guard("a status change", lambda: self._transition(keys=keys, args=args))
            return
        record = json.dumps(event_record(type, message, data, now), default=str)

        def write():
            pipe = self.client.pipeline(transaction=True)
            pipe.xadd(events_key(self.job_id), {"data": record})
            if type == "checkpoint" and data.get("path"):
                pipe.hset(job_key(self.job_id), "checkpoints", json.dumps(_checkpoints_beside(data["path"])))
            pipe.hset(job_key(self.job_id), "updated_at", repr(now))
            pipe.execute()

        self._guard(f"a {type} event", write)

    def metrics(self, step: int, values: dict[str, float]) -> None:
        now = time.time()
        safe = json_safe(dict(values))
        record = json.dumps({"step": step, "time": now, "values": safe})

        def write():
            pipe = self.client.pipeline(transaction=True)
            pipe.xadd(metrics_key(self.job_id), {"data": record})
            pipe.hset(job_key(self.job_id), mapping={"step": step, "metrics": json.dumps(safe), "updated_at": repr(now)})
            pipe.execute()

        self._guard(f"the metrics of step {step}", write)

    def close(self) -> None:
        self.client.close()


def _checkpoints_beside(path: str) -> list[dict]:
    """The finished checkpoints in the directory of the one just saved (after pruning), as the
    driver sees them: the API may share no filesystem with the driver."""
    from pathlib import Path

    from orchestrator.core import storage
    from orchestrator.core.checkpoint import listing

    try:
        return listing(path.rstrip("/").rsplit("/", 1)[0] if storage.is_url(path) else Path(path).parent)
    except OSError:
        return []
