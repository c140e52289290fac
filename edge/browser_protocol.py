"""Bodies of the routes a browser client leans on: who its key is, and the tickets of its streams."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

KeyKind = Literal["user", "service", "admin"]


class LimitsInForce(BaseModel):
    """The rate limits the edge counts for a key (see README, "Rate limits")."""

    counted: bool = Field(
        description="false when the edge counts nothing for this key (a static key, or no Redis)"
    )
    requests_per_minute: int | None = Field(None, description="the key's own limit across every route")
    tokens_per_minute: int | None = Field(
        None, description="the key's token budget; a turn costs its max_tokens"
    )
    routes: dict[str, list[str]] = Field(
        default_factory=dict, description="per route: its limits, e.g. `20 per 1 minute`"
    )


class WhoAmI(BaseModel):
    """Body of `GET /whoami`."""

    kind: KeyKind
    key_id: str
    user_id: str | None = Field(None, description="the one user a user key acts for; null for other keys")
    may_act_for_any_user: bool = Field(description="service and admin keys choose the user_id of each call")
    limits: LimitsInForce
    max_message_chars: int = Field(description="the longest message a turn accepts")


class StreamTicket(BaseModel):
    """Body of `POST /stream/{correlation_id}/ticket`."""

    correlation_id: str
    stream_endpoint: str = Field(description="open it as it is, with an EventSource or without a key")
    expires_in: int = Field(description="seconds the ticket in it stays valid")
    job_status: str = Field(description="pending, running, succeeded, failed or cancelled")
