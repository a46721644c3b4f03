"""Job records, events and metrics in Redis (the layout is in orchestrator/core/records.py,
shared with the driver's reporter)."""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from typing import Any

import redis.asyncio as aioredis

from orchestrator.core.records import (
    ACTIVE_KEY,
    COUNTS_KEY,
    ENDING_KEY,
    PREFIX,
    SETTLE_LUA,
    STATUSES,
    TERMINAL,
    TRANSITION_LUA,
    control_key,
    effective_status,
    event_record,
    events_key,
    job_key,
    metrics_key,
    tenant_jobs_key,
    tenant_status_key,
    transition_args,
)

SEQ_KEY = f"{PREFIX}jobs:seq"
JOB_USER_PREFIX = "rlhf."  # + the job id: the Redis ACL user of one job
# All a job's reporter sends (orchestrator/reporting/redis_reporter.py): no scripts (a script's loop would hold
# Redis from every tenant), nothing that lists or counts the keyspace.
JOB_USER_COMMANDS = ("auth", "hello", "ping", "select", "reset", "multi", "exec", "discard", "watch", "unwatch",
                     "hget", "hmget", "hset", "xadd", "xrange", "xdel")
ACL_HASH_FIELD = "acl_sha256"  # in the control hash: how the job user is recreated after Redis lost it
FILE_SEQ_KEY = f"{PREFIX}files:seq"
IDEMPOTENCY_TTL_S = 24 * 3600
ADMISSION_LOCK_KEY = f"{PREFIX}lock:admission"  # held by the one API process that runs an admission round
CLAIM_S = 120  # how long a claim on a Ray submission holds: past any submit (RayLauncher.TIMEOUT_S and the launch file)
_JSON_FIELDS = ("metrics", "error", "metadata", "spec", "checkpoints", "launch_spec", "demand", "queue")
_FLOAT_FIELDS = ("created_at", "started_at", "finished_at", "updated_at", "admitted_at", "resubmitted_at")
_INT_FIELDS = ("step", "total_steps", "seq", "priority", "restarts")
# Fields a job's processes write, in the job hash (the control plane's copy of id and tenant is there
# for reading only); everything else the record has lives in the control hash, out of the job's reach.
_JOB_WRITES = ("status", "step", "total_steps", "metrics", "error", "checkpoints", "started_at", "finished_at",
               "updated_at", "restarts", "reporter_mark")


def _idem_key(tenant: str, key: str) -> str:
    return f"{PREFIX}idem:{tenant}:{hashlib.sha256(key.encode()).hexdigest()}"


# KEYS: the tenant's queued set, its jobs index, then every active-status set; ARGV: limit, seq, job id.
RESERVE_LUA = """
local n = 0
for i = 3, #KEYS do n = n + redis.call('ZCARD', KEYS[i]) end
if n >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
return 1
"""


def _claim_key(submission_id: str) -> str:
    return f"{PREFIX}claim:submission:{submission_id}"


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def file_key(file_id: str) -> str:
    return f"{PREFIX}file:{file_id}"


def tenant_files_key(tenant: str, purpose: str | None = None) -> str:
    """The tenant's files by upload order: all of them, or those of one purpose."""
    return f"{PREFIX}tenant:{tenant}:files" + (f":{purpose}" if purpose else "")


def decode_file(raw: dict[str, str]) -> dict[str, Any]:
    return {**raw, "bytes": int(raw["bytes"]), "rows": int(raw["rows"]), "created_at": float(raw["created_at"]), "seq": int(raw["seq"])}


def decode(raw: dict[str, str]) -> dict[str, Any]:
    """Typed fields; one that does not parse (a job's processes may write anything into the job hash)
    reads as unset, so one job's garbage fails no reader of the records (the reconciler's round)."""
    rec: dict[str, Any] = dict(raw)
    for fields, parse in ((_JSON_FIELDS, json.loads), (_FLOAT_FIELDS, float), (_INT_FIELDS, int)):
        for f in fields:
            try:
                rec[f] = parse(raw[f]) if raw.get(f) else None
            except (ValueError, TypeError, RecursionError):
                rec[f] = None
    return rec


def merge(job: dict[str, str], control: dict[str, str]) -> dict[str, Any] | None:
    """One record from the job hash (what the job reports) and the control hash (what only the control
    plane writes, and wins): None without a control hash (a driver's writes alone are no record). The
    status is effective_status's; restarts the larger count (the driver's own, the control plane's resubmissions)."""
    if not control:
        return None
    reported = {k: v for k, v in job.items() if k in _JOB_WRITES}
    rec = {**reported, **{k: v for k, v in control.items() if k != ACL_HASH_FIELD}}
    rec["status"] = effective_status(job.get("status"), control.get("status")) or "queued"
    rec["restarts"] = str(max(_int(job.get("restarts")), _int(control.get("restarts"))))
    return decode(rec)


def _int(text: str | None) -> int:
    try:
        return int(text or 0)
    except ValueError:
        return 0


class JobStore:
    def __init__(self, url: str, max_connections: int = 512, pool_timeout_s: float = 10.0):
        # A blocking pool: past `max_connections` a command waits up to `pool_timeout_s` for a free
        # connection; the default pool fails it at once ("Too many connections"), whoever's burst took them.
        pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=pool_timeout_s, decode_responses=True,
                                                        socket_connect_timeout=5, health_check_interval=30)
        self.redis = aioredis.Redis.from_pool(pool)
        self._transition = self.redis.register_script(TRANSITION_LUA)
        self._settle = self.redis.register_script(SETTLE_LUA)
        self._reserve = self.redis.register_script(RESERVE_LUA)

    async def close(self) -> None:
        await self.redis.aclose()

    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    # --- records -------------------------------------------------------------------------------

    async def create(self, job_id: str, tenant: str, name: str, spec: dict, metadata: dict, idempotency_key: str | None,
                     max_active: int | None = None, **extra: Any) -> dict | None:
        """Record a new `queued` job; None when the tenant already has `max_active` active jobs. The
        count and the reservation are one Lua script, so concurrent submissions cannot pass the limit."""
        now = time.time()
        seq = await self.redis.incr(SEQ_KEY)
        active = [tenant_status_key(tenant, s) for s in STATUSES if s not in TERMINAL]
        if not await self._reserve(keys=[tenant_status_key(tenant, "queued"), tenant_jobs_key(tenant), *active],
                                   args=[max_active or 2**62, seq, job_id]):
            return None
        control = {
            "id": job_id, "tenant": tenant, "name": name, "status": "queued", "seq": seq, "created_at": repr(now),
            "spec": json.dumps(spec), "metadata": json.dumps(metadata), "ray_submission_id": job_id,
        }
        if idempotency_key:
            control["idempotency_key"] = idempotency_key
        for key, value in extra.items():  # launch_spec, demand (JSON), priority
            control[key] = json.dumps(value) if key in _JSON_FIELDS else value
        job = {"id": job_id, "tenant": tenant, "status": "queued", "updated_at": repr(now), "step": 0}
        event = event_record("status", "queued", {"status": "queued"}, now)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(control_key(job_id), mapping=control)
        pipe.hset(job_key(job_id), mapping=job)
        pipe.hincrby(COUNTS_KEY, "queued", 1)
        pipe.sadd(ACTIVE_KEY, job_id)
        pipe.xadd(events_key(job_id), {"data": json.dumps(event)})
        await pipe.execute()
        return merge({k: str(v) for k, v in job.items()}, {k: str(v) for k, v in control.items()})

    async def rebuild(self, job_id: str, tenant: str, name: str, launch_spec: dict, submission_id: str, restarts: int,
                      started_at: float | None, note: str, demand: list | None = None) -> bool:
        """Record again a job that runs in Ray but whose record Redis lost (data loss, a flushed
        database): `running`, from what its Ray submission carries. False if a record exists (another
        API process rebuilt it first). Its earlier events and metrics are gone; `note` says so."""
        if not await self.redis.hsetnx(control_key(job_id), "id", job_id):
            return False
        now = time.time()
        seq = await self.redis.incr(SEQ_KEY)
        control = {
            "tenant": tenant, "name": name, "status": "running", "seq": seq, "created_at": repr(started_at or now),
            "admitted_at": repr(started_at or now), "spec": json.dumps(launch_spec), "launch_spec": json.dumps(launch_spec),
            "metadata": json.dumps({}), "ray_submission_id": submission_id, "restarts": restarts, "demand": json.dumps(demand or []),
        }
        job = {"id": job_id, "tenant": tenant, "status": "running", "started_at": repr(started_at or now), "updated_at": repr(now)}
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(control_key(job_id), mapping=control)
        pipe.hset(job_key(job_id), mapping=job)
        pipe.zadd(tenant_jobs_key(tenant), {job_id: seq})
        pipe.zadd(tenant_status_key(tenant, "running"), {job_id: seq})
        pipe.hincrby(COUNTS_KEY, "running", 1)
        pipe.sadd(ACTIVE_KEY, job_id)
        pipe.xadd(events_key(job_id), {"data": json.dumps(event_record("recovered", note, {"ray_submission_id": submission_id}, now))})
        await pipe.execute()
        return True

    async def restore_job_user(self, job_id: str, password: str) -> None:
        """Create the job's Redis user again with the password its processes hold (after Redis lost it)."""
        await self.redis.hset(control_key(job_id), ACL_HASH_FIELD, _sha256(password))
        await self._set_job_user(job_id, _sha256(password))

    async def delete(self, job_id: str) -> None:
        """Remove a job that never reached Ray (its launch failed), as if it had not been created."""
        raw = await self.redis.hgetall(control_key(job_id))
        if not raw:
            return
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(job_key(job_id), events_key(job_id), metrics_key(job_id), control_key(job_id))
        pipe.zrem(tenant_jobs_key(raw["tenant"]), job_id)
        pipe.zrem(tenant_status_key(raw["tenant"], raw["status"]), job_id)
        pipe.hincrby(COUNTS_KEY, raw["status"], -1)
        pipe.srem(ACTIVE_KEY, job_id)
        await pipe.execute()
        await self.redis.execute_command("ACL", "DELUSER", JOB_USER_PREFIX + job_id)
        await self._save_acl()

    async def add_event(self, job_id: str, type: str, message: str, **data: Any) -> None:
        """An event the API itself reports (admission); statuses go through `transition`."""
        await self.redis.xadd(events_key(job_id), {"data": json.dumps(event_record(type, message, data, time.time()))})

    async def set_fields(self, job_id: str, **fields: Any) -> None:
        """Fields of a job the status script does not own (admission: admitted_at, queue), in its control hash."""
        mapping = {k: json.dumps(v) if k in _JSON_FIELDS else repr(v) if isinstance(v, float) else v for k, v in fields.items() if v is not None}
        gone = [k for k, v in fields.items() if v is None]
        pipe = self.redis.pipeline(transaction=True)
        if mapping:
            pipe.hset(control_key(job_id), mapping=mapping)
        if gone:
            pipe.hdel(control_key(job_id), *gone)
        await pipe.execute()

    async def get(self, job_id: str, tenant: str | None = None) -> dict | None:
        """The record, or None if there is none or it belongs to another tenant. A status the job
        reported that the shared indexes do not show yet is brought into them (`settle`)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(job_key(job_id))
        pipe.hgetall(control_key(job_id))
        job, control = await pipe.execute()
        control = control or await self._adopt_legacy(job_id, job)
        rec = merge(job, control)
        if rec is None or (tenant is not None and rec.get("tenant") != tenant):
            return None
        if rec["status"] != control.get("status"):
            await self.settle(job_id)
        return rec

    async def _adopt_legacy(self, job_id: str, job: dict[str, str]) -> dict[str, str]:
        """The control hash of a record written before there was one (everything in the job hash), made
        once from it, where the tenant's own index lists the job (no job user could write that index);
        the job's Redis user, if it has one, narrowed to its three keys with the password it has."""
        tenant = job.get("tenant")
        if not tenant or await self.redis.zscore(tenant_jobs_key(tenant), job_id) is None:
            return {}
        control = {k: v for k, v in job.items() if k not in _JOB_WRITES or k == "restarts"}
        control["status"] = job.get("status") if job.get("status") in STATUSES else "queued"  # (the old script kept the indexes at it)
        try:
            user = await self.redis.execute_command("ACL", "GETUSER", JOB_USER_PREFIX + job_id)
        except aioredis.ResponseError:
            user = None
        user = dict(zip(user[::2], user[1::2])) if isinstance(user, list) else user  # (redis-py parses it into a dict, or not)
        passwords = (user or {}).get("passwords")
        if passwords:
            control[ACL_HASH_FIELD] = passwords[0]
        await self.redis.hset(control_key(job_id), mapping=control)
        if passwords:
            await self._set_job_user(job_id, passwords[0])
        return control

    async def settle(self, job_id: str) -> str | None:
        """Move the job in the shared indexes (tenant status sets, counters, active set) to the status it
        reported, by effective_status's rule: what a job cannot write itself. The status now."""
        return await self._settle(keys=[job_key(job_id), events_key(job_id), control_key(job_id)], args=[PREFIX, job_id])

    async def list(self, tenant: str, limit: int, after: str | None = None, status: str | None = None) -> tuple[list[dict], bool] | None:
        """Newest first. None when `after` is not one of this tenant's jobs."""
        index = tenant_status_key(tenant, status) if status else tenant_jobs_key(tenant)
        top = await self._cursor(tenant_jobs_key(tenant), after)
        if top is None:
            return None
        ids = await self.redis.zrevrangebyscore(index, top, "-inf", start=0, num=limit + 1)
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids[:limit]:
            pipe.hgetall(job_key(job_id))
            pipe.hgetall(control_key(job_id))
        raws = await pipe.execute()
        recs = [merge(job, control or await self._adopt_legacy(job_id, job)) for job_id, job, control in zip(ids, raws[::2], raws[1::2])]
        return [r for r in recs if r is not None], len(ids) > limit

    async def _cursor(self, index: str, after: str | None) -> str | None:
        """The ZREVRANGEBYSCORE bound just below `after` in a tenant's index (None: not in it)."""
        if not after:
            return "+inf"
        score = await self.redis.zscore(index, after)
        return None if score is None else f"({int(score)}"

    async def transition(self, job_id: str, status: str, message: str = "", **data: Any) -> tuple[bool, str]:
        keys, args = transition_args(job_id, status, message, data, time.time())
        applied, now_status, _ = await self._transition(keys=keys, args=args)
        return bool(applied), now_status

    async def active_ids(self) -> list[str]:
        return sorted(await self.redis.smembers(ACTIVE_KEY))

    async def ending(self) -> dict[str, float]:
        """Job id -> when the control plane saw it: the jobs whose own processes reported them ended
        and whose Ray jobs have not been seen ended yet."""
        return dict(await self.redis.zrange(ENDING_KEY, 0, -1, withscores=True))

    async def ended(self, job_id: str) -> None:
        await self.redis.zrem(ENDING_KEY, job_id)

    async def active_count(self, tenant: str) -> int:
        pipe = self.redis.pipeline(transaction=False)
        for s in STATUSES:
            if s not in TERMINAL:
                pipe.zcard(tenant_status_key(tenant, s))
        return sum(await pipe.execute())

    async def status_counts(self) -> dict[str, int]:
        raw = await self.redis.hgetall(COUNTS_KEY)
        return {s: int(raw.get(s, 0)) for s in STATUSES}

    # --- one API process at a time --------------------------------------------------------------

    def admission_lock(self):
        """Held around an admission round: with several API processes on one Redis, one decides at a
        time from what the others admitted (two rounds on the same snapshot would both fill the same
        room). Not blocking: `await lock.acquire()` is False while another process holds it."""
        return self.redis.lock(ADMISSION_LOCK_KEY, timeout=CLAIM_S, blocking=False)

    async def claim_submission(self, submission_id: str) -> bool:
        """Whether this process may submit `submission_id` to Ray now: the first to ask in CLAIM_S does.
        A second submitter would give the job's Redis user a new password and rewrite the launch file
        under the process that the first one started (its reports then fail to authenticate)."""
        return bool(await self.redis.set(_claim_key(submission_id), secrets.token_hex(8), nx=True, ex=CLAIM_S))


    # --- a job's own Redis user -------------------------------------------------------------------

    async def job_user(self, job_id: str) -> tuple[str, str]:
        """(user, password) of a Redis ACL user that reaches this job's record, events and metrics and
        nothing else (JOB_USER_COMMANDS on those three keys): what the job's processes (driver, actors,
        reward code) hold. The control hash keeps the password's SHA-256, to recreate the user."""
        password = secrets.token_hex(24)
        await self.redis.hset(control_key(job_id), ACL_HASH_FIELD, _sha256(password))
        user, _ = await self._set_job_user(job_id, _sha256(password))
        return user, password

    async def _set_job_user(self, job_id: str, sha256: str) -> tuple[str, str]:
        user = JOB_USER_PREFIX + job_id
        keys = [job_key(job_id), events_key(job_id), metrics_key(job_id)]
        await self.redis.execute_command(
            "ACL", "SETUSER", user, "reset", "on", f"#{sha256}", *(f"~{_glob_escape(k)}" for k in keys), "resetchannels",
            "-@all", *(f"+{c}" for c in JOB_USER_COMMANDS),
        )
        await self._save_acl()
        return user, sha256

    _acl_file: bool | None = None  # whether Redis has an ACL file (None: not asked yet)

    async def _save_acl(self) -> None:
        """Write the users into Redis's ACL file where it has one (the deploy manifests give it one), so
        that a restarted Redis has them at once; without one the reconciler recreates them (restore_job_users)."""
        if self._acl_file is False:
            return
        try:
            await self.redis.execute_command("ACL", "SAVE")
            self._acl_file = True
        except aioredis.ResponseError as err:
            if "ACL file" not in str(err):
                raise
            self._acl_file = False

    async def restore_job_users(self, ids: list[str]) -> list[str]:
        """Recreate the Redis users that the active jobs among `ids` hold but Redis has lost (ACL users
        are not in the AOF: a restarted Redis keeps the records and forgets the users), with their
        passwords' hashes: the jobs' reports flow again. The ids of the users recreated."""
        users = set(await self.redis.execute_command("ACL", "USERS"))
        missing = [i for i in ids if JOB_USER_PREFIX + i not in users]
        pipe = self.redis.pipeline(transaction=False)
        for job_id in missing:
            pipe.hmget(control_key(job_id), ACL_HASH_FIELD, "status")
        restored = []
        for job_id, (sha256, status) in zip(missing, await pipe.execute()):
            if sha256 and status not in TERMINAL:  # (a job waiting for admission has no user yet)
                await self._set_job_user(job_id, sha256)
                now = await self.redis.hget(control_key(job_id), ACL_HASH_FIELD)
                if now and now != sha256:  # resubmitted meanwhile, with a new password: that one holds
                    await self._set_job_user(job_id, now)
                restored.append(job_id)
        return restored

    async def drop_job_users(self, keep) -> int:
        """Delete the ACL users of jobs for which `await keep(job_id)` is false; how many went."""
        users = [u for u in await self.redis.execute_command("ACL", "USERS") if u.startswith(JOB_USER_PREFIX)]
        gone = [u for u in users if not await keep(u[len(JOB_USER_PREFIX):])]
        if gone:
            await self.redis.execute_command("ACL", "DELUSER", *gone)
            await self._save_acl()
        return len(gone)

    # --- files ----------------------------------------------------------------------------------

    async def create_file(self, file_id: str, tenant: str, fields: dict[str, Any]) -> dict:
        seq = await self.redis.incr(FILE_SEQ_KEY)
        raw = {k: str(v) for k, v in {**fields, "id": file_id, "tenant": tenant, "seq": seq}.items()}
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(file_key(file_id), mapping=raw)
        pipe.zadd(tenant_files_key(tenant), {file_id: seq})
        pipe.zadd(tenant_files_key(tenant, fields["purpose"]), {file_id: seq})
        await pipe.execute()
        return decode_file(raw)

    async def get_file(self, file_id: str, tenant: str) -> dict | None:
        """The tenant's file record, or None (another tenant's file is indistinguishable from none)."""
        raw = await self.redis.hgetall(file_key(file_id))
        return decode_file(raw) if raw and raw.get("tenant") == tenant else None

    async def list_files(self, tenant: str, limit: int, after: str | None, purpose: str | None) -> tuple[list[dict], bool] | None:
        """Newest first; None when `after` is not one of this tenant's files."""
        top = await self._cursor(tenant_files_key(tenant), after)
        if top is None:
            return None
        ids = await self.redis.zrevrangebyscore(tenant_files_key(tenant, purpose), top, "-inf", start=0, num=limit + 1)
        pipe = self.redis.pipeline(transaction=False)
        for file_id in ids[:limit]:
            pipe.hgetall(file_key(file_id))
        raws = await pipe.execute()
        return [decode_file(r) for r in raws if r], len(ids) > limit

    async def delete_file(self, file_id: str, tenant: str) -> dict | None:
        rec = await self.get_file(file_id, tenant)
        if rec is None:
            return None
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(file_key(file_id))
        pipe.zrem(tenant_files_key(tenant), file_id)
        pipe.zrem(tenant_files_key(tenant, rec["purpose"]), file_id)
        await pipe.execute()
        return rec

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
