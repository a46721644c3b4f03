"""/v1/jobs/{id}/events and /v1/jobs/{id}/metrics: paginated history, or a live SSE stream with
`Accept: text/event-stream` that resumes after `Last-Event-ID` and ends when the job ends."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any, AsyncIterator

from fastapi import APIRouter, Header, Query, Request
from sse_starlette import EventSourceResponse

from api import redact
from api.deps import CurrentTenant, SettingsDep, StoreDep
from api.routers import error_responses
from api.routers.jobs import JobId, owned_job
from api.schemas import EventList, MetricList
from api.store import JobStore
from orchestrator.core.records import TERMINAL

router = APIRouter(prefix="/v1/jobs", tags=["events and metrics"])

STREAM_ID = r"^\d{1,19}(-\d{1,19})?$"
After = Annotated[str | None, Query(pattern=STREAM_ID, description="Return entries after this id (a previous page's `last_id`).")]
LastEventId = Annotated[
    str | None, Header(alias="Last-Event-ID", pattern=STREAM_ID, description="SSE only: resume after this entry id (sent by EventSource on reconnect).")
]
_SSE_DOC = {
    "content": {
        "text/event-stream": {
            "schema": {"type": "string"},
            "example": 'id: 1764190030000-0\ndata: {"id": "1764190030000-0", "object": "job.event", "type": "status", ...}\n\n'
            'event: end\ndata: {"status": "succeeded"}\n\n',
        }
    },
    "description": "The history as JSON; or, with `Accept: text/event-stream`, a live stream: one `data:` JSON object per entry "
    "(the same shape as in the list), `id:` its entry id; a last `event: end` when the job has ended.",
}


def event_public(eid: str, raw: dict[str, Any]) -> dict[str, Any]:
    data = {k: v for k, v in raw.items() if k not in ("type", "message", "time")}
    return {"id": eid, "object": "job.event", "type": raw.get("type", ""), "message": raw.get("message", ""), "created_at": raw.get("time", 0.0), "data": data}


def metric_public(eid: str, raw: dict[str, Any]) -> dict[str, Any]:
    return {"id": eid, "object": "job.metrics", "step": raw["step"], "created_at": raw["time"], "values": raw["values"]}


_PUBLIC = {"events": event_public, "metrics": metric_public}


def wants_stream(request: Request) -> bool:
    return "text/event-stream" in request.headers.get("accept", "")


async def follow(store: JobStore, job_id: str, kind: str, after: str | None, release=None, hide=None) -> AsyncIterator[dict[str, Any]]:
    """SSE messages from just after `after` until the job is terminal and its stream drained; then
    `release()` (the stream's slot). `hide` rewrites each entry before it goes out."""
    try:
        async for message in _follow(store, job_id, kind, after, hide or (lambda raw: raw)):
            yield message
    finally:
        if release is not None:
            release()


async def _follow(store: JobStore, job_id: str, kind: str, after: str | None, hide) -> AsyncIterator[dict[str, Any]]:
    last, public = after or "0", _PUBLIC[kind]
    while True:
        entries = await store.follow(job_id, kind, last, block_ms=1000)
        for eid, raw in entries:
            last = eid
            yield {"id": eid, "data": json.dumps(public(eid, hide(raw)))}
        if entries:
            await asyncio.sleep(0)  # a long history replays in chunks without holding the event loop
            continue
        rec = await store.get(job_id)
        if rec is None or rec["status"] in TERMINAL:
            # The terminal status event was written with the status itself; drain what is left, then end.
            for eid, raw in await store.follow(job_id, kind, last, block_ms=None):
                yield {"id": eid, "data": json.dumps(public(eid, hide(raw)))}
            yield {"event": "end", "data": json.dumps({"status": rec["status"] if rec else "unknown"})}
            return


async def _history_or_stream(kind: str, job_id, tenant, store, settings, request, after, limit, last_event_id):
    rec = await owned_job(store, job_id, tenant)
    hide = redact.for_job(rec, request.app.state.storage, request.app.state.registry)
    if wants_stream(request):
        slots = request.app.state.streams
        slots.acquire(tenant)
        stream = follow(store, job_id, kind, last_event_id or after, release=lambda: slots.release(tenant), hide=hide)
        return EventSourceResponse(stream, ping=settings.sse_ping_s, headers={"Cache-Control": "no-store"})
    items, has_more = await store.history(job_id, kind, after, limit)
    data = [_PUBLIC[kind](eid, hide(raw)) for eid, raw in items]
    return {"object": "list", "data": data, "has_more": has_more, "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


@router.get(
    "/{job_id}/events", response_model=EventList, summary="Job events (history or live SSE)",
    responses={200: _SSE_DOC, **error_responses(401, 404, 422)},
)
async def job_events(
    job_id: JobId, tenant: CurrentTenant, store: StoreDep, settings: SettingsDep, request: Request,
    after: After = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="Entries per page.")] = 100,
    last_event_id: LastEventId = None,
):
    """Status changes, placement, checkpoints, warnings and the error that failed the job, oldest first."""
    return await _history_or_stream("events", job_id, tenant, store, settings, request, after, limit, last_event_id)


@router.get(
    "/{job_id}/metrics", response_model=MetricList, summary="Per-step metrics (history or live SSE)",
    responses={200: _SSE_DOC, **error_responses(401, 404, 422)},
)
async def job_metrics(
    job_id: JobId, tenant: CurrentTenant, store: StoreDep, settings: SettingsDep, request: Request,
    after: After = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="Entries per page.")] = 100,
    last_event_id: LastEventId = None,
):
    """One entry per finished step (`reward/mean`, `kl`, `clip_ratio`, `entropy`, `timing/<phase>`, ...), oldest first."""
    return await _history_or_stream("metrics", job_id, tenant, store, settings, request, after, limit, last_event_id)
