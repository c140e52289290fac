"""Monthly partitions of `messages`, created ahead of time by `messages_ensure_partitions` (migration 0002)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import asyncpg

log = logging.getLogger(__name__)

# PostgreSQL's words for an insert whose created_at falls in no partition (SQLSTATE 23514, check_violation).
_NO_PARTITION = "no partition of relation"


async def ensure_partitions(executor: asyncpg.Pool | asyncpg.Connection, months_ahead: int) -> int:
    """Create the partitions from this month to `months_ahead` months on; return how many were new."""
    return await executor.fetchval("SELECT messages_ensure_partitions($1)", months_ahead)


def is_missing_partition(exc: asyncpg.exceptions.CheckViolationError) -> bool:
    """Whether a check violation means "no partition for this row" rather than a real CHECK failing."""
    return _NO_PARTITION in str(exc)


async def keep_partitions_ahead(ensure: Callable[[], Awaitable[int]], interval_seconds: float) -> None:
    """Run `ensure` now and then every `interval_seconds`, until cancelled; failures are retried next time."""
    while True:
        try:
            created = await ensure()
            if created:
                log.info("created %d message partitions", created)
        except Exception:
            log.warning("creating message partitions failed; will retry", exc_info=True)
        await asyncio.sleep(interval_seconds)
