"""The control plane's FastAPI app: `create_app()` assembles the routers; `rlhf serve` runs it."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from fastapi import Depends, FastAPI
from fastapi.openapi.docs import get_swagger_ui_html

from api import errors
from api.auth import KeyRing
from api.deps import current_tenant
from api.launcher import RayLauncher
from api.limits import RateLimiter, RequestSlots, StreamSlots
from api.middleware import (
    ApiMetrics,
    BodyLimitMiddleware,
    RequestContextMiddleware,
    RequestSlotMiddleware,
)
from api.reconciler import Reconciler
from api.registry import Registry
from api.routers import (
    catalog,
    checkpoints,
    events,
    files,
    health,
    jobs,
    logs,
    tinker,
    trajectories,
    ui,
)
from api.settings import Settings
from api.storage import ArtifactStore
from api.store import JobStore

DESCRIPTION = """Submit RLHF post-training jobs (GRPO, PPO, SFT, RM, DPO) to a Ray cluster, follow their
status, events and metrics (JSON pages or live server-sent events), list and download checkpoints,
read logs, cancel. Upload training data with `POST /v1/files` and name it by id in the spec; name
models from `GET /v1/models` or your checkpoints by id, rewards from `GET /v1/reward_functions`.

Every request but `/healthz` and `/readyz` needs `Authorization: Bearer <key>`; a tenant sees only
its own jobs. Every error is `{"error": {"type", "code", "message", "param"}}`; every response has
an `X-Request-ID` header."""


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    settings: Settings = app.state.settings
    app.state.store = JobStore(settings.redis_url, settings.redis_max_connections, settings.redis_pool_timeout_s)
    await insist_on_durable_redis(app.state.store, settings)
    app.state.rate = RateLimiter(app.state.store.redis, settings.requests_per_minute)
    app.state.launcher = RayLauncher(settings)
    app.state.reconciler = Reconciler(app.state.store, app.state.launcher, settings)
    task = asyncio.create_task(app.state.reconciler.run()) if settings.reconcile else None
    try:
        yield
    finally:
        if task is not None:
            app.state.reconciler.stopping = True
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=30)
            if not done:
                log.warning("the reconciler did not stop within 30 s of shutdown; leaving it")
        tinker = getattr(app.state, "tinker", None)  # (made at the first Tinker request)
        if tinker is not None:
            await tinker.futures.close()  # (sets `stopped`, which the sweep reads too)
            tinker.sweeper.cancel()
        await app.state.store.close()


log = logging.getLogger("api")


async def insist_on_durable_redis(store: JobStore, settings: Settings) -> None:
    """Refuse to start on a Redis that keeps nothing on disk: its restart would lose every job record
    while the jobs run on in Ray, out of reach of the API (404, no cancel)."""
    import redis.exceptions

    try:
        aof = (await store.redis.config_get("appendonly")).get("appendonly")
        save = (await store.redis.config_get("save")).get("save")
    except redis.exceptions.ConnectionError:
        log.warning("Redis at %s is unreachable at startup; its persistence is not checked", settings.redis_url)
        return
    except redis.exceptions.ResponseError as err:  # a managed Redis may refuse CONFIG
        log.warning("cannot read Redis's persistence settings (%s); make sure AOF or snapshots are on", err)
        return
    if aof == "yes" or save:
        return
    message = (f"Redis at {settings.redis_url} keeps nothing on disk (appendonly no, save ''): a Redis restart would lose every job "
               "record while the jobs run on in Ray. Start it with --appendonly yes (or snapshots), or set "
               "RLHF_API_ALLOW_VOLATILE_REDIS=true to accept that.")
    if not settings.allow_volatile_redis:
        raise RuntimeError(message)
    log.warning(message)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    app = FastAPI(
        title="RLHF jobs API", version="1.0.0", description=DESCRIPTION, lifespan=lifespan,
        openapi_url=None, docs_url=None, redoc_url=None,
    )
    app.state.settings = settings
    app.state.keyring = KeyRing(settings.api_keys_file)  # fail at startup, not at the first request
    app.state.registry = Registry.load(settings.registry_file)
    app.state.storage = ArtifactStore(settings.storage_root, settings.storage_options)
    app.state.streams = StreamSlots(settings.max_streams_per_tenant, settings.max_streams)
    app.state.request_slots = RequestSlots(settings.max_concurrent_requests_per_tenant)
    _warn_if_streams_outnumber_connections(settings)
    app.state.metrics = ApiMetrics()
    errors.install(app)
    for module in (health, jobs, events, checkpoints, trajectories, files, catalog, logs, ui):  # ui: the web page at /ui
        app.include_router(module.router)
    tinker.install(app)  # the Tinker-compatible training API at /api/v1 (docs/tinker.md)
    _add_docs(app, settings.public_docs)
    app.add_middleware(BodyLimitMiddleware, json_limit=settings.max_body_bytes, upload_limit=settings.max_upload_bytes)
    app.add_middleware(RequestSlotMiddleware)
    app.add_middleware(RequestContextMiddleware, metrics=app.state.metrics)  # added last: the outermost
    return app


def _warn_if_streams_outnumber_connections(settings: Settings) -> None:
    # A live stream holds a Redis connection while it waits for news (a blocking read of up to 1 s):
    # with more streams than connections, every request queues behind them for a connection.
    if settings.max_streams >= settings.redis_max_connections:
        log.warning("max_streams (%d) is not below redis_max_connections (%d): with every stream open, requests wait for a "
                    "Redis connection; raise redis_max_connections", settings.max_streams, settings.redis_max_connections)


def _add_docs(app: FastAPI, public: bool) -> None:
    guard = [] if public else [Depends(current_tenant)]

    @app.get("/openapi.json", include_in_schema=False, dependencies=guard)
    async def openapi():
        return app.openapi()

    if public:
        @app.get("/docs", include_in_schema=False)
        async def docs():
            return get_swagger_ui_html(openapi_url="/openapi.json", title=app.title)


def serve(settings: Settings | None = None, app: FastAPI | None = None) -> None:
    import uvicorn

    settings = settings or Settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(app or create_app(settings), host=settings.host, port=settings.port, log_level="info", access_log=False)
