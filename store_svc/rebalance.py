"""`chatterbot shards rebalance`: after the shard list grew, move the users whose shard changed.

The procedure (README, "Shards"):

1. Append the new shard's DSN to `CHATTERBOT_POSTGRES_SHARDS`, set `CHATTERBOT_POSTGRES_PREVIOUS_SHARD_COUNT`
   to the old length, and roll out store_svc: it now routes users in flight through their old shard's marker
   and lock (`store_svc.sharding`).
2. Run `chatterbot shards rebalance` (with the same settings). Safe to interrupt and to run again.
3. Set `CHATTERBOT_POSTGRES_PREVIOUS_SHARD_COUNT=0` and roll out store_svc again.

Moving one user, all in their old shard's transaction that holds the user's advisory lock exclusively (so no
store call reads or writes the user meanwhile, and the rows read are all there are):
read the user's rows → in a transaction on the new shard, delete leftovers of an interrupted attempt and copy
the rows → commit there → delete the rows on the old shard and write the move marker → commit. Interrupted
before the last commit, the user is still wholly on the old shard (the copy is a leftover the next run
replaces); after it, wholly on the new one. The progress of a run is recorded by that very state: a re-run
finds only the users not moved yet.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg

from store_svc.sharding import IS_MOVED, LOCK_USER_EXCLUSIVE, shard_of

log = logging.getLogger(__name__)

# In foreign-key order. Deleting the user cascades to conversations, and from them to messages and requests.
COLUMNS: dict[str, tuple[str, ...]] = {
    "users": ("user_id", "created_at"),
    "conversations": (
        "user_id",
        "conversation_id",
        "title",
        "created_at",
        "updated_at",
        "message_count",
        "head_digest",
    ),
    "exchange_requests": ("user_id", "request_id", "conversation_id", "created_at"),
    "messages": (
        "user_id",
        "message_id",
        "conversation_id",
        "role",
        "content",
        "token_count",
        "processing_time",
        "model",
        "request_id",
        "created_at",
        "tool_calls",
        "tool_call_id",
    ),
    "job_results": (
        "user_id",
        "correlation_id",
        "status",
        "response",
        "conversation_id",
        "processing_time",
        "error",
        "finish_reason",
        "prompt_tokens",
        "completion_tokens",
        "created_at",
        "updated_at",
        "expires_at",
    ),
}

_USERS_AFTER = """
SELECT user_id FROM users WHERE user_id > $1
UNION
SELECT user_id FROM job_results WHERE user_id > $1
ORDER BY 1
LIMIT $2
"""
_DELETE_USER = ("DELETE FROM job_results WHERE user_id = $1", "DELETE FROM users WHERE user_id = $1")
_MARK_MOVED = """
INSERT INTO shard_moves (user_id, shard_count, target_shard) VALUES ($1, $2, $3)
ON CONFLICT (user_id, shard_count) DO UPDATE SET target_shard = excluded.target_shard, moved_at = now()
"""
# A moved user's next message must get a larger id than their moved ones. The margin keeps the sequence from
# being set back by ids others draw between reading last_value and setval.
_ID_MARGIN = 100_000
_KEEP_IDS_INCREASING = f"""
SELECT setval('message_ids', $1::bigint + {_ID_MARGIN}) WHERE $1::bigint >= (SELECT last_value FROM message_ids)
"""
_OLDEST_MESSAGE = "SELECT min(created_at) FROM messages"


@dataclass
class RebalanceReport:
    shard_count: int
    scanned_users: int = 0
    moved_users: int = 0
    moved_rows: Counter[str] = field(default_factory=Counter)
    # (from, to) → users.
    moves: Counter[tuple[int, int]] = field(default_factory=Counter)
    # Users found on an old shard although a marker says they moved: rows written there by a store_svc that
    # did not know about the rebalance. They are left in place for an operator.
    stranded_users: list[str] = field(default_factory=list)
    # False when max_users stopped the run early.
    complete: bool = True


async def rebalance(
    dsns: list[str],
    *,
    concurrency: int = 4,
    batch_size: int = 500,
    max_users: int | None = None,
    partitions_ahead_months: int = 3,
    on_move: Callable[[str, int, int], None] | None = None,
) -> RebalanceReport:
    """Move every user not on `shard_of(user, len(dsns))` there; `max_users` bounds one run."""
    report = RebalanceReport(shard_count=len(dsns))
    pools = [await asyncpg.create_pool(dsn, min_size=1, max_size=concurrency + 1) for dsn in dsns]
    try:
        await _partitions_for_oldest_message(pools, partitions_ahead_months)
        slots = asyncio.Semaphore(concurrency)

        async def move(user_id: str, source: int, target: int) -> None:
            async with slots:
                moved = await move_user(pools[source], pools[target], user_id, len(dsns), target)
            if moved is None:
                return
            if moved == "stranded":
                report.stranded_users.append(user_id)
                return
            report.moved_users += 1
            report.moved_rows.update(moved)
            report.moves[(source, target)] += 1
            if on_move is not None:
                on_move(user_id, source, target)

        for source, pool in enumerate(pools):
            after = ""
            while True:
                users = [row[0] for row in await pool.fetch(_USERS_AFTER, after, batch_size)]
                if not users:
                    break
                after = users[-1]
                report.scanned_users += len(users)
                movers = [(u, shard_of(u, len(dsns))) for u in users]
                movers = [(u, target) for u, target in movers if target != source]
                if max_users is not None:
                    movers = movers[: max(0, max_users - report.moved_users)]
                await asyncio.gather(*(move(u, source, target) for u, target in movers))
                if max_users is not None and report.moved_users >= max_users:
                    report.complete = False
                    return report
    finally:
        for pool in pools:
            await pool.close()
    return report


async def move_user(
    source: asyncpg.Pool, target: asyncpg.Pool, user_id: str, shard_count: int, target_index: int
) -> Counter[str] | str | None:
    """Move one user's rows from `source` to `target`; the row counts moved, None if there was nothing to
    move (deleted or moved meanwhile), "stranded" if a marker says the user moved already."""
    async with source.acquire() as src, src.transaction():
        await src.execute(LOCK_USER_EXCLUSIVE, user_id)
        if await src.fetchval(IS_MOVED, user_id, shard_count):
            # Rows on the old shard after the move. Copying them over would overwrite the user's live rows.
            log.error("user %r has rows on an old shard although it was moved; left in place", user_id)
            return "stranded"
        rows = {
            table: await src.fetch(f"SELECT {', '.join(columns)} FROM {table} WHERE user_id = $1", user_id)
            for table, columns in COLUMNS.items()
        }
        if not any(rows.values()):
            return None
        async with target.acquire() as dst, dst.transaction():
            # Leftovers of an attempt interrupted between the two commits: no store call writes this user
            # on the target before the marker exists.
            for statement in _DELETE_USER:
                await dst.execute(statement, user_id)
            for table, records in rows.items():
                if records:
                    await dst.copy_records_to_table(table, records=records, columns=COLUMNS[table])
            if rows["messages"]:
                await dst.execute(_KEEP_IDS_INCREASING, max(r["message_id"] for r in rows["messages"]))
        for statement in _DELETE_USER:
            await src.execute(statement, user_id)
        await src.execute(_MARK_MOVED, user_id, shard_count, target_index)
    return Counter({table: len(records) for table, records in rows.items()})


async def _partitions_for_oldest_message(pools: list[asyncpg.Pool], months_ahead: int) -> None:
    """Every shard gets partitions back to the oldest month of any shard, so moved messages have a place."""
    oldest: list[datetime] = [
        ts for ts in [await pool.fetchval(_OLDEST_MESSAGE) for pool in pools] if ts is not None
    ]
    if not oldest:
        return
    for pool in pools:
        await pool.fetchval("SELECT messages_ensure_partitions($1, $2)", months_ahead, min(oldest))


@dataclass(frozen=True)
class ShardCounts:
    index: int
    users: int
    conversations: int
    messages: int
    job_results: int
    # Users whose rows are here but whose shard is another one: not yet moved.
    misplaced_users: int


async def shard_counts(dsns: list[str]) -> list[ShardCounts]:
    """Row counts per shard, and how many users are not on their shard yet."""
    counts = []
    for index, dsn in enumerate(dsns):
        conn = await asyncpg.connect(dsn)
        try:
            users = [
                r[0]
                for r in await conn.fetch("SELECT user_id FROM users UNION SELECT user_id FROM job_results")
            ]
            tables = {
                t: await conn.fetchval(f"SELECT count(*) FROM {t}")
                for t in ("users", "conversations", "messages", "job_results")
            }
        finally:
            await conn.close()
        misplaced = sum(1 for u in users if shard_of(u, len(dsns)) != index)
        counts.append(ShardCounts(index, misplaced_users=misplaced, **tables))
    return counts
