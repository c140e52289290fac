"""Errors the repository raises, and how the database's own errors become gRPC status.

The store's errors are `chatterbot.status` errors, so the shared status interceptor answers them as it answers
every service's; `database_status` is the translator `store_svc.main` registers for asyncpg's.
"""

from __future__ import annotations

import logging

import asyncpg

from chatterbot import status

log = logging.getLogger(__name__)


class StoreError(status.StatusError):
    """Base class of the store's own errors."""


class NotFound(status.NotFound, StoreError):
    """The row does not exist for this user (another user's row counts as not existing)."""


class InvalidInput(status.InvalidArgument, StoreError):
    """A request field is missing, too long or malformed."""


# The database is down, restarting, failing over or out of connections: worth a retry, maybe elsewhere.
# OSError covers refused and reset connections and timeouts (TimeoutError is an OSError); asyncpg raises
# InterfaceError for a connection or pool that has been closed under it.
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.InterfaceError,
)


def database_status(exc: BaseException) -> status.StatusError | None:
    """The status of an asyncpg (or connection) error, for `GrpcApp.error_translators`; None for others."""
    if isinstance(exc, asyncpg.exceptions.DataError):
        # Values PostgreSQL refuses (a NUL byte in text, a number out of range) are the caller's to fix.
        return status.InvalidArgument(f"rejected by the database: {exc}")
    if isinstance(exc, UNAVAILABLE_ERRORS):
        log.warning("database unavailable", extra={"error": repr(exc)})
        return status.Unavailable("database unavailable")
    return None
