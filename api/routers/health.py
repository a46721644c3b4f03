"""/healthz (the process answers), /readyz (Redis and Ray answer) and /metrics (Prometheus)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.deps import CurrentTenant, LauncherDep, StoreDep
from api.errors import APIError
from api.routers import error_responses
from api.schemas import Health, Ready

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="Liveness")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", response_model=Ready, summary="Readiness: Redis and Ray reachable", responses=error_responses(503))
async def readyz(store: StoreDep, launcher: LauncherDep) -> dict:
    problems = []
    try:
        await asyncio.wait_for(store.ping(), 2.0)
    except Exception as err:
        problems.append(f"Redis: {type(err).__name__}: {err}")
    try:
        await asyncio.wait_for(launcher.ping(), 5.0)
    except Exception as err:
        problems.append(f"Ray: {type(err).__name__}: {err}")
    if problems:
        raise APIError(503, "not_ready", "Not ready: " + "; ".join(problems), None, {"Retry-After": "5"})
    return {"status": "ready", "checks": {"redis": "ok", "ray": "ok"}}


@router.get(
    "/metrics", summary="Prometheus metrics", responses={200: {"content": {"text/plain": {"schema": {"type": "string"}, "example": 'rlhf_jobs{status="running"} 3.0\n'}}}, **error_responses(401)},
    response_class=Response,
)
async def prometheus(request: Request, tenant: CurrentTenant, store: StoreDep) -> Response:
    """Requests and latencies by route, and jobs by status (all tenants)."""
    metrics = request.app.state.metrics
    for status, n in (await store.status_counts()).items():
        metrics.jobs.labels(status).set(n)
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
