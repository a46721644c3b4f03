"""The job record's schema: statuses and their order, the Redis key layout, the one atomic
status-transition script, and the shape of an event. The driver's reporter writes it and the
control plane reads it; neither owns it.

Layout (prefix `rlhf:`):
  job:<id>              hash: the job record (status, timestamps, step, total_steps, metrics, error, ...)
  job:<id>:events       stream: one entry per event, field `data` = JSON {type, message, time, ...}
  job:<id>:metrics      stream: one entry per step, field `data` = JSON {step, time, values}
  tenant:<t>:jobs       sorted set of the tenant's job ids, scored by creation order
  tenant:<t>:status:<s> sorted set of the tenant's job ids in status s, same scores
  jobs:active           set of job ids not yet terminal (what the reconciler watches)
  jobs:status_counts    hash status -> number of jobs (Prometheus' jobs-by-status gauge)
"""

from __future__ import annotations

import json
import math
import time
from typing import Any


def json_safe(values: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN/inf: write them as null so every line stays parseable by any reader."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}


PREFIX = "rlhf:"
STATUSES = ("queued", "starting", "running", "cancelling", "succeeded", "failed", "cancelled")
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


def job_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}"


def events_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}:events"


def metrics_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}:metrics"


def tenant_jobs_key(tenant: str) -> str:
    return f"{PREFIX}tenant:{tenant}:jobs"


def tenant_status_key(tenant: str, status: str) -> str:
    return f"{PREFIX}tenant:{tenant}:status:{status}"


ACTIVE_KEY = f"{PREFIX}jobs:active"
COUNTS_KEY = f"{PREFIX}jobs:status_counts"

# One status change, atomically: a terminal status never changes; otherwise a status only moves
# forward (a late `running` from the driver does not undo `cancelling`). Extra fields (total_steps,
# error, ...) are written while the job is not terminal. The status event is appended only when the
# change is applied, so a stream's last status event is always the record's status.
# KEYS: job hash, events stream. ARGV: status, now, event JSON, fields JSON, prefix, job id.
# Returns {applied (0|1), status now, event id or ""}.
TRANSITION_LUA = """
local rank = {queued=0, starting=1, running=2, cancelling=3, succeeded=4, failed=4, cancelled=4}
local new, now, prefix, id = ARGV[1], ARGV[2], ARGV[5], ARGV[6]
local cur = redis.call('HGET', KEYS[1], 'status')
if cur and rank[cur] == 4 then return {0, cur, ''} end
local fields = cjson.decode(ARGV[4])
for k, v in pairs(fields) do redis.call('HSET', KEYS[1], k, v) end
redis.call('HSET', KEYS[1], 'updated_at', now)
if cur and rank[new] < 4 and rank[new] <= rank[cur] then return {0, cur, ''} end
redis.call('HSET', KEYS[1], 'status', new)
if (new == 'starting' or new == 'running') and not redis.call('HGET', KEYS[1], 'started_at') then
  redis.call('HSET', KEYS[1], 'started_at', now)
end
if rank[new] == 4 then
  redis.call('HSET', KEYS[1], 'finished_at', now)
  redis.call('SREM', prefix .. 'jobs:active', id)
end
local tenant = redis.call('HGET', KEYS[1], 'tenant')
if tenant then
  local score = redis.call('HGET', KEYS[1], 'seq') or '0'
  if cur then
    redis.call('ZREM', prefix .. 'tenant:' .. tenant .. ':status:' .. cur, id)
    redis.call('HINCRBY', prefix .. 'jobs:status_counts', cur, -1)
  end
  redis.call('ZADD', prefix .. 'tenant:' .. tenant .. ':status:' .. new, score, id)
  redis.call('HINCRBY', prefix .. 'jobs:status_counts', new, 1)
end
local eid = redis.call('XADD', KEYS[2], '*', 'data', ARGV[3])
return {1, new, eid}
"""


def event_record(type: str, message: str, data: dict[str, Any], now: float | None = None) -> dict[str, Any]:
    return json_safe({"type": type, "message": message, "time": now or time.time(), **data})


def transition_args(job_id: str, status: str, message: str, data: dict[str, Any], now: float) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV of TRANSITION_LUA for a status event (shared by the reporter and the API)."""
    if status not in STATUSES:
        raise ValueError(f"unknown job status {status!r}; expected one of {', '.join(STATUSES)}")
    fields: dict[str, str] = {}
    for name in ("total_steps", "step"):
        if data.get(name) is not None:
            fields[name] = str(int(data[name]))
    if data.get("error") is not None:
        fields["error"] = json.dumps(data["error"])
    event = event_record("status", message, {**data, "status": status}, now)
    return [job_key(job_id), events_key(job_id)], [status, repr(now), json.dumps(event, default=str), json.dumps(fields), PREFIX, job_id]
