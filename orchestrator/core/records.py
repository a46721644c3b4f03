"""The job record's schema: statuses and their order, the Redis key layout, the one atomic
status-transition script, and the shape of an event. The driver's reporter writes it and the
control plane reads it; neither owns it.

Layout (prefix `rlhf:`):
  job:<id>              hash: the job record (status, timestamps, step, total_steps, metrics, error, ...)
  job:<id>:events       stream: one entry per event, field `data` = JSON {type, message, time, ...}
  job:<id>:metrics      stream: one entry per step, field `data` = JSON {step, time, values}
  job:<id>:control      hash: what only the control plane writes (tenant, seq, spec, launch_spec, demand,
                        the status the indexes hold, ...); the job's own Redis user reaches the three keys above only
  tenant:<t>:jobs       sorted set of the tenant's job ids, scored by creation order
  tenant:<t>:status:<s> sorted set of the tenant's job ids in status s, same scores
  jobs:active           set of job ids not yet terminal (what the reconciler watches)
  jobs:status_counts    hash status -> number of jobs (Prometheus' jobs-by-status gauge)
  jobs:ending           sorted set of the jobs whose own processes reported them ended, scored by when the
                        control plane saw it, until Ray's job is seen ended too (admission counts them meanwhile)
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


def control_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}:control"


def tenant_jobs_key(tenant: str) -> str:
    return f"{PREFIX}tenant:{tenant}:jobs"


def tenant_status_key(tenant: str, status: str) -> str:
    return f"{PREFIX}tenant:{tenant}:status:{status}"


ACTIVE_KEY = f"{PREFIX}jobs:active"
ENDING_KEY = f"{PREFIX}jobs:ending"
COUNTS_KEY = f"{PREFIX}jobs:status_counts"

RANK = {"queued": 0, "starting": 1, "running": 2, "cancelling": 3, "succeeded": 4, "failed": 4, "cancelled": 4}


def effective_status(reported: str | None, indexed: str | None) -> str | None:
    """The status the control plane acts on: the job hash's (`reported`, which the job's processes
    write) where it is a forward move from the status the control plane last indexed, else the
    indexed one. A job can report progress; it cannot take a status back."""
    if indexed is None or reported not in RANK:
        return indexed if indexed is not None else reported
    if RANK[indexed] == 4 or RANK[reported] < RANK[indexed]:
        return indexed
    return reported


def status_change(cur: str | None, started: bool, new: str, fields: dict[str, str], now: str) -> tuple[bool, dict[str, str]]:
    """One status change as the job's own reporter applies it to the job hash (TRANSITION_LUA's rules,
    without the shared indexes): (applied, the hash fields to write). A terminal status never changes;
    otherwise a status only moves forward; extra fields are written while the job is not terminal."""
    if cur is not None and RANK.get(cur) == 4:
        return False, {}
    out = {**fields, "updated_at": now}
    if cur is not None and cur in RANK and RANK[new] < 4 and RANK[new] <= RANK[cur]:
        return False, out
    out["status"] = new
    if new in ("starting", "running") and not started:
        out["started_at"] = now
    if RANK[new] == 4:
        out["finished_at"] = now
    return True, out


# The control plane's side of a job's status. The job hash holds the status the job reports; the
# control hash (`job:<id>:control`, which no job can write) holds the tenant, the creation order and
# the status the shared indexes hold (tenant status sets, counters, the active set). `settle` moves
# those indexes to a status; every control-plane script calls it, so the indexes follow what jobs
# report (effective_status's rule) without a job ever touching them. A terminal status that comes
# from the job (`reported`) puts it in jobs:ending: its word alone frees nothing it holds.
_STATUS_LUA = """
local rank = {queued=0, starting=1, running=2, cancelling=3, succeeded=4, failed=4, cancelled=4}
local function effective(reported, indexed)
  if not indexed then return reported end
  if not reported or not rank[reported] then return indexed end
  if rank[indexed] == 4 or rank[reported] < rank[indexed] then return indexed end
  return reported
end
local function settle(target, prefix, id, reported)
  local tenant = redis.call('HGET', KEYS[3], 'tenant')
  local indexed = redis.call('HGET', KEYS[3], 'status')
  if not tenant or not target or indexed == target then return end
  local score = redis.call('HGET', KEYS[3], 'seq') or '0'
  if indexed then
    redis.call('ZREM', prefix .. 'tenant:' .. tenant .. ':status:' .. indexed, id)
    redis.call('HINCRBY', prefix .. 'jobs:status_counts', indexed, -1)
  end
  redis.call('ZADD', prefix .. 'tenant:' .. tenant .. ':status:' .. target, score, id)
  redis.call('HINCRBY', prefix .. 'jobs:status_counts', target, 1)
  if rank[target] == 4 then redis.call('SREM', prefix .. 'jobs:active', id) end
  if rank[target] == 4 and reported then redis.call('ZADD', prefix .. 'jobs:ending', 'NX', redis.call('TIME')[1], id) end
  redis.call('HSET', KEYS[3], 'status', target)
end
"""

# One status change by the control plane, atomically, by status_change's rules, from the effective
# status; the indexes follow. The status event is appended only when the change is applied, so a
# stream's last status event is always the record's status.
# KEYS: job hash, events stream, control hash. ARGV: status, now, event JSON, fields JSON, prefix, job id.
# Returns {applied (0|1), status now, event id or ""}.
TRANSITION_LUA = _STATUS_LUA + """
local new, now, prefix, id = ARGV[1], ARGV[2], ARGV[5], ARGV[6]
local cur = effective(redis.call('HGET', KEYS[1], 'status'), redis.call('HGET', KEYS[3], 'status'))
if cur and rank[cur] == 4 then settle(cur, prefix, id, true) return {0, cur, ''} end
local fields = cjson.decode(ARGV[4])
for k, v in pairs(fields) do redis.call('HSET', KEYS[1], k, v) end
redis.call('HSET', KEYS[1], 'updated_at', now)
if cur and rank[new] < 4 and rank[new] <= rank[cur] then settle(cur, prefix, id, true) return {0, cur, ''} end
redis.call('HSET', KEYS[1], 'status', new)
if (new == 'starting' or new == 'running') and not redis.call('HGET', KEYS[1], 'started_at') then
  redis.call('HSET', KEYS[1], 'started_at', now)
end
if rank[new] == 4 then redis.call('HSET', KEYS[1], 'finished_at', now) end
settle(new, prefix, id, false)
local eid = redis.call('XADD', KEYS[2], '*', 'data', ARGV[3])
return {1, new, eid}
"""

# Bring the shared indexes in line with the status the job reported (a no-op when they are).
# KEYS: job hash, events stream (unused), control hash. ARGV: prefix, job id. Returns the effective status.
SETTLE_LUA = _STATUS_LUA + """
local now = effective(redis.call('HGET', KEYS[1], 'status'), redis.call('HGET', KEYS[3], 'status'))
settle(now, ARGV[1], ARGV[2], true)
return now
"""


def event_record(type: str, message: str, data: dict[str, Any], now: float | None = None) -> dict[str, Any]:
    return json_safe({"type": type, "message": message, "time": now or time.time(), **data})


def status_fields(status: str, message: str, data: dict[str, Any], now: float) -> tuple[dict[str, str], str]:
    """The job-hash fields a status event carries (total_steps, step, error) and the event's JSON
    (shared by the reporter and the API)."""
    if status not in STATUSES:
        raise ValueError(f"unknown job status {status!r}; expected one of {', '.join(STATUSES)}")
    fields: dict[str, str] = {}
    for name in ("total_steps", "step"):
        if data.get(name) is not None:
            fields[name] = str(int(data[name]))
    if data.get("error") is not None:
        fields["error"] = json.dumps(data["error"])
    return fields, json.dumps(event_record("status", message, {**data, "status": status}, now), default=str)


def transition_args(job_id: str, status: str, message: str, data: dict[str, Any], now: float) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV of TRANSITION_LUA (the control plane's status changes)."""
    fields, event = status_fields(status, message, data, now)
    return [job_key(job_id), events_key(job_id), control_key(job_id)], [status, repr(now), event, json.dumps(fields), PREFIX, job_id]
