"""One router per resource: jobs, events and metrics, checkpoints, logs, health; and the web page (ui)."""

from __future__ import annotations

from typing import Any

from api.schemas import ErrorResponse

_WHY = {
    400: "Bad request parameter.",
    401: "Missing or invalid API key.",
    404: "No such job for this tenant.",
    409: "Conflict with the job's state or an earlier request.",
    422: "The body or a parameter does not validate; `param` names the field.",
    429: "Too many active jobs for this tenant.",
    503: "Redis or Ray is unreachable.",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": ErrorResponse, "description": _WHY[s]} for s in statuses}
