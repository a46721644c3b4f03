"""/v1/jobs/{id}/trajectories: a multi-turn job's sample episodes (docs/agents.md), the newest last: each
step's first prompt's episodes as the driver appends them to the run directory's trajectories.jsonl,
with their turns, tool calls and rewards. Token ids, masks and log-probs stay in the file."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from api import redact
from api.deps import CurrentTenant, StoreDep
from api.routers import error_responses
from api.routers.jobs import JobId, owned_job
from api.schemas import TrajectoryList

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

TAIL_BYTES = 4 << 20  # the most read from the end of the file (a record with its ids is ~10-50 KB)
CONTENT_CHARS = 4000  # of each message shown
FIELDS = ("step", "sample", "turns", "reward", "rewards", "tool_calls", "invalid_calls", "tool_errors", "truncated")


def tail_records(storage, path: str, root: str, limit: int) -> list[dict[str, Any]]:
    """The last `limit` whole JSON lines of the file (none if it is not there yet)."""
    try:
        f = storage.open_inside(path, root)
    except OSError:
        return []
    with f:
        size = storage.size_of(f)
        f.seek(max(0, size - TAIL_BYTES))
        data = f.read(TAIL_BYTES)
    lines = data.split(b"\n")
    if size > TAIL_BYTES:
        lines = lines[1:]  # (the first may be cut)
    out = []
    for line in reversed(lines):
        if len(out) == limit:
            break
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # an empty line, or one being written
    return out[::-1]


def public(record: dict[str, Any]) -> dict[str, Any]:
    messages = [{"role": str(m.get("role")), "content": str(m.get("content") or "")[:CONTENT_CHARS],
                 **({"name": str(m["name"])} if m.get("name") else {})} for m in record.get("messages") or [] if isinstance(m, dict)]
    return {"object": "job.trajectory", **{k: record.get(k) for k in FIELDS}, "messages": messages}


@router.get("/{job_id}/trajectories", response_model=TrajectoryList, summary="A multi-turn job's sample episodes",
            responses=error_responses(401, 404, 422))
async def job_trajectories(job_id: JobId, tenant: CurrentTenant, store: StoreDep, request: Request,
                           limit: Annotated[int, Query(ge=1, le=100, description="How many of the newest episodes.")] = 20) -> dict[str, Any]:
    """The newest `limit` episodes, oldest first; empty for a job without `rollout.agent` or before its first step."""
    rec = await owned_job(store, job_id, tenant)
    storage = request.app.state.storage
    run = storage.run_path(tenant, job_id)
    records = await asyncio.to_thread(tail_records, storage, f"{run}/trajectories.jsonl", run, limit)
    hide = redact.for_job(rec, storage, request.app.state.registry)
    return {"object": "list", "data": [redact.each_string(public(r), hide.paths) for r in records], "has_more": False}
