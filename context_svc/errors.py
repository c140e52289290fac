"""How Redis's errors become gRPC status: the translator `context_svc.main` registers with the shared
interceptor (`chatterbot.status`)."""

from __future__ import annotations

import logging

import redis.exceptions

from chatterbot import status

log = logging.getLogger(__name__)


def redis_status(exc: BaseException) -> status.StatusError | None:
    """Redis down or timing out is UNAVAILABLE (callers answer without context), not INTERNAL; None for
    anything else."""
    if isinstance(exc, redis.exceptions.LockError):
        # Another turn of the conversation holds it for too long; the conversation is busy, Redis is not.
        log.warning("context lock not acquired", extra={"error": repr(exc)})
        return status.Unavailable(
            "conversation context is busy; retry", dependency="context-lock", retry_after=1.0
        )
    if isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)):
        log.warning("redis unavailable", extra={"error": repr(exc)})
        return status.Unavailable("context cache unavailable")
    return None
