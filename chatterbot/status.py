"""One way to turn failures into gRPC status, for every servicer.

Servicers and the plain functions behind them raise; they do not call `context.abort`. `StatusInterceptor`
(installed by the bootstrap on every server) answers each exception once:

- a `StatusError` (`InvalidArgument`, `NotFound`, `Unavailable`, ...) carries its own code, details and
  trailing metadata;
- a failed call to another service (`CircuitOpenError`, `grpc.aio.AioRpcError` from a `GuardedClient`) is
  passed on by `downstream_status`: business codes unchanged, failures as UNAVAILABLE that blame the
  dependency (so this server's own callers neither retry it nor count it against this server's breaker);
- each service adds translators for the exceptions of its own libraries (asyncpg, redis, nats, engines);
- anything else is logged with its traceback and becomes INTERNAL.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from chatterbot.breaker import CircuitOpenError
from chatterbot.guarded_client import dependency_unavailable_metadata, retry_after_of, target_of

log = logging.getLogger(__name__)

Metadata = tuple[tuple[str, str], ...]


class StatusError(Exception):
    """An error that ends the call with `code`; its message is the status details."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str, *, metadata: Metadata = ()) -> None:
        super().__init__(details)
        self.details = details
        self.metadata = metadata


class InvalidArgument(StatusError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(StatusError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(StatusError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(StatusError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(StatusError):
    code = grpc.StatusCode.UNAUTHENTICATED


class FailedPrecondition(StatusError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(StatusError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(StatusError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unavailable(StatusError):
    """UNAVAILABLE; with `dependency`, the trailers say that dependency failed, not this server."""

    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, details: str, *, dependency: str = "", retry_after: float = 1.0) -> None:
        super().__init__(
            details, metadata=dependency_unavailable_metadata(dependency, retry_after) if dependency else ()
        )
        self.dependency = dependency
        self.retry_after = retry_after


# Codes a downstream answer carries that mean the request, not the mesh: passed to the caller unchanged.
PASSTHROUGH_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.OUT_OF_RANGE,
    }
)

Translator = Callable[[BaseException], StatusError | None]


def downstream_status(exc: BaseException) -> StatusError | None:
    """The status a failed call to another service deserves, or None if `exc` is not one."""
    if isinstance(exc, CircuitOpenError):
        return Unavailable(
            f"{exc.target} is unavailable (circuit open)", dependency=exc.target, retry_after=exc.retry_after
        )
    if not isinstance(exc, grpc.aio.AioRpcError):
        return None
    code = exc.code()
    if code in PASSTHROUGH_CODES:
        error = StatusError(exc.details() or "")
        error.code = code
        return error
    dependency = target_of(exc) or "a dependency"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"{dependency} timed out")
    return Unavailable(
        f"{dependency} failed: {code.name}",
        dependency=target_of(exc) or "dependency",
        retry_after=retry_after_of(exc) or 1.0,
    )


def status_of(exc: BaseException, translators: Sequence[Translator] = ()) -> StatusError | None:
    """The StatusError that answers `exc`, or None when nothing knows it."""
    if isinstance(exc, StatusError):
        return exc
    for translate in (*translators, downstream_status):
        error = translate(exc)
        if error is not None:
            return error
    return None


class StatusInterceptor(grpc.aio.ServerInterceptor):
    """Ends every call that raised with the status `status_of` gives it (INTERNAL when none)."""

    def __init__(self, translators: Sequence[Translator] = ()) -> None:
        self.translators = tuple(translators)

    async def _abort(self, exc: Exception, context: grpc.aio.ServicerContext, method: str) -> None:
        error = status_of(exc, self.translators)
        if error is None:
            log.exception("unhandled error", extra={"method": method})
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")
            return
        await context.abort(error.code, error.details, trailing_metadata=error.metadata)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    return await inner(request, context)
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:
                    await self._abort(exc, context, method)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream:
            inner_stream = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    async for response in inner_stream(request, context):
                        yield response
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:
                    await self._abort(exc, context, method)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, handler.request_deserializer, handler.response_serializer
            )
        return handler


__all__ = [
    "PASSTHROUGH_CODES",
    "AlreadyExists",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "StatusError",
    "StatusInterceptor",
    "Translator",
    "Unauthenticated",
    "Unavailable",
    "downstream_status",
    "status_of",
]
