"""API keys on the gRPC surface: the same keys the edge accepts, in `x-api-key` metadata."""

from __future__ import annotations

import grpc

from chatterbot.api_keys import API_KEY_METADATA, key_matches

_GUARDED_PREFIX = "/chatterbot.v1.ChatService/"


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Rejects ChatService calls without a known key; health and reflection stay open."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = keys

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[override]
        if not handler_call_details.method.startswith(_GUARDED_PREFIX):
            return await continuation(handler_call_details)
        key = dict(handler_call_details.invocation_metadata or ()).get(API_KEY_METADATA, "")
        if not key:
            return _deny(grpc.StatusCode.UNAUTHENTICATED, "missing API key (x-api-key metadata)")
        if not key_matches(key, self.keys):
            return _deny(grpc.StatusCode.PERMISSION_DENIED, "invalid API key")
        return await continuation(handler_call_details)


def _deny(code: grpc.StatusCode, details: str) -> grpc.RpcMethodHandler:
    async def abort(request, context):
        await context.abort(code, details)

    # Every guarded method takes a single request, so a unary-unary denial fits unary and streaming calls.
    return grpc.unary_unary_rpc_method_handler(abort)
