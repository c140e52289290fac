"""Components in one process call each other in process: the same stubs and messages, no socket, no bytes.

A service that runs in this process registers its servicers here as a `LocalServer` (the same servicers and
interceptors its grpc.aio server carries); a `GuardedClient` whose target is registered gets a
`LocalChannel` instead of a network channel. The generated stub works on it unchanged, so callers, the
breaker and the retries see what they see over gRPC:

- the request message reaches the handler as is, and the handler's response comes back as is;
- every call runs the server's interceptor chain (metrics, status, authentication), so a failure arrives as
  a `grpc.aio.AioRpcError` with the code, details and trailing metadata the server would have sent;
- the deadline bounds the handler (DEADLINE_EXCEEDED when it passes), and a caller that is cancelled, or
  leaves a stream early, cancels the handler, which runs in the caller's task (so context variables a
  handler sets are set in its caller's context too: the mesh's handlers set them for their own use only).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, NamedTuple, cast

import grpc

Metadata = Sequence[tuple[str, str | bytes]]

_servers: dict[str, LocalServer] = {}


def register(target: str, server: LocalServer) -> None:
    """Serve `target` (a guarded client's target name: "store", "chat", ...) in process from now on."""
    _servers[target] = server


def unregister(target: str) -> None:
    _servers.pop(target, None)


def local_server(target: str) -> LocalServer | None:
    """The in-process server of `target`, if this process runs it."""
    return _servers.get(target)


class _CallDetails(NamedTuple):
    method: str
    invocation_metadata: tuple[tuple[str, str | bytes], ...]


class LocalServer:
    """The method handlers of one component's servicers, behind that component's server interceptors.

    It stands in for the `grpc.aio.Server` that generated `add_XServicer_to_server` functions register on.
    """

    def __init__(self, interceptors: Sequence[grpc.aio.ServerInterceptor] = ()) -> None:
        self._interceptors = tuple(interceptors)
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    # What generated code calls on a server.
    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        # Generated code registers each service twice: generically and by method; the latter is enough.
        return None

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        for name, handler in method_handlers.items():
            self._handlers[f"/{service_name}/{name}"] = handler

    async def handler(self, method: str, metadata: Metadata) -> grpc.RpcMethodHandler | None:
        """The handler of one call, as the interceptors shape it for this call's metadata."""
        details = _CallDetails(method, tuple(metadata))

        async def found(_: Any) -> grpc.RpcMethodHandler | None:
            return self._handlers.get(method)

        continuation: Callable[[Any], Awaitable[grpc.RpcMethodHandler | None]] = found
        for interceptor in reversed(self._interceptors):
            continuation = _bind(interceptor, continuation)
        return await continuation(details)


def _bind(
    interceptor: grpc.aio.ServerInterceptor,
    continuation: Callable[[Any], Awaitable[grpc.RpcMethodHandler | None]],
) -> Callable[[Any], Awaitable[grpc.RpcMethodHandler | None]]:
    async def intercepted(details: Any) -> grpc.RpcMethodHandler | None:
        return await interceptor.intercept_service(continuation, details)

    return intercepted


class LocalContext:
    """The part of `grpc.aio.ServicerContext` the mesh's handlers and interceptors use."""

    def __init__(self, metadata: Metadata, deadline: float | None) -> None:
        self._metadata = tuple(metadata)
        self._deadline = deadline
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self._trailing: tuple[tuple[str, str | bytes], ...] = ()
        self._done = False

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Metadata = ()) -> None:
        self._code, self._details = code, details
        if trailing_metadata:
            self._trailing = tuple(trailing_metadata)
        raise grpc.aio.AbortError()

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str:
        return self._details

    def set_trailing_metadata(self, trailing_metadata: Metadata) -> None:
        self._trailing = tuple(trailing_metadata)

    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._trailing

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._metadata

    async def send_initial_metadata(self, initial_metadata: Metadata) -> None:
        return None

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def peer(self) -> str:
        return "local"

    def cancelled(self) -> bool:
        return False

    def done(self) -> bool:
        return self._done

    def error(self) -> grpc.aio.AioRpcError | None:
        """The error this call ended with, if it did not end OK."""
        if self._code is None or self._code == grpc.StatusCode.OK:
            return None
        return rpc_error(self._code, self._details, self._trailing)


def rpc_error(code: grpc.StatusCode, details: str, trailing: Metadata = ()) -> grpc.aio.AioRpcError:
    """The error a caller sees for a call that ended with `code`, as over the network."""
    return grpc.aio.AioRpcError(
        code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing), details=details, debug_error_string="local"
    )


def _deadline_of(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _unexpected(exc: BaseException) -> grpc.aio.AioRpcError:
    # What grpc.aio answers for an exception no interceptor turned into a status.
    return rpc_error(grpc.StatusCode.UNKNOWN, f"Unexpected {type(exc).__name__}: {exc}")


def _call_error(context: LocalContext, exc: Exception) -> grpc.aio.AioRpcError:
    """The error the caller sees for a handler that raised `exc`, as the network path would answer it."""
    if isinstance(exc, grpc.aio.AbortError):
        return context.error() or _unexpected(RuntimeError("aborted without a status"))
    if isinstance(exc, TimeoutError):
        # Only the call's own deadline raises it here: handlers' timeouts are answered by the status guard.
        return rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
    # A handler that set its code before raising (the generated base classes do) ends with that code.
    return context.error() or _unexpected(exc)


class _LocalMethod:
    def __init__(self, server: LocalServer, method: str) -> None:
        self._server = server
        # Named like grpc's multicallables' attribute, which `guarded_client.method_name` reads.
        self._method = method.encode()
        self.method = method

    async def _handler(self, metadata: Metadata | None) -> grpc.RpcMethodHandler:
        handler = await self._server.handler(self.method, metadata or ())
        if handler is None:
            raise rpc_error(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        return handler


class LocalUnaryUnary(_LocalMethod):
    def __call__(
        self, request: Any, *, timeout: float | None = None, metadata: Metadata | None = None, **_: Any
    ) -> Awaitable[Any]:
        return self._invoke(request, timeout, metadata)

    async def _invoke(self, request: Any, timeout: float | None, metadata: Metadata | None) -> Any:
        context = LocalContext(metadata or (), _deadline_of(timeout))
        handler = await self._handler(metadata)
        behaviour = handler.unary_unary
        if behaviour is None:
            raise rpc_error(grpc.StatusCode.UNIMPLEMENTED, f"{self.method} is not a unary method")
        try:
            async with asyncio.timeout(timeout):
                response = await behaviour(request, cast(Any, context))
        except grpc.aio.AioRpcError:
            raise
        except Exception as exc:
            raise _call_error(context, exc) from exc
        finally:
            context._done = True
        error = context.error()
        if error is not None:
            raise error
        return response


class LocalStreamCall:
    """A server-streaming call in process: iterate it; `aclose()` (or leaving it) cancels the handler."""

    def __init__(self, method: _LocalMethod, request: Any, timeout: float | None, metadata: Metadata) -> None:
        self._method = method
        self._request = request
        self._timeout = timeout
        self._metadata = metadata
        self._responses: AsyncGenerator[Any, None] = self._run()

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._responses

    def cancel(self) -> bool:
        # grpc's cancel() is synchronous; in process the handler is stopped by `aclose()`.
        return False

    async def aclose(self) -> None:
        await self._responses.aclose()

    async def _run(self) -> AsyncGenerator[Any, None]:
        deadline = _deadline_of(self._timeout)
        context = LocalContext(self._metadata, deadline)
        handler = await self._method._handler(self._metadata)
        behaviour: Callable[..., Any] | None = handler.unary_stream
        if behaviour is None and handler.unary_unary is not None:
            # A unary handler for a streaming method (a denial raised before any answer): gRPC runs it too.
            behaviour = _one_message(handler.unary_unary)
        if behaviour is None:
            raise rpc_error(grpc.StatusCode.UNIMPLEMENTED, f"{self._method.method} is not a streaming method")
        try:
            responses = behaviour(self._request, cast(Any, context))
        except Exception as exc:
            # A synchronous handler that failed at once (a generated base class method sets its code first).
            raise _call_error(context, exc) from exc
        if not inspect.isasyncgen(responses):
            # A handler that writes with context.write(); none of the mesh's services has one.
            if inspect.iscoroutine(responses):
                responses.close()
            raise rpc_error(grpc.StatusCode.UNIMPLEMENTED, "writer-style streams are not served in process")
        loop_deadline = None if self._timeout is None else asyncio.get_running_loop().time() + self._timeout
        try:
            while True:
                try:
                    async with asyncio.timeout_at(loop_deadline):
                        response = await anext(responses)
                except StopAsyncIteration:
                    break
                yield response
        except grpc.aio.AioRpcError:
            raise
        except Exception as exc:
            raise _call_error(context, exc) from exc
        finally:
            context._done = True
            await responses.aclose()
        error = context.error()
        if error is not None:
            raise error


def _one_message(unary: Callable[..., Any]) -> Callable[..., AsyncGenerator[Any, None]]:
    async def stream(request: Any, context: Any) -> AsyncGenerator[Any, None]:
        yield await unary(request, context)

    return stream


class LocalUnaryStream(_LocalMethod):
    def __call__(
        self, request: Any, *, timeout: float | None = None, metadata: Metadata | None = None, **_: Any
    ) -> LocalStreamCall:
        return LocalStreamCall(self, request, timeout, metadata or ())


class _Unsupported(_LocalMethod):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise rpc_error(grpc.StatusCode.UNIMPLEMENTED, "client-streaming calls are not served in process")


class LocalChannel:
    """What a generated stub needs of a channel, answered by a `LocalServer`."""

    def __init__(self, server: LocalServer) -> None:
        self._server = server

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> LocalUnaryUnary:
        return LocalUnaryUnary(self._server, method)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> LocalUnaryStream:
        return LocalUnaryStream(self._server, method)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> _Unsupported:
        return _Unsupported(self._server, method)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> _Unsupported:
        return _Unsupported(self._server, method)

    async def close(self, grace: float | None = None) -> None:
        return None


__all__ = [
    "LocalChannel",
    "LocalContext",
    "LocalServer",
    "LocalStreamCall",
    "local_server",
    "register",
    "rpc_error",
    "unregister",
]
