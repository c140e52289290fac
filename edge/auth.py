"""API keys at the edge: `X-API-Key: <key>` or `Authorization: Bearer <key>` (what the OpenAI SDK sends).

Missing key → 401; unknown or revoked key → 403 (and counted against the client's address: past
`CHATTERBOT_AUTH_FAILURES_PER_IP`, 429); store_svc unreachable for a key it must look up → 503. Keys resolve
through the shared `chatterbot.api_keys.KeyResolver` (static keys from settings, else store_svc by hash, cached
for a few seconds). Then the key's rate limits are counted (`edge.rate_limits`).

What a key may do: a user key acts only for its own `user_id` (403 otherwise: routes call `check_user` or
`authorize_turn`); service keys act for any user; admin keys also reach `/debug/*` (`require_admin`).
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

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


async def require_key(
    request: Request,
    x_api_key: str | None = Security(api_key_header),
    bearer: HTTPAuthorizationCredentials | None = Security(bearer_scheme),
) -> Caller:
    """FastAPI dependency: the authenticated caller, counted against its rate limits."""
    key = x_api_key or (bearer.credentials if bearer else None)
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
