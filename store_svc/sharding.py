"""Which shard holds a user, and the asyncpg pools that reach it.

Users map to shards by jump consistent hash (Lamping & Veach, 2014) of a 64-bit BLAKE2b hash of the user id:
no table to look up, the same answer in every process, and when the shard list grows from N to N+1 only about
1/(N+1) of users move, all of them to the new shard. Shards are therefore positional: the list is only ever
appended to, and `chatterbot shards rebalance` moves the users whose shard changed.

While a rebalance runs (`CHATTERBOT_POSTGRES_PREVIOUS_SHARD_COUNT` = N), a user whose shard differs between N
and N+1 shards is "in flight". Such a user's calls go to the old shard inside a transaction holding a shared
advisory lock on the user, and read the move marker (`shard_moves`) there: no marker, the rows are still on
the old shard and the call runs there, holding the lock; a marker, the call goes to the new shard. The mover
(`store_svc.rebalance`) holds the same lock exclusively while it copies the user and deletes the originals,
so a write is either in the copy or made after the move, on the new shard, and never lost.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Protocol, TypeAlias

import asyncpg

from store_svc.statement_pool import StatementPool

# A shard's connections: asyncpg's pool, or one whose single statements skip its acquire and release.
Pool: TypeAlias = asyncpg.Pool | StatementPool

# The two-key advisory lock space (classid, objid) of per-user locks; objid is hashtext(user_id). A hash
# collision only makes two users' moves wait for each other.
USER_LOCK_CLASS = 0x63627573  # "cbus"
LOCK_USER_SHARED = f"SELECT pg_advisory_xact_lock_shared({USER_LOCK_CLASS}, hashtext($1::text))"
LOCK_USER_EXCLUSIVE = f"SELECT pg_advisory_xact_lock({USER_LOCK_CLASS}, hashtext($1::text))"
IS_MOVED = "SELECT EXISTS (SELECT FROM shard_moves WHERE user_id = $1 AND shard_count = $2)"

_MASK64 = (1 << 64) - 1


def user_hash(user_id: str) -> int:
    """A stable 64-bit hash of the user id (Python's `hash` differs per process)."""
    return int.from_bytes(hashlib.blake2b(user_id.encode(), digest_size=8).digest(), "big")


def jump_hash(key: int, buckets: int) -> int:
    """Jump consistent hash: the bucket in [0, buckets) of a 64-bit key."""
    if buckets < 1:
        raise ValueError("there must be at least one bucket")
    b, j = -1, 0
    while j < buckets:
        b = j
        key = (key * 2862933555777941757 + 1) & _MASK64
        j = int((b + 1) * ((1 << 31) / ((key >> 33) + 1)))
    return b


def shard_of(user_id: str, shard_count: int) -> int:
    """The index of the shard that holds `user_id` among `shard_count` shards."""
    return jump_hash(user_hash(user_id), shard_count)


@dataclass(frozen=True, slots=True)
class ShardSpec:
    index: int
    dsn: str
    # Empty: reads go to the primary.
    replica_dsn: str = ""


def shard_specs(
    shards: Sequence[str], replicas: Sequence[str] = (), fallback_dsn: str = ""
) -> list[ShardSpec]:
    """The shard list from settings: `shards`, or else `fallback_dsn` as the only shard; replicas by position."""
    dsns = list(shards) or ([fallback_dsn] if fallback_dsn else [])
    if len(replicas) > len(dsns):
        raise ValueError(f"{len(replicas)} replica DSNs for {len(dsns)} shards")
    padded = [*replicas, *[""] * (len(dsns) - len(replicas))]
    return [ShardSpec(i, dsn, replica) for i, (dsn, replica) in enumerate(zip(dsns, padded, strict=True))]


class Executor(Protocol):
    """What the repository runs queries on: an asyncpg pool, or one connection inside a transaction."""

    async def fetch(self, query: str, *args: object) -> list[asyncpg.Record]: ...
    async def fetchrow(self, query: str, *args: object) -> asyncpg.Record | None: ...
    async def fetchval(self, query: str, *args: object) -> object: ...
    async def execute(self, query: str, *args: object) -> str: ...


class ShardRouter:
    """One asyncpg pool per shard (and per replica); hands out where a user's queries run."""

    def __init__(
        self,
        primaries: Sequence[Pool],
        replicas: Sequence[Pool | None] = (),
        *,
        previous_shard_count: int = 0,
    ) -> None:
        if not primaries:
            raise ValueError("a store needs at least one shard")
        if not 0 <= previous_shard_count <= len(primaries):
            raise ValueError(f"previous shard count {previous_shard_count} is not within 0..{len(primaries)}")
        self.primaries = list(primaries)
        self.replicas = [*replicas, *[None] * (len(primaries) - len(replicas))]
        # Equal to the shard count means no rebalance runs.
        self.previous_shard_count = previous_shard_count or len(primaries)

    @property
    def shard_count(self) -> int:
        return len(self.primaries)

    def shard_of(self, user_id: str) -> int:
        return shard_of(user_id, self.shard_count)

    def _move(self, user_id: str) -> tuple[int, int] | None:
        """(old shard, new shard) of a user in flight during a rebalance, else None."""
        if self.previous_shard_count == self.shard_count:
            return None
        old, new = shard_of(user_id, self.previous_shard_count), self.shard_of(user_id)
        return (old, new) if old != new else None

    @asynccontextmanager
    async def writer(self, user_id: str) -> AsyncIterator[Executor]:
        """Where the user's writes (and reads that must see them) run: the primary of their shard."""
        move = self._move(user_id)
        if move is None:
            yield self.primaries[self.shard_of(user_id)]
            return
        async with self._in_flight(user_id, *move) as executor:
            yield executor

    @asynccontextmanager
    async def reader(self, user_id: str) -> AsyncIterator[Executor]:
        """Where list and history reads run: the shard's replica when it has one (it may lag a little)."""
        move = self._move(user_id)
        if move is None:
            shard = self.shard_of(user_id)
            yield self.replicas[shard] or self.primaries[shard]
            return
        # A replica may not have the move yet: in-flight users read the primaries.
        async with self._in_flight(user_id, *move) as executor:
            yield executor

    @asynccontextmanager
    async def _in_flight(self, user_id: str, old: int, new: int) -> AsyncIterator[Executor]:
        async with self.primaries[old].acquire() as conn, conn.transaction():
            await conn.execute(LOCK_USER_SHARED, user_id)
            # A statement of its own: its snapshot is taken after the lock is granted, so it sees the
            # marker of a move that committed while this call waited.
            if not await conn.fetchval(IS_MOVED, user_id, self.shard_count):
                yield conn
                return
        yield self.primaries[new]

    async def close(self) -> None:
        for pool in [*self.primaries, *(r for r in self.replicas if r is not None)]:
            await pool.close()

    def terminate(self) -> None:
        for pool in [*self.primaries, *(r for r in self.replicas if r is not None)]:
            pool.terminate()
