"""The Tinker HTTP API (`/api/v1/...`) as the `tinker` SDK (0.38) calls it: see docs/tinker.md.

Keys are the jobs API's keys (the SDK sends one in `X-API-Key`); every id and `tinker://` path of
another tenant is a 404. Work goes to the base model's adapter pool (api/tinker.py) and comes back
through futures (`retrieve_future`). What this server does not do answers in the SDK's shapes: a
failed future `{"error", "category": "user"}` naming it, or a 404 for a route it does not serve.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import os
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, Response

from api.errors import APIError
from api.tinker import (
    LOSSES,
    Tinker,
    TinkerError,
    check_name,
    decode_forward_backward,
    encode_forward_backward,
    encode_sample,
    new_id,
)
from api.tinker_storage import KINDS, make_room, mark_unnamed, remove, saved

router = APIRouter(prefix="/api/v1", include_in_schema=False)
log = logging.getLogger("api.tinker")


async def tinker(request: Request) -> Tinker:
    """The app's Tinker state, made at the first Tinker request, which also starts the background sweep of ended sessions."""
    state = request.app.state
    if getattr(state, "tinker", None) is None:
        state.tinker = Tinker(state.store.redis)
        state.tinker.sweeper = asyncio.ensure_future(_sweep_forever(state.tinker))
    return state.tinker


async def tinker_tenant(request: Request, x_api_key: Annotated[str | None, Header()] = None,
                        authorization: Annotated[str | None, Header()] = None) -> str:
    key = x_api_key or (authorization[7:] if authorization and authorization.lower().startswith("bearer ") else None)
    tenant = request.app.state.keyring.tenant_for(key) if key else None
    if tenant is None:
        raise TinkerError(401, "missing or invalid API key (send it in X-API-Key, as the tinker SDK does)")
    if not request.url.path.endswith("/retrieve_future"):  # the SDK's polling: counted only when it names no future (below)
        await _count(request, tenant)
    return tenant


async def _count(request: Request, tenant: str) -> None:
    """The request in the tenant's requests_per_minute, shared with the jobs API; past it 429 (the SDK retries 429)."""
    try:
        await request.app.state.rate.hit(tenant)
    except APIError:
        await asyncio.sleep(request.app.state.settings.refused_request_delay_s)  # as the jobs API: a resend costs a wait
        raise


def _int(value: Any, what: str, low: int, high: int, setting: str | None = None) -> int:
    """An integer in low..high from a client's JSON, else 400 naming it (and the setting that bounds it)."""
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):
        raise TinkerError(400, f"{what} must be an integer, not {value!r}"[:200]) from None
    if not low <= number <= high:
        raise TinkerError(400, f"{what} must be {low}..{high}" + (f" ({setting} = {high})" if setting else ""))
    return number


def _float(value: Any, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise TinkerError(400, f"{what} must be a number, not {value!r}"[:200]) from None
    if not math.isfinite(number):
        raise TinkerError(400, f"{what} must be a finite number")
    return number


def _name(value: Any) -> str:
    if not isinstance(value, str):
        raise TinkerError(400, f"checkpoint name must be a string, not {type(value).__name__}")
    return check_name(value, "checkpoint name")


Tenant = Annotated[str, Depends(tinker_tenant)]
TinkerDep = Annotated[Tinker, Depends(tinker)]


def install(app) -> None:
    """The router, and TinkerError answered as the SDK reads errors."""

    @app.exception_handler(TinkerError)
    async def _tinker_error(request: Request, err: TinkerError):
        status = err.status or 400
        return JSONResponse({"error": err.message, "detail": err.message, "category": "user"}, status_code=status)

    app.include_router(router)


# -- session, config, capabilities -------------------------------------------------------------------

@router.post("/client/config")
async def client_config(request: Request, tenant: Tenant) -> dict:
    # No JWT exchange (keys are checked on every request); plain httpx transport; per-request polling. A forward_backward
    # body is bounded by max_body_bytes: the SDK splits a batch into requests of at most half of it (its size estimate
    # leaves out the protobuf framing), sent one after another (a run's calls are served in the order they arrive).
    return {"pjwt_auth_enabled": False, "use_pyqwest_transport": False, "sample_use_retrieve_futures": False,
            "custom_loss_server_side": False, "proto_compress_fwdbwd": False, "parallel_fwdbwd_chunks": False,
            "fwdbwd_max_chunk_bytes_count": request.app.state.settings.max_body_bytes // 2}


@router.post("/client/dynamic_config")
async def dynamic_config(tenant: Tenant) -> dict:
    return {}


@router.post("/create_session")
async def create_session(body: dict, tenant: Tenant, t: TinkerDep) -> dict:
    session_id = new_id("sess")
    record = {"tenant": tenant, "sdk_version": body.get("sdk_version"), "created": _now()}
    await t.records.put("session", session_id, record, t.settings.session_timeout_s)
    return {"type": "create_session", "session_id": session_id}


@router.post("/session_heartbeat")
async def heartbeat(body: dict, tenant: Tenant, t: TinkerDep) -> dict:
    """Renews the session record's TTL. An ended or expired session is 410, on which the SDK stops beating."""
    session_id = str(body.get("session_id"))
    try:
        record = await t.records.get("session", session_id, tenant)
    except TinkerError:
        record = {"finished": "expired"}
    if record.get("finished"):
        raise TinkerError(410, f"session {session_id!r} has ended, or expired after {t.settings.session_timeout_s:g} s without a "
                          "heartbeat (RLHF_API_TINKER_SESSION_TIMEOUT_S): its training runs are released, its saved checkpoints stay")
    record["heartbeat"] = _now()
    await t.records.put("session", session_id, record, t.settings.session_timeout_s)
    await t.records.renew_samplers(session_id, t.settings.session_timeout_s)
    await _sweep(t)
    return {"type": "session_heartbeat"}


@router.post("/sessions/{session_id}/finish")
async def finish_session(session_id: str, body: dict, tenant: Tenant, t: TinkerDep) -> dict:
    """The SDK's ServiceClient.close(): the session ends and its training runs are released (their saved states stay).
    A session that has expired already (its runs released) closes without error."""
    try:
        record = await t.records.get("session", session_id, tenant)
    except TinkerError:
        record = None
    if record is not None:
        record.setdefault("finished", str((body.get("reason") or {}).get("type", "closed")))
        await t.records.put("session", session_id, record, t.settings.session_timeout_s)
    await _release_ended(t, tenant)
    return {}


@router.post("/telemetry")
async def telemetry(tenant: Tenant) -> dict:
    return {"status": "accepted"}


@router.get("/get_server_capabilities")
async def capabilities(request: Request, tenant: Tenant) -> dict:
    models = request.app.state.registry.visible_models(tenant)
    return {"supported_models": [{"model_name": name, "trainable": True, "sampleable": True} for name in sorted(models)]}


@router.get("/usage")
async def usage(tenant: Tenant, t: TinkerDep) -> dict:
    """This tenant's Tinker usage: tokens processed, compute seconds, requests (not an SDK route)."""
    return {"tenant": tenant, **await t.records.usage(tenant)}


# -- training runs ----------------------------------------------------------------------------------

def _base_path(request: Request, tenant: str, base_model: str) -> str:
    entry = request.app.state.registry.model_for(base_model, tenant)
    if entry is None:
        raise TinkerError(404, f"base model {base_model!r} is not served here (GET /api/v1/get_server_capabilities lists them)")
    return entry.path


async def _run(t: Tinker, tenant: str, run: dict, method: str, *args, **kwargs) -> Any:
    """One pool call for a training run; counts its usage."""
    out = await t.pools.call(run["base_model"], run["path"], tenant, method, *args, **kwargs)
    result = out["result"]
    tokens = result.get("tokens", 0) if isinstance(result, dict) else 0
    await t.records.add_usage(tenant, tokens, out["compute_s"])
    return result


@router.post("/create_model")
async def create_model(body: dict, request: Request, tenant: Tenant, t: TinkerDep) -> dict:
    base = str(body.get("base_model"))
    path = _base_path(request, tenant, base)
    lora = body.get("lora_config") or {}
    rank = _int(lora.get("rank", 32), "lora_config.rank", 1, t.settings.max_rank, "RLHF_API_TINKER_MAX_RANK")
    seed = None if lora.get("seed") is None else _int(lora["seed"], "lora_config.seed", 0, 2**63 - 1)
    optimizer = (body.get("optimizer_config") or {}).get("type", "adamw")
    if optimizer != "adamw":
        raise TinkerError(400, f"optimizer {optimizer!r} is not supported here (adamw only)")
    session_id = str(body.get("session_id"))
    await t.records.get("session", session_id, tenant)  # a run belongs to a live session of the tenant's, and ends with it
    model_id = new_id("tm")
    refused = await _over_quota(t, tenant, model_id)
    if refused:
        return refused
    run = {"tenant": tenant, "base_model": base, "path": path, "rank": rank, "created": _now(), "last_state": None,
           "session": session_id}
    await t.records.put("training_run", model_id, run)

    async def make():
        await _run(t, tenant, run, "create", model_id, rank, seed=seed, train_attn=bool(lora.get("train_attn", True)),
                   train_mlp=bool(lora.get("train_mlp", True)), train_unembed=bool(lora.get("train_unembed", True)))
        return {"type": "create_model", "model_id": model_id}

    return {"request_id": await t.futures.submit(tenant, model_id, make), "model_id": model_id}


async def _over_quota(t: Tinker, tenant: str, model_id: str) -> dict | None:
    """Hold a place for a new training run; past the tenant's limit, the answer of a future that fails naming it."""
    await _release_ended(t, tenant)
    await _sweep(t)
    limit = t.settings.max_runs_per_tenant
    if await t.records.hold_run(tenant, model_id, limit) is not None:
        return None
    message = (f"tenant quota: you hold {limit} training runs, the limit (RLHF_API_TINKER_MAX_RUNS_PER_TENANT = {limit}); close a "
               f"ServiceClient (its session's runs are released) or let an idle session time out ({t.settings.session_timeout_s:g} s "
               "without a heartbeat)")
    return {"request_id": await t.futures.fail(tenant, model_id, message), "model_id": model_id}


async def _sweep_forever(t: Tinker) -> None:
    """Every `sweep_s` (at least 1 s): a session that stopped beating has its runs released within session_timeout_s +
    sweep_s of its last heartbeat even when no client calls this API process."""
    while not t.futures.stopped:  # (a cancel that lands in a Redis call can be swallowed there: the flag ends it)
        await asyncio.sleep(max(t.settings.sweep_s, 1.0))
        try:
            await _sweep(t)
        except Exception as err:  # noqa: BLE001  (Redis away for a moment: the next round tries again)
            log.warning("the sweep of ended Tinker sessions failed: %r", err)


async def _sweep(t: Tinker) -> None:
    """At most every `sweep_s`: release the ended sessions' runs of every tenant, so that a client that died without
    closing frees the pool's memory even if its tenant never comes back (any live client's heartbeat drives this)."""
    if time.monotonic() - t.swept < t.settings.sweep_s:
        return
    t.swept = time.monotonic()
    for tenant in await t.records.holding_tenants():
        await _release_ended(t, tenant)


async def _release_ended(t: Tinker, tenant: str) -> None:
    """Release the tenant's held runs whose session finished or stopped beating; their adapters leave the pool."""
    now = _now()
    for model_id in await t.records.held_runs(tenant):
        try:
            run = await t.records.get("training_run", model_id, tenant)
        except TinkerError:  # no record to read (none was written): nothing to release but the place it holds
            await t.records.redis.srem(f"tinker:held:{tenant}", model_id)
            continue
        try:
            session = await t.records.get("session", run.get("session", ""), tenant)
        except TinkerError:  # its record expired (no heartbeat for session_timeout_s), or never was
            session = {"expired": True}
        beat = session.get("heartbeat") or session.get("created", now)
        if session.get("finished") or session.get("expired") or now - beat > t.settings.session_timeout_s:
            why = f"its session {run.get('session')} " + ("ended" if session.get("finished") else "timed out")
            if await t.records.release_run(tenant, model_id, why) is not None:
                await t.futures.submit(tenant, model_id, lambda run=run, model_id=model_id: _run(t, tenant, run, "drop", model_id), limited=False)


async def _live_run(t: Tinker, tenant: str, model_id: str) -> dict:
    """The training run, refused (400, naming why) once released."""
    run = await t.records.get("training_run", model_id, tenant)
    if run.get("released"):
        raise TinkerError(400, f"training run {model_id} was released ({run['released']}); load one of its saved states into a new run")
    return run


@router.post("/get_info")
async def get_info(body: dict, tenant: Tenant, t: TinkerDep) -> dict:
    model_id = str(body.get("model_id"))
    run = await t.records.get("training_run", model_id, tenant)
    return {"type": "get_info", "model_id": model_id, "model_data": {"arch": "lora", "model_name": run["base_model"],
            "tokenizer_id": run["base_model"]}, "is_lora": True, "lora_rank": run["rank"], "model_name": run["base_model"]}


@router.post("/forward_backward")
async def forward_backward(request: Request, tenant: Tenant, t: TinkerDep) -> dict:
    if request.headers.get("content-encoding"):
        raise TinkerError(415, f"Content-Encoding {request.headers['content-encoding']!r} is not supported")
    req = decode_forward_backward(await request.body())
    run = await _live_run(t, tenant, req["model_id"])
    longest = t.settings.max_sequence_tokens
    for i, datum in enumerate(req["data"]):
        if not 1 <= len(datum["tokens"]) <= longest:
            raise TinkerError(400, f"datum {i} has {len(datum['tokens'])} tokens: a datum has 1..{longest} "
                              "(RLHF_API_TINKER_MAX_SEQUENCE_TOKENS)")
        if min(datum["tokens"]) < 0:
            raise TinkerError(400, f"datum {i} has a negative token id")
    if req["loss_fn"] not in LOSSES:
        message = f"loss_fn {req['loss_fn']!r} is not supported here (supported: {', '.join(LOSSES)})"
        return {"request_id": await t.futures.fail(tenant, req["model_id"], message, seq=req["seq_id"]), "model_id": req["model_id"]}

    async def make():
        result = await _run_recovering(t, tenant, req["model_id"], run, "forward_backward", req["model_id"], req["data"], req["loss_fn"],
                                       req["config"], backward=not req["forward_only"])
        return Response(encode_forward_backward(result["logprobs"], {"loss:sum": result["loss"]}), media_type="application/x-protobuf")

    return {"request_id": await t.futures.submit(tenant, req["model_id"], make, seq=req["seq_id"]), "model_id": req["model_id"]}


@router.post("/optim_step")
async def optim_step(body: dict, tenant: Tenant, t: TinkerDep) -> dict:
    model_id = str(body.get("model_id"))
    run = await _live_run(t, tenant, model_id)
    params = body.get("adam_params") or body.get("optim_params")
    if params is None:
        raise TinkerError(400, f"optimizer {(body.get('optimizer_params') or {}).get('type')!r} is not supported here (Adam only)")
    keys = ("learning_rate", "beta1", "beta2", "eps", "weight_decay", "grad_clip_norm")
    if not isinstance(params, dict):
        raise TinkerError(400, "adam_params must be an object")
    adam = {k: _float(params[k], f"adam_params.{k}") for k in keys if k in params}

    async def make():
        result = await _run_recovering(t, tenant, model_id, run, "optim_step", model_id, **adam)
        return {"metrics": result}

    return {"request_id": await t.futures.submit(tenant, model_id, make, seq=_seq(body)), "model_id": model_id}


def _seq(body: dict) -> int | None:
    """The SDK's seq_id of a call on a training run (its calls run in that order): None where it sent none."""
    return None if body.get("seq_id") is None else _int(body["seq_id"], "seq_id", 0, 2**62)


async def _run_recovering(t: Tinker, tenant: str, model_id: str, run: dict, method: str, *args, **kwargs):
    """A call on a training run; if its adapter is gone (its pool actor died and Ray restarted it), the run
    comes back from its last saved state first, or the call fails saying that nothing was saved."""
    try:
        return await _run_through_restart(t, tenant, run, method, *args, **kwargs)
    except Exception as err:
        if "no adapter" not in str(err):
            raise
        latest = (await t.records.get("training_run", model_id, tenant)).get("last_state")
        if latest is None:
            raise TinkerError(0, f"training run {model_id} was lost with its worker and has no saved state; create it again") from None
        await _run(t, tenant, run, "load_state", model_id, latest, True)
        return await _run(t, tenant, run, method, *args, **kwargs)


async def _run_through_restart(t: Tinker, tenant: str, run: dict, method: str, *args, **kwargs):
    """A pool call that waits out a restart of the pool's actor (Ray restarts it: max_restarts=-1), for up to a minute."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return await _run(t, tenant, run, method, *args, **kwargs)
        except Exception as err:
            if "Actor" not in type(err).__name__ or time.monotonic() > deadline:
                raise
            await asyncio.sleep(1.0)


# -- weights: save, load, sampler -------------------------------------------------------------------

def _root(request: Request, tenant: str) -> str:
    return f"{request.app.state.storage.tenant_root(tenant)}/tinker"


def _dir(request: Request, tenant: str, model_id: str, kind: str, name: str) -> str:
    return f"{_root(request, tenant)}/{model_id}/{kind}/{name}"


async def _save(request: Request, t: Tinker, tenant: str, model_id: str, run: dict, directory: str, optimizer: bool,
                unnamed: bool = False) -> None:
    """save_state into `directory` within the tenant's checkpoint quota: past a limit the oldest unnamed sampler weights
    are evicted, else the call fails naming the limit. Under the tenant's lock: concurrent saves are checked one by one."""
    ts, root = t.settings, _root(request, tenant)
    async with t.saving(tenant):
        evicted, refusal = await asyncio.to_thread(make_room, root, ts.max_checkpoints_per_tenant, ts.max_checkpoint_bytes_per_tenant,
                                                   directory)
        if evicted:
            log.info("tenant %s: evicted %d unnamed sampler weights past its checkpoint quota", tenant, len(evicted))
        if refusal:
            raise TinkerError(0, refusal)
        await _run_recovering(t, tenant, model_id, run, "save_state", model_id, directory, optimizer)
        if unnamed:
            mark_unnamed(directory)


async def _resolve(request: Request, t: Tinker, tenant: str, tinker_path: str, kinds=("weights",)) -> tuple[str, dict, str]:
    """(model_id, run, directory) of a tinker://<model_id>/<kind>/<name> path of this tenant; else 404."""
    parts = tinker_path[len("tinker://"):].split("/") if tinker_path.startswith("tinker://") else []
    if len(parts) != 3 or parts[1] not in kinds:
        raise TinkerError(400, f"{tinker_path!r} is not a tinker://<model_id>/{'|'.join(kinds)}/<name> path")
    model_id, kind, name = parts
    run = await t.records.get("training_run", model_id, tenant)
    directory = _dir(request, tenant, model_id, kind, check_name(name, "checkpoint name"))
    if not os.path.isfile(f"{directory}/state.pt"):
        raise TinkerError(404, f"no checkpoint {tinker_path!r}")
    return model_id, run, directory


@router.post("/save_weights")
async def save_weights(body: dict, request: Request, tenant: Tenant, t: TinkerDep) -> dict:
    model_id = str(body.get("model_id"))
    run = await _live_run(t, tenant, model_id)
    name = _name(body.get("path") or f"state-{new_id('c')[2:12]}")
    directory = _dir(request, tenant, model_id, "weights", name)

    async def make():
        await _save(request, t, tenant, model_id, run, directory, True)
        latest = await t.records.get("training_run", model_id, tenant)
        latest["last_state"] = directory
        await t.records.put("training_run", model_id, latest)
        return {"type": "save_weights", "path": f"tinker://{model_id}/weights/{name}"}

    return {"request_id": await t.futures.submit(tenant, model_id, make, seq=_seq(body)), "model_id": model_id}


@router.post("/load_weights")
async def load_weights(body: dict, request: Request, tenant: Tenant, t: TinkerDep) -> dict:
    if body.get("model_id") is None:
        return await _load_into_new_run(body, request, tenant, t)
    model_id = str(body["model_id"])
    run = await _live_run(t, tenant, model_id)
    _, source_run, directory = await _resolve(request, t, tenant, str(body.get("path")))
    if source_run["base_model"] != run["base_model"]:
        raise TinkerError(400, f"checkpoint is of base model {source_run['base_model']!r}, this run trains {run['base_model']!r}")
    optimizer = bool(body.get("optimizer"))

    async def make():
        await _run(t, tenant, run, "load_state", model_id, directory, optimizer)
        return {"type": "load_weights", "path": body["path"], "model_id": model_id}

    return {"request_id": await t.futures.submit(tenant, model_id, make, seq=_seq(body)), "model_id": model_id}


async def _load_into_new_run(body: dict, request: Request, tenant: str, t: Tinker) -> dict:
    """create_training_client_from_state: a new run of the checkpoint's base model and LoRA config, its weights (and,
    with `optimizer`, its Adam state) loaded; its id is the one the SDK derives: `<session_id>:train:<model_seq_id>`."""
    session_id = str(body.get("session_id"))
    await t.records.get("session", session_id, tenant)
    _, source, directory = await _resolve(request, t, tenant, str(body.get("path")))
    if body.get("base_model") not in (None, source["base_model"]):
        raise TinkerError(400, f"checkpoint is of base model {source['base_model']!r}, not {body['base_model']!r}")
    # The id must stay one that Records.get reads (`:train:` and 1-9 digits), or the run could be held but never released.
    model_id = f"{session_id}:train:{_int(body.get('model_seq_id') or 0, 'model_seq_id', 0, 999_999_999)}"
    if await t.records.redis.exists(f"tinker:training_run:{model_id}"):
        raise TinkerError(400, f"training run {model_id} exists")
    refused = await _over_quota(t, tenant, model_id)
    if refused:
        return refused
    run = {"tenant": tenant, "base_model": source["base_model"], "path": source["path"], "rank": source["rank"], "created": _now(),
           "last_state": None, "session": session_id}
    await t.records.put("training_run", model_id, run)

    async def make():
        await _run(t, tenant, run, "load_state", model_id, directory, bool(body.get("optimizer")))
        return {"type": "load_weights", "path": body["path"], "model_id": model_id}

    return {"request_id": await t.futures.submit(tenant, model_id, make), "model_id": model_id}


@router.post("/save_weights_for_sampler")
async def save_for_sampler(body: dict, request: Request, tenant: Tenant, t: TinkerDep) -> dict:
    model_id = str(body.get("model_id"))
    run = await _live_run(t, tenant, model_id)
    named = body.get("path") is not None
    name = _name(body["path"] if named else f"snapshot-{new_id('c')[2:14]}")
    directory = _dir(request, tenant, model_id, "sampler_weights", name)
    tinker_path = f"tinker://{model_id}/sampler_weights/{name}"

    async def make():
        await _save(request, t, tenant, model_id, run, directory, False, unnamed=not named)
        if named:
            return {"type": "save_weights_for_sampler", "path": tinker_path}
        sampler_id = await _new_sampler(t, tenant, run["session"], run["base_model"], run["path"], tinker_path, directory)
        return {"type": "save_weights_for_sampler", "sampling_session_id": sampler_id}

    return {"request_id": await t.futures.submit(tenant, model_id, make, seq=_seq(body)), "model_id": model_id}


async def _new_sampler(t: Tinker, tenant: str, session_id: str, base_model: str, path: str, tinker_path: str | None,
                       weights: str | None) -> str:
    record = {"tenant": tenant, "base_model": base_model, "path": path, "model_path": tinker_path, "weights": weights}
    return await t.records.put_sampler(session_id, record, t.settings.session_timeout_s)


@router.post("/create_sampling_session")
async def create_sampling_session(body: dict, request: Request, tenant: Tenant, t: TinkerDep) -> dict:
    """A sampling session of the client's session (the SDK sends its session_id): it ends when that session does."""
    session_id = str(body.get("session_id"))
    await t.records.get("session", session_id, tenant)
    if body.get("model_path"):
        _, run, directory = await _resolve(request, t, tenant, body["model_path"], kinds=("sampler_weights", "weights"))
        sampler_id = await _new_sampler(t, tenant, session_id, run["base_model"], run["path"], body["model_path"], directory)
    else:
        base = str(body.get("base_model"))
        sampler_id = await _new_sampler(t, tenant, session_id, base, _base_path(request, tenant, base), None, None)
    return {"type": "create_sampling_session", "sampling_session_id": sampler_id}


@router.get("/samplers/{sampler_id}")
async def get_sampler(sampler_id: str, tenant: Tenant, t: TinkerDep) -> dict:
    s = await t.records.get("sampler", sampler_id, tenant)
    return {"sampler_id": sampler_id, "base_model": s["base_model"], "model_path": s["model_path"]}


@router.post("/asample")
async def asample(body: dict, tenant: Tenant, t: TinkerDep) -> dict:
    s = await t.records.get("sampler", str(body.get("sampling_session_id")), tenant)
    if s["weights"] and not os.path.isfile(f"{s['weights']}/state.pt"):
        raise TinkerError(404, f"the weights of this sampling client, {s['model_path']}, were deleted (or, saved without a name, "
                          "evicted past the checkpoint quota); save new ones")
    params = body.get("sampling_params") or {}
    for unsupported in ("prompt_logprobs", "record_stability_info"):
        if body.get(unsupported):
            raise TinkerError(400, f"{unsupported} is not supported here")
    for unsupported in ("topk_prompt_logprobs", "topk_sample_logprobs", "prompt_alt_tokens_k"):
        if body.get(unsupported):
            raise TinkerError(400, f"{unsupported} is not supported here")
    stop = params.get("stop")
    if isinstance(stop, str) or (isinstance(stop, list) and any(isinstance(x, str) for x in stop)):
        raise TinkerError(400, "stop strings are not supported here; pass stop token ids")
    if stop is not None and not isinstance(stop, list):
        raise TinkerError(400, "stop must be a list of token ids")
    ts = t.settings
    prompt = _prompt_tokens(body.get("prompt") or {})
    n = _int(body.get("num_samples", 1), "num_samples", 1, ts.max_num_samples, "RLHF_API_TINKER_MAX_NUM_SAMPLES")
    max_tokens = _int(params.get("max_tokens") or 16, "sampling_params.max_tokens", 1, ts.max_sample_tokens, "RLHF_API_TINKER_MAX_SAMPLE_TOKENS")
    if len(prompt) + max_tokens > ts.max_sequence_tokens:
        raise TinkerError(400, f"a prompt of {len(prompt)} tokens plus max_tokens {max_tokens} is over the longest sequence, "
                          f"{ts.max_sequence_tokens} tokens (RLHF_API_TINKER_MAX_SEQUENCE_TOKENS)")
    kwargs = {"max_tokens": max_tokens, "temperature": _float(params.get("temperature", 1.0), "sampling_params.temperature"),
              "top_k": _int(params.get("top_k", -1), "sampling_params.top_k", -1, 2**31 - 1),
              "top_p": _float(params.get("top_p", 1.0), "sampling_params.top_p"),
              "seed": None if params.get("seed") is None else _int(params["seed"], "sampling_params.seed", 0, 2**63 - 1),
              "stop": None if stop is None else [_int(x, "stop token id", 0, 2**31 - 1) for x in stop]}

    async def make():
        out = await t.pools.call(s["base_model"], s["path"], tenant, "sample", s["weights"], prompt, n, **kwargs)
        tokens = len(prompt) * n + sum(len(x["tokens"]) for x in out["result"])
        await t.records.add_usage(tenant, tokens, out["compute_s"])
        return Response(encode_sample(out["result"]), media_type="application/x-protobuf")

    request_id = await t.futures.submit(tenant, None, make)
    return {"request_id": request_id, "sample_sequence_ids": [f"{request_id}-{i}" for i in range(n)]}


def _prompt_tokens(model_input: dict) -> list[int]:
    tokens: list[int] = []
    for chunk in model_input.get("chunks") or []:
        if chunk.get("type", "encoded_text") != "encoded_text":
            raise TinkerError(400, f"prompt chunks of type {chunk.get('type')!r} are not supported (text tokens only)")
        tokens += [_int(x, "prompt token id", 0, 2**31 - 1) for x in chunk.get("tokens") or []]
    if not tokens:
        raise TinkerError(400, "the prompt has no tokens")
    return tokens


# -- futures, checkpoints ---------------------------------------------------------------------------

@router.post("/retrieve_future")
async def retrieve_future(body: dict, request: Request, tenant: Tenant, t: TinkerDep):
    """Not counted in requests_per_minute (the SDK polls each call's future until it is done; a tenant's futures are bounded
    by RLHF_API_TINKER_MAX_FUTURES_PER_TENANT), except a poll that names no future of the tenant's."""
    try:
        return await t.futures.retrieve(tenant, str(body.get("request_id")), t.settings.wait_s)
    except TinkerError:
        await _count(request, tenant)
        raise


@router.post("/cancel_future")
async def cancel_future(tenant: Tenant) -> dict:
    return {}


@router.get("/training_runs/{model_id}/checkpoints")
async def checkpoints(model_id: str, request: Request, tenant: Tenant, t: TinkerDep) -> dict:
    await t.records.get("training_run", model_id, tenant)
    found = await asyncio.to_thread(saved, _root(request, tenant), model_id)
    return {"checkpoints": [{"checkpoint_id": f"{s.kind}/{s.name}", "checkpoint_type": KINDS[s.kind], "tinker_path": s.tinker_path,
                             "time": dt.datetime.fromtimestamp(s.mtime, dt.timezone.utc).isoformat(), "size_bytes": s.bytes}
                            for s in found]}


@router.delete("/training_runs/{model_id}/checkpoints/{kind}/{name}")
async def delete_checkpoint(model_id: str, kind: str, name: str, request: Request, tenant: Tenant, t: TinkerDep) -> Response:
    """RestClient.delete_checkpoint(_from_tinker_path): the checkpoint's files are removed (its bytes and place in the
    quota free at once); another tenant's is 404. After an in-flight save of the tenant (the same lock)."""
    _, run, directory = await _resolve(request, t, tenant, f"tinker://{model_id}/{kind}/{name}", kinds=tuple(KINDS))
    async with t.saving(tenant):
        await asyncio.to_thread(remove, _root(request, tenant), directory)
    if run.get("last_state") == directory:  # recovery after a lost pool actor must not load what is gone
        latest = await t.records.get("training_run", model_id, tenant)
        latest["last_state"] = None
        await t.records.put("training_run", model_id, latest)
    return Response(status_code=204)


@router.api_route("/{rest:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
async def unsupported(rest: str, tenant: Tenant):
    raise TinkerError(404, f"/api/v1/{rest} is not supported by this server (see docs/tinker.md for what is)")


def _now() -> float:
    return time.time()
