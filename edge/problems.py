"""Errors as RFC 9457 problem responses, and downstream gRPC failures mapped to HTTP."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Sequence
from http import HTTPStatus
from typing import Any, TypeVar

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from chatterbot import wire
from chatterbot.breaker import CircuitOpenError
from chatterbot.guarded_client import retry_after_of
from edge.protocol import UNSTORABLE_TEXT, FieldError, Problem
from edge.responses import ModelResponse

PROBLEM_MEDIA_TYPE = "application/problem+json"
T = TypeVar("T")


class ProblemError(Exception):
    """Raise to answer with a problem response."""

    def __init__(
        self,
        status: int,
        detail: str | None = None,
        headers: dict[str, str] | None = None,
        param: str | None = None,
    ) -> None:
        """`param`: the request parameter to blame, where one is (the OpenAI routes name it in their errors)."""
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or {}
        self.param = param


def render_problem(problem: Problem, headers: dict[str, str] | None = None) -> ModelResponse:
    """`problem` as a response with its status."""
    return ModelResponse(problem, status_code=problem.status, headers=headers, media_type=PROBLEM_MEDIA_TYPE)


def problem_response(
    status: int,
    detail: str | None = None,
    headers: dict[str, str] | None = None,
    errors: list[FieldError] | None = None,
) -> Response:
    """A problem response; `detail` (when not empty) and `errors` (when given) are sent."""
    problem = Problem(title=HTTPStatus(status).phrase, status=status, detail=detail or None, errors=errors)
    return render_problem(problem, headers)


# pydantic's JSON parser refuses a string with a lone surrogate escape ("\ud800") before any validator runs.
_NOT_UNICODE = "string_unicode"
_NOT_UNICODE_MSG = "is not valid Unicode: lone surrogate (a \\uD800-\\uDFFF escape without its pair)"
# Error types whose message is written to follow the field's name: `message must not contain ...`.
_AFTER_NAME = frozenset({UNSTORABLE_TEXT, _NOT_UNICODE})


def field_errors(errors: Sequence[Any]) -> list[FieldError]:
    """The errors of a RequestValidationError as problem `errors`; `Value error, ` prefixes dropped."""
    return [
        FieldError(
            loc=list(e.get("loc", ())),
            msg=_NOT_UNICODE_MSG
            if e.get("type") == _NOT_UNICODE
            else str(e.get("msg", "")).removeprefix("Value error, "),
            type=str(e.get("type", "")),
        )
        for e in errors
    ]


def field_name(error: FieldError) -> str:
    """The dotted path of the field an error is about (`messages.0.content`), without the `body` part."""
    loc = [str(part) for part in error.loc]
    return ".".join(loc[1:]) if loc[:1] == ["body"] else ".".join(loc)


def describe(errors: list[FieldError], limit: int = 3) -> str:
    """A sentence naming the first `limit` invalid fields and why: `message must not contain ...`."""
    described = []
    for error in errors[:limit]:
        name = field_name(error)
        if not name:
            described.append(error.msg)
        elif error.type in _AFTER_NAME:
            described.append(f"{name} {error.msg}")
        else:
            described.append(f"{name}: {error.msg}")
    return "the request is not valid: " + "; ".join(described)


def _retry_after_header(seconds: float | None) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds or 1)))}


async def downstream(call: Awaitable[T]) -> T:
    """The result of a call to chat_svc; its failure as the ProblemError to answer with."""
    try:
        return await call
    except (CircuitOpenError, grpc.aio.AioRpcError) as exc:
        raise problem_for_downstream(exc) from None


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
            # A parameter the engine cannot honour (named by the `param` trailer) is a 400 naming it; other
            # invalid input is a 422.
            for key, value in exc.trailing_metadata() or ():
                if key == wire.PARAM_TRAILER and isinstance(value, str):
                    return ProblemError(400, details, param=value)
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
    async def _problem(request: Request, exc: ProblemError) -> Response:
        return problem_response(exc.status, exc.detail, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        errors = field_errors(exc.errors())
        return problem_response(422, describe(errors), errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        return problem_response(
            exc.status_code,
            exc.detail if isinstance(exc.detail, str) else None,
            getattr(exc, "headers", None),
        )
