"""API keys at the edge: `X-API-Key: <key>` or `Authorization: Bearer <key>` (what the OpenAI SDK sends).

Missing key → 401; unknown or revoked key → 403 (and counted against the client's address: past
`CHATTERBOT_AUTH_FAILURES_PER_IP`, 429); store_svc unreachable for a key it must look up → 503. Keys resolve
through the shared `chatterbot.api_keys.KeyResolver` (static keys from settings, else store_svc by hash, cached
for a few seconds). Then the key's rate limits are counted (`edge.rate_limits`).

What a key may do: a user key acts only for its own `user_id` (403 otherwise: routes call `check_user` or
`authorize_turn`); service keys act for any user; admin keys also reach `/debug/*` (`require_admin`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.dependencies.models import Dependant
from fastapi.encoders import jsonable_encoder
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader, HTTPBearer

from chatterbot.api_keys import KeyLookupUnavailable, Principal
from edge.problems import ProblemError

api_key_header = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="An API key (user, service or admin)"
)
bearer_scheme = HTTPBearer(
    auto_error=False, description="The same API key as a bearer token (OpenAI clients)"
)


@dataclass(frozen=True, slots=True)
class Caller:
    """The authenticated caller: its key (passed on to chat_svc) and what the key may do."""

    key: str
    principal: Principal

    @property
    def admin(self) -> bool:
        return self.principal.admin

    @property
    def kind(self) -> str:
        return self.principal.kind

    @property
    def user_id(self) -> str:
        """The one user a user key acts for; "" for service and admin keys."""
        return self.principal.user_id


def presented_key(request: Request) -> str | None:
    """The key a request sends, read as `api_key_header` and `bearer_scheme` read it: `X-API-Key`, else the
    token of an `Authorization: Bearer` header."""
    key = request.headers.get("x-api-key")
    if key:
        return key
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    return token if token and scheme.lower() == "bearer" else None


async def require_key(request: Request) -> Caller:
    """FastAPI dependency: the authenticated caller, counted against its rate limits.

    It reads the key's headers itself: the two security dependencies that would read them cost a request a
    tenth of the edge's work. `document_key_security` names both schemes on its routes in the OpenAPI
    document, as those dependencies would."""
    return await authenticate(request, presented_key(request))


async def authenticate(request: Request, key: str | None) -> Caller:
    """The caller of `key` (401 when there is none), counted against its rate limits."""
    if not key:
        raise ProblemError(
            401,
            "missing API key: send it in the X-API-Key header or as a bearer token",
            {"WWW-Authenticate": 'Bearer realm="chatterbot", ApiKey'},
        )
    state = request.app.state
    known, principal = state.keys.peek(key)
    if not known:
        # Only keys that need a store lookup are held back here, so a blocked address cannot keep the
        # store busy; known keys pass or fail without it.
        await state.rate_limits.auth_blocked(request)
        try:
            principal = await state.keys.resolve(key)
        except KeyLookupUnavailable:
            raise ProblemError(
                503, "cannot check API keys right now; retry later", {"Retry-After": "1"}
            ) from None
    if principal is None:
        await state.rate_limits.auth_failed(request)
        raise ProblemError(403, "invalid API key")
    await state.rate_limits.admit(request, principal)
    return Caller(key, principal)


async def require_admin(caller: Caller = Depends(require_key)) -> Caller:
    """FastAPI dependency: an admin key (403 for any other key)."""
    if not caller.admin:
        raise ProblemError(403, "this route needs an admin key")
    return caller


def check_user(caller: Caller, user_id: str) -> None:
    """403 unless the caller may act for `user_id` (a user key only for its own)."""
    if not caller.principal.may_act_for(user_id):
        raise ProblemError(403, f"this key may act only for user_id {caller.user_id!r}")


async def authorize_turn(request: Request, caller: Caller, user_id: str, max_tokens: int) -> None:
    """Before a chat turn: the caller may act for `user_id`, and its token budget has `max_tokens` left."""
    check_user(caller, user_id)
    await request.app.state.rate_limits.charge_tokens(request, caller.principal, max_tokens)


def _takes_a_key(dependant: Dependant) -> bool:
    return any(d.call is require_key or _takes_a_key(d) for d in dependant.dependencies)


def document_key_security(app: FastAPI, routers: Iterable[APIRouter]) -> None:
    """The OpenAPI document of `app` names the key's two schemes (`api_key_header`, `bearer_scheme`) on every
    operation of `routers` that takes `require_key`, as it would if that dependency declared them."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
        security: list[dict[str, list[str]]] = []
        for scheme in (api_key_header, bearer_scheme):
            schemes[scheme.scheme_name] = jsonable_encoder(scheme.model, by_alias=True, exclude_none=True)
            security.append({scheme.scheme_name: []})
        for router in routers:
            for route in router.routes:
                if isinstance(route, APIRoute) and route.include_in_schema and _takes_a_key(route.dependant):
                    for method in route.methods or ():
                        schema["paths"][route.path_format][method.lower()].setdefault("security", security)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
