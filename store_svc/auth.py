"""Who may manage API keys: StoreService's key RPCs answer only a caller with an admin key.

CreateApiKey, ListApiKeys, RevokeApiKey and UpdateApiKey would let anything that reaches store_svc's port mint
an admin key, lift a key's limits or revoke everyone's, so they need an admin key in the `x-api-key` metadata:
a static one (`CHATTERBOT_ADMIN_KEYS`) or one kept here (`chatterbot keys create --admin`), checked by its hash
with the shared `KeyResolver`, as the edge and chat_svc check keys. No key: UNAUTHENTICATED; an unknown,
revoked, user or service key: PERMISSION_DENIED. GetApiKey, the lookup by hash that the edge and chat_svc
make, stays open to the mesh: only a caller that holds a key can name its hash.

The check runs inside the call, behind the status interceptor, so a database that cannot be asked about an
admin key makes the call UNAVAILABLE, as any other query would.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from chatterbot.api_keys import (
    API_KEY_METADATA,
    ApiKeyRecord,
    Continuation,
    KeyCheckingInterceptor,
    KeyResolver,
    Lookup,
)
from chatterbot.status import PermissionDenied, Unauthenticated
from store_svc.errors import NotFound
from store_svc.keys import ApiKeyRepository

ADMIN_METHODS = frozenset(
    f"/chatterbot.v1.StoreService/{name}"
    for name in ("CreateApiKey", "ListApiKeys", "RevokeApiKey", "UpdateApiKey")
)


def stored_key_lookup(keys: ApiKeyRepository) -> Lookup:
    """A `Lookup` of keys in this store's own table (no hop: store_svc is where keys live)."""

    async def lookup(key_hash: bytes) -> ApiKeyRecord | None:
        try:
            return await keys.get_by_hash(key_hash)
        except NotFound:
            return None

    return lookup


async def require_admin(resolver: KeyResolver, key: str | bytes) -> None:
    """Raise Unauthenticated without a key, PermissionDenied unless `key` is a valid admin key."""
    if not key or not isinstance(key, str):
        raise Unauthenticated(f"managing API keys needs an admin key ({API_KEY_METADATA} metadata)")
    caller = await resolver.resolve(key)
    if caller is None:
        raise PermissionDenied("invalid API key")
    if not caller.admin:
        raise PermissionDenied(f"managing API keys needs an admin key, not a {caller.kind} key")


class AdminKeyInterceptor(KeyCheckingInterceptor):
    """Runs `require_admin` before each call of `ADMIN_METHODS`; every other method passes untouched."""

    async def guard(
        self, key: str, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method not in ADMIN_METHODS:
            return handler
        if handler.unary_unary is None:
            # Every key RPC is unary; one that streams must be taught here before it is served at all.
            raise TypeError(f"{handler_call_details.method} is not a unary call")
        # The handlers of a grpc.aio server are coroutines; types-grpcio describes those of a sync server.
        inner: Callable[..., Any] = handler.unary_unary
        resolver = self.resolver

        async def admin_only(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await require_admin(resolver, key)
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            admin_only,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
