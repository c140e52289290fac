"""How chat_svc's own failures become gRPC status: the translator `chat_svc.main` (and the worker's health
server) registers with the shared interceptor (`chatterbot.status`).

Failed calls to context, inference and store need none: the interceptor passes them on, naming the client's
target as the failing dependency.
"""

from __future__ import annotations

import nats.errors

from chat_svc.degradation import Shed
from chatterbot import status

# How long a caller waits before trying the job queue again.
NATS_RETRY_AFTER_SECONDS = 1.0


def chat_status(exc: BaseException) -> status.StatusError | None:
    """The status of a shed turn or a failed job-queue call; None for anything else."""
    if isinstance(exc, Shed):
        return status.Unavailable(
            f"shedding load: {exc}", dependency="inference", retry_after=exc.retry_after
        )
    if isinstance(exc, nats.errors.Error):
        return status.Unavailable(
            f"job queue unavailable: {type(exc).__name__}",
            dependency="nats",
            retry_after=NATS_RETRY_AFTER_SECONDS,
        )
    return None
