"""Stream tickets: how an `EventSource`, which cannot send headers, opens a queued stream.

`POST /stream-chat` and `POST /async-chat` answer with a `stream_endpoint` of the form
`/stream/{correlation_id}?ticket=<expiry>.<key id>.<signature>`: an HMAC-SHA256, with the edge's secret, of the
correlation id, the id of the key that submitted the turn and the expiry (Unix seconds,
`CHATTERBOT_STREAM_TICKET_SECONDS` ahead). Until it expires the ticket opens that stream, and no other, as
often as asked (an `EventSource` reopens the same URL after a drop); after that it is answered 401 and the
client asks for a new one with its key (`POST /stream/{correlation_id}/ticket`). The key itself never
travels in a URL.

A ticket stands in for the key on its one stream: opening it calls no service, and is not counted against
the key's rate limits (the turn it watches was). A revoked key's ticket still works until it expires.

The secret is `CHATTERBOT_STREAM_TICKET_SECRET` when set, else one made by the first edge and kept in Redis, so
that every edge replica (and every process of `chatterbot up`) accepts the tickets of the others.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis.exceptions
from fastapi import Query, Request, Security
from fastapi.security import HTTPAuthorizationCredentials

from chatterbot.redis_client import redis_client
from chatterbot.settings import Settings
from edge.auth import Caller, api_key_header, authenticate, bearer_scheme
from edge.problems import ProblemError

log = logging.getLogger(__name__)

SECRET_REDIS_KEY = "chatterbot:stream-ticket-secret"
REDIS_TIMEOUT_SECONDS = 1.0
_VERSION = b"chatterbot-stream-ticket-v1"
_UNAUTHORIZED = {"WWW-Authenticate": 'Bearer realm="chatterbot", ApiKey'}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True, slots=True)
class Ticket:
    """A valid ticket: the stream it opens and the key that was handed it."""

    correlation_id: str
    key_id: str
    expires: int


class StreamTickets:
    """Issues and checks tickets with one secret."""

    def __init__(self, secret: bytes, lifetime_seconds: int, clock: Callable[[], float] = time.time) -> None:
        self._secret = secret
        self.lifetime_seconds = lifetime_seconds
        self._clock = clock

    def _signature(self, correlation_id: str, key_id: str, expires: int) -> bytes:
        message = b"\n".join((_VERSION, correlation_id.encode(), key_id.encode(), str(expires).encode()))
        return hmac.new(self._secret, message, hashlib.sha256).digest()

    def issue(self, correlation_id: str, key_id: str) -> str:
        """A ticket to the stream of `correlation_id` for the key `key_id`."""
        expires = int(self._clock()) + self.lifetime_seconds
        signature = self._signature(correlation_id, key_id, expires)
        return f"{expires}.{_b64(key_id.encode())}.{_b64(signature)}"

    def endpoint(self, correlation_id: str, key_id: str) -> str:
        """The `stream_endpoint` to hand out: the stream's path with a fresh ticket."""
        return f"/stream/{correlation_id}?ticket={self.issue(correlation_id, key_id)}"

    def check(self, ticket: str, correlation_id: str) -> Ticket:
        """The ticket if it opens `correlation_id`'s stream now; a 401 ProblemError otherwise."""
        try:
            expires_text, key_text, signature_text = ticket.split(".")
            expires = int(expires_text)
            key_id = _unb64(key_text).decode()
            signature = _unb64(signature_text)
        except (ValueError, binascii.Error, UnicodeDecodeError):
            raise ProblemError(401, "this stream ticket is not valid", _UNAUTHORIZED) from None
        if not hmac.compare_digest(signature, self._signature(correlation_id, key_id, expires)):
            raise ProblemError(401, "this stream ticket is not valid for this stream", _UNAUTHORIZED)
        if self._clock() >= expires:
            raise ProblemError(
                401,
                f"this stream ticket has expired; ask POST /stream/{correlation_id}/ticket for a new one",
                _UNAUTHORIZED,
            )
        return Ticket(correlation_id, key_id, expires)


async def ticket_secret(settings: Settings) -> bytes:
    """The secret tickets are signed with: the configured one, else the one all edges share in Redis."""
    if settings.stream_ticket_secret:
        return settings.stream_ticket_secret.encode()
    if settings.redis_configured():
        client = redis_client(settings, timeout=REDIS_TIMEOUT_SECONDS)
        try:
            # The first edge makes it; every other one (now or later) reads the same value.
            await client.set(SECRET_REDIS_KEY, secrets.token_urlsafe(32), nx=True)
            shared = await client.get(SECRET_REDIS_KEY)
            if shared:
                return shared.encode() if isinstance(shared, str) else shared
        except (redis.exceptions.RedisError, OSError) as exc:
            log.warning("cannot read the shared stream ticket secret from Redis: %s", type(exc).__name__)
        finally:
            await client.aclose()
    log.warning(
        "stream tickets are signed with a secret of this process only: other edge processes refuse them "
        "(set CHATTERBOT_STREAM_TICKET_SECRET, or CHATTERBOT_REDIS_URL or CHATTERBOT_REDIS_SENTINELS)"
    )
    return secrets.token_bytes(32)


async def stream_reader(
    request: Request,
    correlation_id: str,
    ticket: str | None = Query(
        None,
        max_length=512,
        description="The ticket of a `stream_endpoint`, for clients that cannot send a key",
    ),
    x_api_key: str | None = Security(api_key_header),
    bearer: HTTPAuthorizationCredentials | None = Security(bearer_scheme),
) -> Caller | Ticket:
    """FastAPI dependency of a stream route: the caller of a key, when one is sent, else a valid ticket."""
    if x_api_key or bearer or ticket is None:
        return await authenticate(request, x_api_key or (bearer.credentials if bearer else None))
    tickets: StreamTickets = request.app.state.tickets
    return tickets.check(ticket, correlation_id)
