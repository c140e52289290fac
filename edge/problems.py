"""Errors as RFC 9457 problem responses, and downstream gRPC failures mapped to HTTP."""

from __future__ import annotations

import math
from http import HTTPStatus

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from chatterbot.breaker import CircuitOpenError
from chatterbot.guarded_client import retry_after_of
from edge.responses import JSONBytesResponse

PROBLEM_MEDIA_TYPE = "application/problem+json"


class ProblemError(Exception):
    """Raise to answer with a problem response."""

    def __init__(self, status: int, detail: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or {}


def problem_response(
    status: int,
    detail: str | None = None,
    headers: dict[str, str] | None = None,
    errors: list[dict] | None = None,
) -> JSONBytesResponse:
    body: dict = {"type": "about:blank", "title": HTTPStatus(status).phrase, "status": status}
    if detail:
        body["detail"] = detail
    if errors is not None:
        body["errors"] = errors
    return JSONBytesResponse(body, status_code=status, headers=headers, media_type=PROBLEM_MEDIA_TYPE)


def _retry_after_header(seconds: float | None) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds or 1)))}


def problem_for_downstream(exc: BaseException) -> ProblemError:
    """The HTTP answer for a failed call to chat_svc."""
    if isinstance(exc, CircuitOpenError):
        return ProblemError(
            503, f"{exc.target} is unavailable; retry later", _retry_after_header(exc.retry_after)
        )
    if isinstance(exc, grpc.aio.AioRpcError):
        code, details = exc.code(), exc.details() or None
        if code == grpc.StatusCode.UNAVAILABLE:
            return ProblemError(
                503, details or "service unavailable; retry later", _retry_after_header(retry_after_of(exc))
            )
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return ProblemError(
                503, details or "overloaded; retry later", _retry_after_header(retry_after_of(exc))
            )
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return ProblemError(504, details or "the answer took too long")
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return ProblemError(422, details)
        if code == grpc.StatusCode.NOT_FOUND:
            return ProblemError(404, details)
        if code == grpc.StatusCode.PERMISSION_DENIED:
            return ProblemError(403, details)
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return ProblemError(401, details)
        return ProblemError(502, f"upstream failed: {code.name}")
    raise exc


def install_problem_handlers(app: FastAPI) -> None:
    """Every error leaves the edge as a problem body, validation errors as 422."""

    @app.exception_handler(ProblemError)
    async def _problem(request: Request, exc: ProblemError):
        return problem_response(exc.status, exc.detail, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        return problem_response(422, "the request body is not valid", errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return problem_response(
            exc.status_code,
            exc.detail if isinstance(exc.detail, str) else None,
            getattr(exc, "headers", None),
        )
