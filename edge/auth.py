"""API keys at the edge: `X-API-Key` (missing → 401, unknown → 403)."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request
from fastapi.security import APIKeyHeader

from chatterbot.api_keys import key_matches
from edge.problems import ProblemError

api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="A service or admin API key")


@dataclass(frozen=True)
class Caller:
    key: str
    admin: bool


async def require_key(request: Request) -> Caller:
    """FastAPI dependency: the authenticated caller."""
    key = await api_key_header(request)
    if not key:
        raise ProblemError(401, "missing API key: send it in the X-API-Key header", {"WWW-Authenticate": "ApiKey"})
    settings = request.app.state.settings
    if key_matches(key, settings.admin_keys):
        return Caller(key, admin=True)
    if key_matches(key, settings.api_keys):
        return Caller(key, admin=False)
    raise ProblemError(403, "invalid API key")


async def require_admin(request: Request) -> Caller:
    """FastAPI dependency: an admin key (403 for any other key)."""
    caller = await require_key(request)
    if not caller.admin:
        raise ProblemError(403, "this route needs an admin key")
    return caller
