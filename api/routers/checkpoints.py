"""/v1/jobs/{id}/checkpoints: finished checkpoints, as the driver last listed them after a save."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from api.deps import CurrentTenant, StoreDep
from api.routers import error_responses
from api.routers.jobs import JobId, owned_job
from api.schemas import CheckpointList

router = APIRouter(prefix="/v1/jobs", tags=["checkpoints"])


@router.get("/{job_id}/checkpoints", response_model=CheckpointList, summary="List a job's checkpoints", responses=error_responses(401, 404))
async def job_checkpoints(job_id: JobId, tenant: CurrentTenant, store: StoreDep) -> dict[str, Any]:
    """Oldest first. Pruned checkpoints (`checkpoint.keep_last`) are gone from the list; resume from
    any listed one with `python -m orchestrator.run --spec ... --resume`."""
    rec = await owned_job(store, job_id, tenant)
    found = sorted(rec["checkpoints"] or [], key=lambda c: c["step"])
    return {"object": "list", "data": [{"object": "job.checkpoint", **c} for c in found], "has_more": False}
