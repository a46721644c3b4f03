"""Request ids and Prometheus request metrics, as plain ASGI middleware (no per-request task or
body buffering, so SSE streams pass straight through)."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.datastructures import MutableHeaders

from api.errors import envelope
from api.limits import release_request_slot

log = logging.getLogger("api")
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class ApiMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("rlhf_api_requests", "HTTP requests served.", ("method", "route", "status"), registry=self.registry)
        self.latency = Histogram(
            "rlhf_api_request_seconds", "Time to the end of the response (SSE: the stream's life).", ("method", "route"),
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60), registry=self.registry,
        )
        self.jobs = Gauge("rlhf_jobs", "Jobs by status, all tenants.", ("status",), registry=self.registry)


class RequestContextMiddleware:
    def __init__(self, app, metrics: ApiMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        incoming = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), "")
        rid = incoming if _SAFE_ID.match(incoming) else "req_" + uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        start = time.perf_counter()
        status = 500
        started = False

        async def send_with_id(message):
            nonlocal status, started
            if message["type"] == "http.response.start":
                started, status = True, message["status"]
                MutableHeaders(scope=message).append("X-Request-ID", rid)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error in %s %s (request %s)", scope["method"], scope["path"], rid)
            if started:
                raise
            body = json.dumps(envelope(500, "internal_error", f"Internal error; quote request id {rid} when reporting it.")).encode()
            await send({"type": "http.response.start", "status": 500, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"x-request-id", rid.encode())]})
            await send({"type": "http.response.body", "body": body})
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(scope["method"], route, str(status)).inc()
            self.metrics.latency.labels(scope["method"], route).observe(time.perf_counter() - start)


class RequestSlotMiddleware:
    """Gives back the request slot that `current_tenant` took (api/limits.py RequestSlots) when the
    response has ended, or as soon as a live SSE stream's headers go out: a stream holds a stream slot
    of its own (StreamSlots) for its whole life, which may be hours."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})

        async def watched(message):
            if message["type"] == "http.response.start" and _is_event_stream(message):
                release_request_slot(state)
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            release_request_slot(state)


def _is_event_stream(start_message) -> bool:
    return any(k == b"content-type" and v.startswith(b"text/event-stream") for k, v in start_message.get("headers", ()))


class BodyLimitMiddleware:
    """413 for a request body over the limit, whether its Content-Length says so or its stream grows
    past it: uploads (`POST /v1/files`) up to `upload_limit`, every other body up to `json_limit`.
    Past the limit, the app reads a disconnect and whatever it answers is dropped for the 413."""

    def __init__(self, app, json_limit: int, upload_limit: int, upload_paths: tuple[str, ...] = ("/v1/files",)):
        self.app, self.json_limit, self.upload_limit, self.upload_paths = app, json_limit, upload_limit, upload_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        limit = self.upload_limit if scope["path"].rstrip("/") in self.upload_paths else self.json_limit
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return await _too_large(send, limit)
        seen, started, refused = 0, False, False

        async def counted():
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    refused = True
                    if not started:
                        await _too_large(send, limit)
                    return {"type": "http.disconnect"}
            return message

        async def tracked(message):
            nonlocal started
            if refused:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, counted, tracked)


async def _too_large(send, limit: int) -> None:
    body = json.dumps(envelope(413, "body_too_large", f"The request body is larger than {limit} bytes, the limit for this endpoint.")).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
