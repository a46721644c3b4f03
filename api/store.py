"""Job records, events and metrics in Redis (the layout is in orchestrator/core/records.py,
shared with the driver's reporter)."""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import redis.asyncio as aioredis

from orchestrator.core.records import (
    ACTIVE_KEY,
    COUNTS_KEY,
    PREFIX,
    STATUSES,
    TERMINAL,
    TRANSITION_LUA,
    event_record,
    events_key,
    job_key,
    metrics_key,
    tenant_jobs_key,
    tenant_status_key,
    transition_args,
)

SEQ_KEY = f"{PREFIX}jobs:seq"
IDEMPOTENCY_TTL_S = 24 * 3600
_JSON_FIELDS = ("metrics", "error", "metadata", "spec", "checkpoints")
_FLOAT_FIELDS = ("created_at", "started_at", "finished_at", "updated_at")
_INT_FIELDS = ("step", "total_steps", "seq")


def _idem_key(tenant: str, key: str) -> str:
    return f"{PREFIX}idem:{tenant}:{hashlib.sha256(key.encode()).hexdigest()}"


def decode(raw: dict[str, str]) -> dict[str, Any]:
    rec: dict[str, Any] = dict(raw)
    for f in _JSON_FIELDS:
        rec[f] = json.loads(raw[f]) if raw.get(f) else None
    for f in _FLOAT_FIELDS:
        rec[f] = float(raw[f]) if raw.get(f) else None
    for f in _INT_FIELDS:
        rec[f] = int(raw[f]) if raw.get(f) else None
    return rec


class JobStore:
    def __init__(self, url: str):
        self.redis = aioredis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=5, health_check_interval=30)
        self._transition = self.redis.register_script(TRANSITION_LUA)

    async def close(self) -> None:
        await self.redis.aclose()

    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    # --- records -------------------------------------------------------------------------------

    async def create(self, job_id: str, tenant: str, name: str, spec: dict, metadata: dict, idempotency_key: str | None) -> dict:
        now = time.time()
        seq = await self.redis.incr(SEQ_KEY)
        fields = {
            "id": job_id, "tenant": tenant, "name": name, "status": "queued", "seq": seq,
            "created_at": repr(now), "updated_at": repr(now), "step": 0,
            "spec": json.dumps(spec), "metadata": json.dumps(metadata), "ray_submission_id": job_id,
        }
        if idempotency_key:
            fields["idempotency_key"] = idempotency_key
        event = event_record("status", "queued", {"status": "queued"}, now)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(job_key(job_id), mapping=fields)
        pipe.zadd(tenant_jobs_key(tenant), {job_id: seq})
        pipe.zadd(tenant_status_key(tenant, "queued"), {job_id: seq})
        pipe.hincrby(COUNTS_KEY, "queued", 1)
        pipe.sadd(ACTIVE_KEY, job_id)
        pipe.xadd(events_key(job_id), {"data": json.dumps(event)})
        await pipe.execute()
        return decode({k: str(v) for k, v in fields.items()})

    async def delete(self, job_id: str) -> None:
        """Remove a job that never reached Ray (its launch failed), as if it had not been created."""
        raw = await self.redis.hgetall(job_key(job_id))
        if not raw:
            return
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(job_key(job_id), events_key(job_id), metrics_key(job_id))
        pipe.zrem(tenant_jobs_key(raw["tenant"]), job_id)
        pipe.zrem(tenant_status_key(raw["tenant"], raw["status"]), job_id)
        pipe.hincrby(COUNTS_KEY, raw["status"], -1)
        pipe.srem(ACTIVE_KEY, job_id)
        await pipe.execute()

    async def get(self, job_id: str, tenant: str | None = None) -> dict | None:
        """The record, or None if there is none or it belongs to another tenant."""
        raw = await self.redis.hgetall(job_key(job_id))
        if not raw or (tenant is not None and raw.get("tenant") != tenant):
            return None
        return decode(raw)

    async def list(self, tenant: str, limit: int, after: str | None = None, status: str | None = None) -> tuple[list[dict], bool] | None:
        """Newest first. None when `after` is not one of this tenant's jobs."""
        index = tenant_status_key(tenant, status) if status else tenant_jobs_key(tenant)
        top: str | float = "+inf"
        if after:
            score = await self.redis.zscore(tenant_jobs_key(tenant), after)
            if score is None:
                return None
            top = f"({int(score)}"
        ids = await self.redis.zrevrangebyscore(index, top, "-inf", start=0, num=limit + 1)
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids[:limit]:
            pipe.hgetall(job_key(job_id))
        raws = await pipe.execute()
        return [decode(r) for r in raws if r], len(ids) > limit

    async def transition(self, job_id: str, status: str, message: str = "", **data: Any) -> tuple[bool, str]:
        keys, args = transition_args(job_id, status, message, data, time.time())
        applied, now_status, _ = await self._transition(keys=keys, args=args)
        return bool(applied), now_status

    async def active_ids(self) -> list[str]:
        return sorted(await self.redis.smembers(ACTIVE_KEY))

    async def active_count(self, tenant: str) -> int:
        pipe = self.redis.pipeline(transaction=False)
        for s in STATUSES:
            if s not in TERMINAL:
                pipe.zcard(tenant_status_key(tenant, s))
        return sum(await pipe.execute())

    async def status_counts(self) -> dict[str, int]:
        raw = await self.redis.hgetall(COUNTS_KEY)
        return {s: int(raw.get(s, 0)) for s in STATUSES}

    # --- idempotency ---------------------------------------------------------------------------

    async def claim_idempotency_key(self, tenant: str, key: str, body_hash: str, job_id: str) -> dict | None:
        """Claim `key` for a new job. Returns None if claimed, else the earlier {job_id, body_hash}."""
        value = json.dumps({"job_id": job_id, "body_hash": body_hash})
        if await self.redis.set(_idem_key(tenant, key), value, nx=True, ex=IDEMPOTENCY_TTL_S):
            return None
        earlier = await self.redis.get(_idem_key(tenant, key))
        return json.loads(earlier) if earlier else {"job_id": None, "body_hash": None}

    async def release_idempotency_key(self, tenant: str, key: str) -> None:
        await self.redis.delete(_idem_key(tenant, key))

    # --- events and metrics --------------------------------------------------------------------

    async def history(self, job_id: str, kind: str, after: str | None, limit: int) -> tuple[list[tuple[str, dict]], bool]:
        """Oldest first, from just after the entry id `after`."""
        key = events_key(job_id) if kind == "events" else metrics_key(job_id)
        start = f"({after}" if after else "-"
        entries = await self.redis.xrange(key, min=start, max="+", count=limit + 1)
        return [(eid, json.loads(f["data"])) for eid, f in entries[:limit]], len(entries) > limit

    async def follow(self, job_id: str, kind: str, after: str, block_ms: int | None) -> list[tuple[str, dict]]:
        """Entries after `after` ("0" for all), waiting up to block_ms for the first (None: no wait)."""
        key = events_key(job_id) if kind == "events" else metrics_key(job_id)
        # BLOCK 0 would wait forever; every wait here is bounded.
        got = await self.redis.xread({key: after}, count=500, block=max(1, block_ms) if block_ms is not None else None)
        if not got:
            return []
        return [(eid, json.loads(f["data"])) for eid, f in got[0][1]]
