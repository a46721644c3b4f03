"""One error envelope for every 4xx and 5xx: `{"error": {"type", "code", "message", "param"}}`."""

from __future__ import annotations

from typing import Any

import redis.exceptions
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

# error.type by HTTP status, as OpenAI's API names them.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    406: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


class APIError(Exception):
    def __init__(self, status: int, code: str, message: str, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.param, self.headers = status, code, message, param, headers


def not_found(job_id: str) -> APIError:
    return APIError(404, "job_not_found", f"No job with id {job_id!r}.", "id")


def envelope(status: int, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    kind = _TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    return {"error": {"type": kind, "code": code, "message": message, "param": param}}


def error_response(status: int, code: str, message: str, param: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(envelope(status, code, message, param), status_code=status, headers=headers)


def _loc_to_param(loc: tuple | list) -> str | None:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    return ".".join(parts) or None


def validation_message(errors: list[dict[str, Any]], what: str) -> tuple[str, str | None]:
    """One line naming each field at fault, and the first field's path as `param`."""
    lines = []
    for e in errors:
        param = _loc_to_param(e.get("loc", ())) or "<body>"
        msg = "unknown field" if e.get("type") == "extra_forbidden" else e.get("msg", "invalid")
        lines.append(f"{param}: {msg}")
    first = _loc_to_param(errors[0].get("loc", ())) if errors else None
    return f"invalid {what}: " + "; ".join(lines), first


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.code, exc.message, exc.param, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = list(exc.errors())
        in_body = any(e.get("loc", ("",))[0] == "body" for e in errors)
        message, param = validation_message(errors, "job spec" if in_body else "request")
        return error_response(422, "invalid_spec" if in_body else "invalid_parameter", message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        codes = {400: "invalid_body", 404: "not_found", 405: "method_not_allowed", 401: "unauthorized"}
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"No route {request.method} {request.url.path}."
        return error_response(exc.status_code, codes.get(exc.status_code, "http_error"), message, None, getattr(exc, "headers", None))

    @app.exception_handler(redis.exceptions.ConnectionError)
    @app.exception_handler(redis.exceptions.TimeoutError)
    async def _redis_down(request: Request, exc: Exception):
        return error_response(503, "redis_unavailable", f"Redis is unreachable: {exc}", None, {"Retry-After": "5"})
