"""One way to turn failures into gRPC status, for every servicer.

Servicers and the plain functions behind them raise; they do not call `context.abort`. `StatusInterceptor`
(installed by the bootstrap on every server) answers each exception once:

- a `StatusError` (`InvalidArgument`, `NotFound`, `Unavailable`, ...) carries its own code, details and
  trailing metadata;
- a failed call to another service (`CircuitOpenError`, `grpc.aio.AioRpcError` from a `GuardedClient`) is
  passed on by `downstream_status`: business codes unchanged, failures as UNAVAILABLE that blame the
  dependency (so this server's own callers neither retry it nor count it against this server's breaker);
- each service adds translators for the exceptions of its own libraries (asyncpg, redis, nats, engines);
- `NotImplementedError` (what the generated servicer base classes raise) becomes UNIMPLEMENTED;
- anything else is logged with its traceback and becomes INTERNAL.

A handler that ends the call itself (`context.abort`) and a call that is cancelled are left alone. A stream
that already sent messages and then raises ends with the status after those messages.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, aclosing
from types import TracebackType
from typing import Any

import grpc

from chatterbot import wire
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


class OutOfRange(StatusError):
    code = grpc.StatusCode.OUT_OF_RANGE


class ResourceExhausted(StatusError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(StatusError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unimplemented(StatusError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(StatusError):
    """INTERNAL for a failure the service recognises (one it does not is logged and answered INTERNAL too)."""

    code = grpc.StatusCode.INTERNAL


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
_PASSED_THROUGH: dict[grpc.StatusCode, type[StatusError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        ResourceExhausted,
        PermissionDenied,
        FailedPrecondition,
        AlreadyExists,
        OutOfRange,
    )
}
PASSTHROUGH_CODES = frozenset(_PASSED_THROUGH)

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
    passed = _PASSED_THROUGH.get(code)
    if passed is not None:
        # The parameter an engine refused stays named for the caller's caller (the edge answers 400 with it).
        kept = tuple(
            (key, value)
            for key, value in exc.trailing_metadata() or ()
            if key == wire.PARAM_TRAILER and isinstance(value, str)
        )
        return passed(exc.details() or "", metadata=kept)
    dependency = target_of(exc)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"{dependency or 'a dependency'} timed out")
    return Unavailable(
        f"{dependency or 'a dependency'} failed: {code.name}",
        dependency=dependency or "dependency",
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
    if isinstance(exc, NotImplementedError):
        return Unimplemented(str(exc) or "method not implemented")
    return None


# --- running every call of a server inside a guard ----------------------------------------------------------

# Makes the guard of one call, given its context.
Guard = Callable[[grpc.aio.ServicerContext], AbstractAsyncContextManager[None]]

_HANDLER_KINDS: tuple[tuple[str, Callable[..., Any]], ...] = (
    ("unary_unary", grpc.unary_unary_rpc_method_handler),
    ("unary_stream", grpc.unary_stream_rpc_method_handler),
    ("stream_unary", grpc.stream_unary_rpc_method_handler),
    ("stream_stream", grpc.stream_stream_rpc_method_handler),
)


def guard_handler(handler: Any, guard: Guard) -> Any:
    """`handler` (a `grpc.RpcMethodHandler`) with each call run inside `guard(context)`, whole streams included.

    Handlers are told apart the way grpc.aio does: an async generator function streams what it yields, a
    coroutine function returns its response or writes its stream with `context.write` (grpc's health Watch
    does). Synchronous handlers, which grpc.aio runs in its executor, are returned unchanged.
    """
    for kind, build in _HANDLER_KINDS:
        behaviour = getattr(handler, kind)
        if behaviour is None:
            continue
        guarded = _guarded(behaviour, guard)
        if guarded is None:
            return handler
        return build(guarded, handler.request_deserializer, handler.response_serializer)
    return handler


def _guarded(behaviour: Callable[..., Any], guard: Guard) -> Callable[..., Any] | None:
    if inspect.isasyncgenfunction(behaviour):

        async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with guard(context), aclosing(behaviour(request, context)) as responses:
                async for response in responses:
                    yield response

        return streaming
    if inspect.iscoroutinefunction(behaviour):

        async def awaiting(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with guard(context):
                return await behaviour(request, context)

        return awaiting
    return None


class GuardInterceptor(grpc.aio.ServerInterceptor):
    """A server interceptor that runs every call inside `self.guard(method, context)`."""

    def guard(self, method: str, context: grpc.aio.ServicerContext) -> AbstractAsyncContextManager[None]:
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method

        def guard(context: grpc.aio.ServicerContext) -> AbstractAsyncContextManager[None]:
            return self.guard(method, context)

        return guard_handler(handler, guard)


class StatusInterceptor(GuardInterceptor):
    """Ends every call that raised with the status `status_of` gives it (INTERNAL when none)."""

    def __init__(self, translators: Sequence[Translator] = ()) -> None:
        self.translators = tuple(translators)

    def guard(self, method: str, context: grpc.aio.ServicerContext) -> _Answering:
        return _Answering(self.translators, method, context)


class _Answering:
    """Turns the exception a call ends with into its status; `context.abort` raises AbortError in its place."""

    __slots__ = ("context", "method", "translators")

    def __init__(
        self, translators: tuple[Translator, ...], method: str, context: grpc.aio.ServicerContext
    ) -> None:
        self.translators, self.method, self.context = translators, method, context

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        # CancelledError and GeneratorExit are no Exception: a call that was given up stays given up.
        if not isinstance(exc, Exception) or isinstance(exc, grpc.aio.AbortError):
            return False
        error = status_of(exc, self.translators)
        if error is None:
            log.error("unhandled error", exc_info=exc, extra={"method": self.method})
            await self.context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")
        else:
            await self.context.abort(error.code, error.details, trailing_metadata=error.metadata)
        return False  # not reached: abort raises AbortError


__all__ = [
    "PASSTHROUGH_CODES",
    "AlreadyExists",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Guard",
    "GuardInterceptor",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ResourceExhausted",
    "StatusError",
    "StatusInterceptor",
    "Translator",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "downstream_status",
    "guard_handler",
    "status_of",
]
