"""`GET /whoami`: what the caller's key is, so that a client (the chat page) knows whom it may act for."""

from __future__ import annotations

from typing import cast

from fastapi import APIRouter, Depends, Request

from chatterbot.api_keys import USER
from edge.auth import Caller, require_key
from edge.browser_protocol import KeyKind, LimitsInForce, WhoAmI
from edge.rate_limits import RateLimits
from edge.routes.chat import ERRORS

router = APIRouter(tags=["keys"])


def limits_in_force(rate_limits: RateLimits, caller: Caller) -> LimitsInForce:
    """What the edge counts for `caller`, in the words of the limits library (`20 per 1 minute`)."""
    principal = caller.principal
    counted = rate_limits.storage is not None and (rate_limits.limit_static_keys or not principal.static)
    return LimitsInForce(
        counted=counted,
        requests_per_minute=principal.requests_per_minute or None,
        tokens_per_minute=principal.tokens_per_minute or None,
        routes={
            route: [str(item) for item in items] for route, items in rate_limits.limits_of(principal).items()
        },
    )


@router.get("/whoami", response_model=WhoAmI, responses={k: ERRORS[k] for k in (401, 403, 429, 503)})
async def whoami(request: Request, caller: Caller = Depends(require_key)) -> WhoAmI:
    """The key's kind, the user a user key acts for, and the limits in force for it."""
    state = request.app.state
    return WhoAmI(
        kind=cast(KeyKind, caller.kind),
        key_id=caller.principal.key_id,
        user_id=caller.user_id if caller.kind == USER else None,
        may_act_for_any_user=caller.kind != USER,
        limits=limits_in_force(state.rate_limits, caller),
        max_message_chars=state.settings.max_message_chars,
    )
