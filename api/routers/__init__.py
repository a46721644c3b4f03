"""One router per resource: jobs, events and metrics, checkpoints, files, the catalog (models, reward
functions), logs, health; and the web page (ui)."""

from __future__ import annotations

from typing import Any

from api.schemas import ErrorResponse

_WHY = {
    400: "Bad request parameter.",
    401: "Missing or invalid API key.",
    404: "No such job, file or checkpoint for this tenant.",
    409: "Conflict with the job's state or an earlier request.",
    413: "The request body is larger than the limit.",
    415: "The body is not of the media type the endpoint reads.",
    422: "The body or a parameter does not validate; `param` names the field.",
    429: "Too many requests, active jobs or open streams for this tenant; see Retry-After.",
    503: "Redis or Ray is unreachable.",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    # Whatever needs a key (401) counts against the tenant's request rate (429).
    statuses = tuple(sorted({*statuses, 429})) if 401 in statuses else statuses
    return {s: {"model": ErrorResponse, "description": _WHY[s]} for s in statuses}
