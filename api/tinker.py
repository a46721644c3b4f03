"""The Tinker-compatible API's backend: records in Redis, the adapter pools on Ray, futures, the wire codecs.

The control plane never loads torch: the pools (workers/tinker_pool.py) run as named, detached Ray
actors, one per registered base model, started by import path from a Ray task and found by name
(the layering rule keeps api/ from importing workers/). The API process joins the Ray cluster as a
driver (`RLHF_API_TINKER_RAY_ADDRESS`, the GCS address) at the first Tinker request.

A call runs in the API process it was sent to, and any process answers its future (the record is in Redis). Calls on
one training run run in the order of their `seq_id` (the SDK numbers them and expects them run in turn) whichever
processes a load balancer sent them to; calls of different tenants meet in the pool's fair scheduler.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import importlib.util
import json
import logging
import re
import time
import uuid
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from redis import exceptions as aioredis_errors
from pydantic_settings import BaseSettings, SettingsConfigDict

from api.launcher import import_ray
from api.tinker_storage import TenantLocks

log = logging.getLogger("api.tinker")
NAMESPACE = "rlhf-tinker"
# The losses the pools compute (workers/tinker_pool.py LOSSES; tests/api/test_tinker_limits.py checks they agree):
# the API refuses any other before a call reaches a pool.
LOSSES = ("cross_entropy", "importance_sampling", "ppo")
POOL_FACTORY = "workers.tinker_pool:start_pool"
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# Our ids (`tm-<hex>`, ...), the SDK's own for a run made from a checkpoint: `<session_id>:train:<seq>`, and a sampling
# session's, `<session_id>:sample:<hex>` (its record lives in its session's hash, and expires with it).
_ID = re.compile(r"^[a-z]+-[0-9a-f]{16,32}(:train:[0-9]{1,9}|:sample:[0-9a-f]{12})?$")


class TinkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RLHF_API_TINKER_", frozen=True)

    ray_address: str = ""
    """The Ray cluster's GCS address (host:port) the API joins to reach the adapter pools; empty: `auto`."""
    pool_cpus: float = 1.0
    """CPUs each base model's adapter pool holds (and its torch threads)."""
    pool_gpus: int = Field(0, ge=0, le=1)
    """GPUs each pool holds (0: none, it trains and samples on its CPUs; 1: its base model, adapters and vLLM engine on one
    GPU; a share of one is refused: the engine takes half of the GPU it is given). Counted by the jobs' admission queue
    as taken, as its CPUs are."""
    sampler: Literal["hf", "vllm"] = "hf"
    """What the pools sample with: `hf` (transformers' generate, the saved adapter made the active one) or `vllm` (one vLLM
    engine per pool with multi-LoRA: each saved sampler weights is an adapter of the engine, up to 8 loaded at once, and
    several tenants' requests batch in it; vLLM installed beside the pool; an adapter on the unembedding samples on hf)."""
    wait_s: float = 20.0
    """How long one retrieve_future waits for a result before answering try_again (the SDK waits 45 s)."""
    max_rank: int = 64
    """The largest LoRA rank a tenant may ask for."""
    max_runs_per_tenant: int = 8
    """Training runs (LoRA adapters on the pools) a tenant may hold at once; past it, create_model fails naming the limit."""
    calls_per_tenant: int = 4
    """A tenant's calls in flight to one pool at once (more wait in the API): the pool's fair scheduler then sees every
    tenant's next calls, instead of one tenant's backlog filling the actor's threads ahead of the others."""
    session_timeout_s: float = 300.0
    """A session that has not sent a heartbeat for this long is over: its record expires from Redis (a TTL each heartbeat
    renews) and its training runs are released (the SDK beats every 10 s)."""
    sweep_s: float = 30.0
    """How often the API looks for ended sessions of every tenant (in the background, and at a heartbeat or create_model)."""
    max_checkpoints_per_tenant: int = 256
    """Checkpoints (saved states and sampler weights, over all runs) a tenant may keep; past it the oldest unnamed sampler
    weights are evicted, else a save fails naming the limit."""
    max_checkpoint_bytes_per_tenant: int = 20 * 2**30
    """Bytes of checkpoints a tenant may keep (a save starts only below it); past it, as for the count."""
    max_sequence_tokens: int = 4096
    """The longest sequence a tenant may send: a forward_backward datum's tokens, a sample's prompt plus its max_tokens."""
    max_sample_tokens: int = 2048
    """The largest max_tokens of one sample call."""
    max_num_samples: int = 64
    """The largest num_samples of one sample call."""
    max_futures_per_tenant: int = 512
    """A tenant's futures not yet finished, at once; past it a call is refused 429 (the SDK retries) until some finish.
    Finished ones are kept for retrieval, the tenant's most recent `max_futures_per_tenant` of them."""


class TinkerError(Exception):
    """A refusal of the Tinker API; status 0 means: report it as a failed future (the SDK's error shape)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def check_name(name: str, what: str) -> str:
    if not _NAME.match(name) or name in (".", ".."):
        raise TinkerError(400, f"{what} {name!r} must be 1-64 of A-Z a-z 0-9 _ . -")
    return name


def pb():
    """The SDK's generated protobuf module, loaded from its file: importing the `tinker` package would load torch."""
    mod = getattr(pb, "_mod", None)
    if mod is None:
        spec = importlib.util.find_spec("tinker")
        if spec is None or not spec.submodule_search_locations:
            raise TinkerError(501, "the Tinker API needs the `tinker` package installed on the API server (pip install tinker)")
        path = Path(next(iter(spec.submodule_search_locations))) / "proto" / "tinker_public_pb2.py"
        loader = importlib.util.spec_from_file_location("_tinker_public_pb2", path)
        mod = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(mod)
        pb._mod = mod
    return mod


# -- the wire: protobuf requests and responses -------------------------------------------------------

def _dtype_codes():
    m = pb()
    return {m.DTYPE_FLOAT32: "<f4", m.DTYPE_INT64: "<i8", m.DTYPE_INT32: "<i4"}


def decode_forward_backward(body: bytes) -> dict[str, Any]:
    """The SDK's ForwardBackwardRequest (protobuf) as {model_id, seq_id, loss_fn, config, forward_only, data}."""
    import numpy as np
    from google.protobuf.message import DecodeError

    msg = pb().ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except DecodeError as err:
        raise TinkerError(400, f"the forward_backward body is not a ForwardBackwardRequest ({err})") from None
    codes = _dtype_codes()
    data = []
    for d in msg.data:
        tokens: list[int] = []
        for chunk in d.model_input:
            if chunk.WhichOneof("chunk") != "encoded_text":
                raise TinkerError(0, f"model_input chunks of kind {chunk.WhichOneof('chunk')!r} are not supported (text tokens only)")
            raw = chunk.encoded_text.tokens
            if len(raw) % 4:
                raise TinkerError(400, "model_input tokens are not int32")
            tokens += np.frombuffer(raw, dtype="<i4").tolist()
        inputs = {}
        for name, t in d.loss_fn_inputs.items():
            if t.HasField("sparse_csr"):
                raise TinkerError(0, f"sparse loss_fn_inputs[{name!r}] are not supported")
            if t.dtype not in codes or len(t.dense) % np.dtype(codes[t.dtype]).itemsize:
                raise TinkerError(400, f"loss_fn_inputs[{name!r}] is not a dense float32, int32 or int64 array")
            inputs[name] = np.frombuffer(t.dense, dtype=codes[t.dtype]).tolist()
        data.append({"tokens": tokens, "inputs": inputs})
    config = {k: (v.text if v.WhichOneof("value") == "text" else v.number) for k, v in msg.loss_fn_config_v2.items()}
    config = config or dict(msg.loss_fn_config)
    return {"model_id": msg.model_id, "seq_id": msg.seq_id or None, "loss_fn": msg.loss_fn, "config": config,
            "forward_only": msg.forward_only, "data": data}


def encode_forward_backward(logprobs: list, metrics: dict[str, float]) -> bytes:
    """ForwardBackwardOutput: one ArrayRecord with each datum's `logprobs` (float32), as the SDK decodes it."""
    import numpy as np

    m = pb()
    out = m.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord")
    for k, v in metrics.items():
        out.metrics[k] = float(v)
    record = out.loss_fn_outputs.add()
    record.num_datums = len(logprobs)
    arrays = [np.asarray(a, dtype="<f4") for a in logprobs]
    offsets = np.cumsum([0] + [a.nbytes for a in arrays]).astype("<i8")
    field = record.fields["logprobs"]
    field.data = b"".join(a.tobytes() for a in arrays)
    field.offsets = offsets.tobytes()
    field.dtype = m.DTYPE_FLOAT32
    return out.SerializeToString()


def encode_sample(sequences: list[dict]) -> bytes:
    import numpy as np

    m = pb()
    out = m.SampleResponse()
    for s in sequences:
        seq = out.sequences.add()
        seq.stop_reason = m.STOP_REASON_STOP if s["stop"] else m.STOP_REASON_LENGTH
        seq.tokens = np.asarray(s["tokens"], dtype="<i4").tobytes()
        seq.logprobs = np.asarray(s["logprobs"], dtype="<f4").tobytes()
    return out.SerializeToString()


# -- futures -------------------------------------------------------------------------------------------

class Futures:
    """The calls' futures. This API process runs the calls it was sent (request_id -> (tenant, task)); every future also
    has a record in Redis (`tinker:future:<id>`: its tenant, the process that runs it, and once done its answer), so any
    API process behind the same Redis answers retrieve_future for it. A process beats (`tinker:api:<process>`, every
    OWNER_TTL_S / 3); a future still pending when its process stopped beating fails, naming that. A tenant's unfinished
    futures are counted in Redis too (`tinker:inflight:<tenant>`), across processes."""

    KEEP_S = 3600.0  # a finished future's answer, in this process
    ANSWER_KEEP_S = 600.0  # and in Redis, for the other processes (the SDK retrieves at once)
    OWNER_TTL_S = 30.0
    POLL_S = 0.2
    # Take a place among a tenant's unfinished futures if fewer than the limit are held: the count and the write as one.
    HOLD = """if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3]) return 1"""

    def __init__(self, redis, per_tenant: int = 512):
        self.redis, self.per_tenant = redis, per_tenant
        self.process = new_id("api")
        self._tasks: dict[str, tuple[str, asyncio.Task, float]] = {}
        self._chains: dict[str, asyncio.Task] = {}
        self._beating: asyncio.Task | None = None
        self._unleft: set[tuple[str, str]] = set()  # (chain, request id) of finished calls whose place Redis did not take back

    async def submit(self, tenant: str, chain: str | None, make, limited: bool = True, seq: int | None = None) -> str:
        """Start `make()` (a coroutine factory) after the previous call of the same chain (a training run) in this
        process and, with the SDK's `seq` (its seq_id), after every call of the chain with a lower one that any API
        process holds (a load balancer may send a client's consecutive calls to different processes); 429 when the
        tenant has `per_tenant` futures unfinished (`limited`: the server's own calls, such as dropping a run, are not
        counted). The future's record, and its place in the chain's order, are in Redis before its id is returned."""
        self._forget_old()
        await self._beat_once()
        request_id = new_id("req")
        if limited and not await self._hold(tenant, request_id):
            raise TinkerError(429, f"you have {self.per_tenant} calls unfinished, the limit (RLHF_API_TINKER_MAX_FUTURES_PER_TENANT "
                              f"= {self.per_tenant}); retrieve their results first")
        ordered = chain is not None and seq is not None
        try:
            await self.redis.set(f"tinker:future:{request_id}", json.dumps({"tenant": tenant, "process": self.process}),
                                 px=int(self.KEEP_S * 1000))
            if ordered:
                await self._take_place(chain, seq, request_id)
        except BaseException:
            with contextlib.suppress(Exception):  # (Redis away: the place lapses by its own rules)
                if limited:
                    await self.redis.hdel(f"tinker:inflight:{tenant}", request_id)
                await self.redis.delete(f"tinker:future:{request_id}")
                if ordered:
                    await self.redis.hdel(f"tinker:order:{chain}", request_id)
            raise
        mine = [rid for rid, (owner, task, _) in self._tasks.items() if owner == tenant and task.done()]
        for rid in mine[:max(0, len(mine) - self.per_tenant + 1)]:  # the oldest finished (dicts keep insertion order)
            del self._tasks[rid]
        before = self._chains.get(chain) if chain else None

        async def run():
            if before is not None:
                await asyncio.wait([before])
            try:
                try:
                    if ordered:
                        await self._wait_turn(chain, seq, request_id)
                    result = await make()
                except Exception as err:  # noqa: BLE001 - the call's failure is its answer
                    result = _Failed(self._failure(tenant, request_id, err))
                await self._record(request_id, tenant, result, limited)
            finally:  # (cancelled too: a place left behind would hold the run's later calls in other processes)
                if ordered:
                    await self._leave(chain, request_id)
            return result

        task = asyncio.ensure_future(run())
        if chain:
            self._chains[chain] = task
        self._tasks[request_id] = (tenant, task, time.monotonic())
        return request_id

    async def fail(self, tenant: str, chain: str | None, message: str, seq: int | None = None) -> str:
        """A future that fails with `message` (the SDK raises RequestFailedError naming it), in its chain's order."""

        async def refuse():
            raise TinkerError(0, message)

        return await self.submit(tenant, chain, refuse, seq=seq)

    # A chain's calls in flight over every process: `tinker:order:<chain>` maps request id -> "<seq> <ticket> <process>",
    # the ticket the order in which they arrived, over every process (one INCR).
    ORDER_KEEP_S = 24 * 3600.0
    TURN_POLL_S = (0.02, 0.2)  # the first wait for an earlier call, and the longest (it doubles meanwhile)
    TURN_DEADLINE_S = 1800.0  # the longest a call waits for its turn; past it the call fails naming the wait
    REDIS_AWAY_S = 60.0  # how long a call waiting for its turn rides out Redis being unreachable before it fails

    async def _take_place(self, chain: str, seq: int, request_id: str) -> None:
        key = f"tinker:order:{chain}"
        ticket = await self.redis.incr("tinker:order:tickets")
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(key, request_id, f"{seq} {ticket} {self.process}")
        pipe.pexpire(key, int(self.ORDER_KEEP_S * 1000))
        await pipe.execute()

    async def _wait_turn(self, chain: str, seq: int, request_id: str) -> None:
        """Until no call of the chain that arrived before this one with a lower seq is unfinished in a live process.
        (The SDK sends a call only once the one before it was accepted, so every earlier call is in the order already.
        Waiting only on earlier arrivals, no two calls can wait on each other, whatever a client's retries send where;
        a call whose process stopped beating, or whose answer is recorded, is not waited on.)"""
        key = f"tinker:order:{chain}"
        pause, away_since, deadline = self.TURN_POLL_S[0], None, time.monotonic() + self.TURN_DEADLINE_S
        while True:
            if time.monotonic() > deadline:
                raise TinkerError(0, f"call seq_id {seq} of {chain} waited {self.TURN_DEADLINE_S:.0f} s for its run's earlier calls "
                                  "(in other API processes) to finish; send it again")
            try:
                if await self._turn_is_free(key, seq, request_id):
                    return
                away_since = None
            except (aioredis_errors.ConnectionError, aioredis_errors.TimeoutError):
                away_since = away_since or time.monotonic()
                if time.monotonic() - away_since > self.REDIS_AWAY_S:
                    raise
            await asyncio.sleep(pause)
            pause = min(2 * pause, self.TURN_POLL_S[1])

    async def _turn_is_free(self, key: str, seq: int, request_id: str) -> bool:
        held = {_text(rid): _text(v).split() for rid, v in (await self.redis.hgetall(key)).items()}
        mine = held.get(request_id)
        if mine is None:  # (dropped as finished by another process's look, which cannot be: it is not answered yet)
            return True
        # This process's earlier arrivals ran before this call (its chain's order): only other processes' are waited on.
        earlier = {rid: process for rid, (s, ticket, process) in held.items()
                   if int(s) < seq and int(ticket) < int(mine[1]) and process != self.process}
        if not earlier:
            return True
        alive = {p: bool(await self.redis.exists(f"tinker:api:{p}")) for p in set(earlier.values())}
        done = []
        for rid, process in earlier.items():
            record = await self.redis.get(f"tinker:future:{rid}")
            if not alive[process] or record is None or "answer" in json.loads(record):  # (its own _leave was lost)
                done.append(rid)
        if done:
            await self.redis.hdel(key, *done)
        return len(done) == len(earlier)

    async def _leave(self, chain: str, request_id: str) -> None:
        try:
            await self.redis.hdel(f"tinker:order:{chain}", request_id)
        except Exception as err:  # noqa: BLE001 - Redis away: the heartbeat tries again
            log.warning("could not take %s out of the order of %s (tried again with the heartbeat): %r", request_id, chain, err)
            self._unleft.add((chain, request_id))

    async def _leave_again(self) -> None:
        for chain, request_id in list(self._unleft):
            await self.redis.hdel(f"tinker:order:{chain}", request_id)
            self._unleft.discard((chain, request_id))

    async def retrieve(self, tenant: str, request_id: str, wait_s: float):
        entry = self._tasks.get(request_id)
        if entry is not None and entry[0] == tenant:
            done, _ = await asyncio.wait([entry[1]], timeout=wait_s)
            if not done:
                return {"type": "try_again", "request_id": request_id, "queue_state": "active"}
            result = entry[1].result()
            return dict(result) if isinstance(result, _Failed) else result
        return await self._retrieve_elsewhere(tenant, request_id, wait_s)

    async def _retrieve_elsewhere(self, tenant: str, request_id: str, wait_s: float):
        """A future another API process runs (or ran): its answer from Redis once there, polled for up to `wait_s`."""
        deadline = time.monotonic() + wait_s
        while True:
            raw = await self.redis.get(f"tinker:future:{request_id}") if _ID.match(request_id or "") else None
            record = json.loads(raw) if raw else None
            if record is None or record.get("tenant") != tenant:
                raise TinkerError(404, f"no future {request_id!r}")
            if "answer" in record:
                return _decode_answer(record["answer"])
            if not await self.redis.exists(f"tinker:api:{record['process']}"):
                return {"error": f"the API process that ran this call stopped before it finished; send the call again "
                                 f"(quote {request_id} when reporting it)", "category": "server"}
            if time.monotonic() >= deadline:
                return {"type": "try_again", "request_id": request_id, "queue_state": "active"}
            await asyncio.sleep(min(self.POLL_S, max(0.0, deadline - time.monotonic())))

    async def _record(self, request_id: str, tenant: str, answer, counted: bool) -> None:
        """The finished future's answer where other processes read it; its place in the tenant's count freed."""
        try:
            await self.redis.set(f"tinker:future:{request_id}", json.dumps({"tenant": tenant, "process": self.process,
                                 "answer": _encode_answer(answer)}), px=int(self.ANSWER_KEEP_S * 1000))
            if counted:
                await self.redis.hdel(f"tinker:inflight:{tenant}", request_id)
        except Exception as err:  # noqa: BLE001 - Redis away: this process still answers it; others see it pending
            log.warning("could not record the answer of %s in Redis: %r", request_id, err)

    async def _hold(self, tenant: str, request_id: str) -> bool:
        """A place among the tenant's unfinished futures (over every API process), if one is free (checked and taken at
        once, in Redis). When none is, places held by processes that stopped beating, or for longer than KEEP_S (a
        place its process failed to give back), are given back first."""
        key, mine = f"tinker:inflight:{tenant}", f"{self.process} {time.time():.3f}"
        if await self.redis.eval(self.HOLD, 1, key, self.per_tenant, request_id, mine):
            return True
        holders = {rid: _text(v).split() for rid, v in (await self.redis.hgetall(key)).items()}
        alive = {p: bool(await self.redis.exists(f"tinker:api:{p}")) for p in {v[0] for v in holders.values()}}
        stale = [rid for rid, (process, since) in holders.items() if not alive[process] or time.time() - float(since) > self.KEEP_S]
        if stale:
            await self.redis.hdel(key, *stale)
        return bool(await self.redis.eval(self.HOLD, 1, key, self.per_tenant, request_id, mine))

    def _failure(self, tenant: str, request_id: str, err: BaseException) -> dict:
        cause = getattr(err, "cause", None)
        if isinstance(err, TinkerError) or "PoolError" in (type(err).__name__, type(cause).__name__):  # the pool's refusals
            return {"error": getattr(err, "message", None) or str(cause or err).strip().splitlines()[-1], "category": "user"}
        # Anything else (a dead actor, a torch error, a file the store lost) may name nodes' addresses and server paths:
        # the tenant gets its kind and the request id, the operator's log the whole of it.
        log.warning("tinker call %s of tenant %s failed: %s", request_id, tenant, err)
        return {"error": f"the call failed on the server ({type(cause or err).__name__}); quote {request_id} when reporting it",
                "category": "server"}

    async def _beat_once(self) -> None:
        """This process's heartbeat key, renewed by a background task from the first call on."""
        if self._beating is None:
            await self.redis.set(f"tinker:api:{self.process}", "1", px=int(self.OWNER_TTL_S * 1000))
            self._beating = asyncio.ensure_future(self._beat_forever())

    DRAIN_S = 10.0

    async def close(self) -> None:
        """At the API's shutdown: the calls still running get up to DRAIN_S to finish; then the heartbeat stops and its
        key goes, so that the other processes see at once that this one's unfinished calls will not finish."""
        running = [task for _, task, _ in self._tasks.values() if not task.done()]
        if running:  # still beating meanwhile: the other processes wait for these calls, not past them
            await asyncio.wait(running, timeout=self.DRAIN_S)
        self.stopped = True
        if self._beating is not None:
            self._beating.cancel()
            await asyncio.wait([self._beating], timeout=5)
            try:
                await self.redis.delete(f"tinker:api:{self.process}")
            except Exception as err:  # noqa: BLE001 - Redis away: the key expires by itself within OWNER_TTL_S
                log.warning("could not remove the Tinker API's heartbeat: %r", err)

    stopped = False  # set at shutdown: the heartbeat and the sweep of ended sessions end at their next round

    async def _beat_forever(self) -> None:
        while not self.stopped:
            try:
                await self.redis.set(f"tinker:api:{self.process}", "1", px=int(self.OWNER_TTL_S * 1000))
                await self._leave_again()
            except Exception as err:  # noqa: BLE001 - Redis away for a moment: the next beat tries again
                log.warning("the Tinker API's heartbeat failed: %r", err)
            await asyncio.sleep(self.OWNER_TTL_S / 3)

    def _forget_old(self) -> None:
        now = time.monotonic()
        for rid in [r for r, (_, t, at) in self._tasks.items() if t.done() and now - at > self.KEEP_S]:
            del self._tasks[rid]


class _Failed(dict):
    """A failed call's answer (the SDK's error shape): what its future holds instead of raising."""


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _encode_answer(answer) -> dict:
    """A call's answer (a JSON dict, or a Response of protobuf bytes) as JSON for Redis."""
    if hasattr(answer, "body"):
        return {"media_type": answer.media_type, "body": base64.b64encode(bytes(answer.body)).decode()}
    return {"json": dict(answer) if isinstance(answer, _Failed) else answer}


def _decode_answer(stored: dict):
    if "json" in stored:
        return stored["json"]
    from starlette.responses import Response

    return Response(base64.b64decode(stored["body"]), media_type=stored["media_type"])


# -- the pools on Ray ----------------------------------------------------------------------------------

class Pools:
    """The adapter pool of each base model, as a named Ray actor; started at its first use."""

    def __init__(self, settings: TinkerSettings):
        self.settings = settings
        self._lock = asyncio.Lock()
        self._actors: dict[str, Any] = {}
        self._slots: dict[tuple[str, str], asyncio.Semaphore] = {}

    async def _connect(self) -> None:
        await asyncio.to_thread(import_ray)
        import ray

        if not ray.is_initialized():
            address = self.settings.ray_address or "auto"
            await asyncio.to_thread(ray.init, address=address, namespace=NAMESPACE, log_to_driver=False, logging_level="WARNING")

    async def actor(self, base_model: str, path: str):
        async with self._lock:
            if base_model in self._actors:
                return self._actors[base_model]
            await self._connect()
            import ray

            name = "pool-" + re.sub(r"[^A-Za-z0-9_.-]", "_", base_model)
            try:
                actor = ray.get_actor(name, namespace=NAMESPACE)
            except ValueError:
                await _start_pool_task().remote(POOL_FACTORY, name, NAMESPACE, path, self.settings.pool_cpus, self.settings.sampler,
                                                self.settings.pool_gpus)
                actor = ray.get_actor(name, namespace=NAMESPACE)
            self._actors[base_model] = actor
            return actor

    async def call(self, base_model: str, path: str, tenant: str, method: str, *args, **kwargs) -> dict:
        actor = await self.actor(base_model, path)
        slots = self._slots.setdefault((base_model, tenant), asyncio.Semaphore(self.settings.calls_per_tenant))
        async with slots:
            return await actor.call.remote(tenant, method, *args, **kwargs)


def _start_pool_task():
    import_ray()
    import ray

    @ray.remote(num_cpus=0)
    def start(factory: str, name: str, namespace: str, path: str, cpus: float, sampler: str, gpus: float) -> str:
        module, fn = factory.split(":")
        return getattr(importlib.import_module(module), fn)(name, namespace, path, cpus, sampler, gpus)

    return start


# -- records in Redis ----------------------------------------------------------------------------------

class Records:
    """Sessions, training runs, sampling sessions (each names its tenant) and per-tenant usage."""

    def __init__(self, redis):
        self.redis = redis

    async def put(self, kind: str, id_: str, record: dict, ttl_s: float | None = None) -> None:
        """Write a record; with `ttl_s`, it expires from Redis that long after this write (a session's, renewed by heartbeats)."""
        await self.redis.set(f"tinker:{kind}:{id_}", json.dumps(record), px=max(1, int(ttl_s * 1000)) if ttl_s else None)

    async def get(self, kind: str, id_: str, tenant: str) -> dict:
        """The record, or 404 when it is missing or another tenant's (the same answer)."""
        raw = None
        if _ID.match(id_ or ""):
            key = f"tinker:samplers:{id_.partition(':sample:')[0]}" if kind == "sampler" else f"tinker:{kind}:{id_}"
            raw = await self.redis.hget(key, id_) if kind == "sampler" else await self.redis.get(key)
        record = json.loads(raw) if raw else None
        if record is None or record.get("tenant") != tenant:
            raise TinkerError(404, f"no {kind.replace('_', ' ')} {id_!r}")
        return record

    async def put_sampler(self, session_id: str, record: dict, ttl_s: float) -> str:
        """A new sampling session of `session_id`: one field of the session's hash of samplers, which expires `ttl_s`
        after its last renewal (each heartbeat of the session renews it), so a session's samplers go with it at once."""
        sampler_id = f"{session_id}:sample:{uuid.uuid4().hex[:12]}"
        key = f"tinker:samplers:{session_id}"
        async with self.redis.pipeline(transaction=True) as pipe:
            await pipe.hset(key, sampler_id, json.dumps(record)).pexpire(key, max(1, int(ttl_s * 1000))).execute()
        return sampler_id

    async def renew_samplers(self, session_id: str, ttl_s: float) -> None:
        await self.redis.pexpire(f"tinker:samplers:{session_id}", max(1, int(ttl_s * 1000)))

    async def hold_run(self, tenant: str, model_id: str, limit: int) -> int | None:
        """Count `model_id` among the tenant's held runs; None if that makes more than `limit` (then it is not held)."""
        key = f"tinker:held:{tenant}"
        await self.redis.sadd(key, model_id)
        held = await self.redis.scard(key)
        if held > limit:
            await self.redis.srem(key, model_id)
            return None
        return held

    async def holding_tenants(self) -> list[str]:
        """Tenants with training runs held."""
        keys = [k.decode() if isinstance(k, bytes) else k async for k in self.redis.scan_iter(match="tinker:held:*")]
        return sorted(k.removeprefix("tinker:held:") for k in keys)

    async def held_runs(self, tenant: str) -> list[str]:
        return sorted(m.decode() if isinstance(m, bytes) else m for m in await self.redis.smembers(f"tinker:held:{tenant}"))

    async def release_run(self, tenant: str, model_id: str, why: str) -> dict | None:
        """Mark a run released (its later calls are refused with `why`); the run's record, or None if it was not held."""
        if not await self.redis.srem(f"tinker:held:{tenant}", model_id):
            return None
        run = await self.get("training_run", model_id, tenant)
        run["released"] = why
        await self.put("training_run", model_id, run)
        return run

    async def add_usage(self, tenant: str, tokens: int, compute_s: float) -> None:
        key = f"tinker:usage:{tenant}"
        await self.redis.hincrby(key, "tokens", int(tokens))
        await self.redis.hincrbyfloat(key, "compute_s", float(compute_s))
        await self.redis.hincrby(key, "requests", 1)

    async def usage(self, tenant: str) -> dict:
        raw = await self.redis.hgetall(f"tinker:usage:{tenant}")
        raw = {(k.decode() if isinstance(k, bytes) else k): float(v) for k, v in raw.items()}
        return {"tokens": int(raw.get("tokens", 0)), "compute_s": raw.get("compute_s", 0.0), "requests": int(raw.get("requests", 0))}


def pool_resources(ray_address: str) -> dict[str, float]:
    """The CPUs and GPUs the adapter pools hold on the cluster (every `pool-*` actor of NAMESPACE not dead: a restarting
    one holds them again), asked of Ray's state API at `ray_address`: the jobs' admission queue counts them as taken."""
    import_ray()
    from ray.util.state import list_actors

    actors = list_actors(address=ray_address, filters=[("ray_namespace", "=", NAMESPACE)], limit=10000, timeout=10, detail=True)
    held = [a.required_resources or {} for a in actors if a.state != "DEAD" and (a.name or "").startswith("pool-")]
    return {"CPU": sum(float(r.get("CPU", 0.0)) for r in held), "GPU": sum(float(r.get("GPU", 0.0)) for r in held)}


def pool_cpus(ray_address: str) -> float:
    """The CPUs of `pool_resources`."""
    return pool_resources(ray_address)["CPU"]


class Tinker:
    """What the routes use: settings, pools, futures, records; kept on app.state."""

    def __init__(self, redis):
        self.settings = TinkerSettings()
        self.pools = Pools(self.settings)
        self.futures = Futures(redis, self.settings.max_futures_per_tenant)
        self.records = Records(redis)
        self.swept = float("-inf")  # time.monotonic() of the last look for ended sessions of every tenant
        self.saving = TenantLocks(redis)
        self.sweeper: asyncio.Task | None = None
