"""API keys on the gRPC surface: the keys the edge accepts, in `x-api-key` metadata, with the same rules.

`ApiKeyInterceptor` resolves the key with the shared `KeyResolver` (static keys, else store_svc by hash,
cached briefly): missing → UNAUTHENTICATED, unknown or revoked → PERMISSION_DENIED, store_svc unreachable →
UNAVAILABLE. Health and reflection stay open. The caller is then available to the servicer, which cannot see
a request's `user_id` before it is deserialized: `require_user` raises PERMISSION_DENIED for a user key that
acts for another user, and `may_act_for` lets the queued-chat methods answer NOT_FOUND for another
user's correlation id, exactly as for one that does not exist.

The edge passes its caller's key on, so chat_svc applies these rules to edge traffic too. Rate limits are
the edge's (chat_svc does not count gRPC calls).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from contextvars import ContextVar
from typing import Any

import grpc

from chatterbot.api_keys import Continuation, KeyCheckingInterceptor, KeyLookupUnavailable, Principal
from chatterbot.status import (
    PermissionDenied,
    StatusError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)

_GUARDED_PREFIX = "/chatterbot.v1.ChatService/"
# Open like health: the degradation status carries no user data, and health pages poll it.
_OPEN_METHODS = frozenset({"/chatterbot.v1.ChatService/GetStatus"})

# The caller of the call being served; set for ChatService methods only.
_caller: ContextVar[Principal | None] = ContextVar("chatterbot_caller", default=None)


def current_caller() -> Principal | None:
    return _caller.get()


def may_act_for(user_id: str) -> bool:
    """Whether the current caller may act for `user_id` (True outside an authenticated call)."""
    caller = _caller.get()
    return caller is None or caller.may_act_for(user_id)


def require_user(user_id: str) -> None:
    """Raise PermissionDenied unless the caller may act for `user_id`."""
    caller = _caller.get()
    if caller is not None and not caller.may_act_for(user_id):
        raise PermissionDenied(f"this key may act only for user_id {caller.user_id!r}")


class ApiKeyInterceptor(KeyCheckingInterceptor):
    """Rejects ChatService calls without a valid key and hands the caller to the servicer."""

    async def guard(
        self, key: str, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        method: str = handler_call_details.method
        if not method.startswith(_GUARDED_PREFIX) or method in _OPEN_METHODS:
            return await continuation(handler_call_details)
        if not key:
            return _deny(Unauthenticated("missing API key (x-api-key metadata)"))
        try:
            caller = await self.resolver.resolve(key)
        except KeyLookupUnavailable:
            return _deny(Unavailable("cannot check API keys right now", dependency="store", retry_after=1.0))
        if caller is None:
            return _deny(PermissionDenied("invalid API key"))
        handler = await continuation(handler_call_details)
        return _as_caller(handler, caller) if handler is not None else None


def _as_caller(handler: grpc.RpcMethodHandler, caller: Principal) -> grpc.RpcMethodHandler:
    """The handler, run with `caller` as the current caller (each call runs in a task of its own)."""
    # The handlers of a grpc.aio server are coroutines; types-grpcio describes those of a sync server.
    if handler.unary_unary is not None:
        inner: Callable[..., Any] = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            _caller.set(caller)
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream is not None:
        stream: Callable[..., Any] = handler.unary_stream
        behaviour: Callable[..., Any]

        if inspect.isasyncgenfunction(stream):

            async def yielding(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                _caller.set(caller)
                # Closed with this one, not left to the garbage collector.
                async with aclosing(stream(request, context)) as responses:
                    async for response in responses:
                        yield response

            behaviour = yielding
        else:
            # A handler that writes with context.write() and returns nothing.
            async def writing(request: Any, context: grpc.aio.ServicerContext) -> Any:
                _caller.set(caller)
                return await stream(request, context)

            behaviour = writing

        return grpc.unary_stream_rpc_method_handler(
            behaviour,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    # ChatService has no client-streaming methods; should one appear, it must be taught here first.
    return _deny(Unimplemented("this method is not available with API keys"))


def _deny(error: StatusError) -> grpc.RpcMethodHandler:
    """A handler that raises `error`: the status interceptor, outside this one, answers it."""

    async def deny(request: Any, context: grpc.aio.ServicerContext) -> Any:
        raise error

    # Every guarded method takes a single request, so a unary-unary denial fits unary and streaming calls.
    return grpc.unary_unary_rpc_method_handler(deny)
