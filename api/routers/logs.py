"""/v1/jobs/{id}/logs: the driver's log, from Ray, without server paths or the cluster's addresses."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from api import redact
from api.deps import CurrentTenant, LauncherDep, StoreDep
from api.errors import APIError
from api.launcher import RayJobMissing, RayUnavailable
from api.routers import error_responses
from api.routers.jobs import JobId, owned_job
from api.schemas import JobLogs

router = APIRouter(prefix="/v1/jobs", tags=["logs"])


@router.get("/{job_id}/logs", response_model=JobLogs, summary="The driver's log", responses=error_responses(401, 404, 422, 503))
async def job_logs(
    job_id: JobId, tenant: CurrentTenant, store: StoreDep, launcher: LauncherDep, request: Request,
    tail: Annotated[int | None, Query(ge=1, le=100000, description="Only the last `tail` lines.")] = None,
) -> dict[str, Any]:
    rec = await owned_job(store, job_id, tenant)
    try:
        text = await launcher.logs(rec.get("ray_submission_id") or job_id)  # the current attempt's driver
    except RayJobMissing:
        raise APIError(404, "logs_not_found", f"Ray keeps no log of job {job_id} (the Ray cluster may have been replaced).", "job_id") from None
    except RayUnavailable as err:
        raise APIError(503, "ray_unavailable", f"Could not read the log from Ray: {err}", None, {"Retry-After": "10"}) from None
    if tail:
        text = "".join(text.splitlines(keepends=True)[-tail:])
    hide = redact.for_job(rec, request.app.state.storage, request.app.state.registry)
    return {"object": "job.logs", "job_id": job_id, "logs": await asyncio.to_thread(hide.text, text)}  # (megabytes: off the loop)
