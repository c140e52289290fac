"""One-statement calls on a shard without asyncpg's per-call acquire and release.

`asyncpg.Pool.fetch` acquires a connection, runs the statement and releases the connection through
`asyncio.shield` of a new task, with a timeout around each step: about as much CPU in the client as the
statement itself, and two more turns of the event loop before the caller resumes (on a busy loop, each is a
wait behind every other ready callback). Nearly every call the store makes is one statement in autocommit, so
`StatementPool` keeps a few of the pool's connections checked out between calls and runs those statements on
them directly, most recently used first; when every kept connection is busy, callers wait for one in the
order they came (none overtakes another). Anything else (a transaction, a connection held across statements)
goes through `acquire()` to the pool's other connections.

A kept connection that a statement fails on (a SQL error, a lost server, a cancelled call) goes back to the
pool, which resets or replaces it as it would its own; one whose server went away while it was kept (the pool
takes those back itself) is never used again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import asyncpg
from asyncpg.pool import PoolAcquireContext

T = TypeVar("T")


class StatementPool:
    """An asyncpg pool whose single statements (fetch, fetchrow, fetchval, execute) run on up to `kept` of its
    connections, checked out once and reused, with no acquire or release per call."""

    def __init__(self, pool: asyncpg.Pool, kept: int) -> None:
        if kept < 1:
            raise ValueError("a statement pool keeps at least one connection")
        self.pool = pool
        self.kept = kept
        self._idle: list[asyncpg.Connection] = []
        self._waiters: collections.deque[asyncio.Future[asyncpg.Connection | None]] = collections.deque()
        self._checked_out = 0
        self._releases: set[asyncio.Task[None]] = set()
        self._closing = False

    async def fetch(self, query: str, *args: object, timeout: float | None = None) -> list[asyncpg.Record]:
        return await self._run(lambda conn: conn.fetch(query, *args, timeout=timeout))

    async def fetchrow(
        self, query: str, *args: object, timeout: float | None = None
    ) -> asyncpg.Record | None:
        return await self._run(lambda conn: conn.fetchrow(query, *args, timeout=timeout))

    async def fetchval(self, query: str, *args: object, timeout: float | None = None) -> object:
        return await self._run(lambda conn: conn.fetchval(query, *args, timeout=timeout))

    async def execute(self, query: str, *args: object, timeout: float | None = None) -> str:
        return await self._run(lambda conn: conn.execute(query, *args, timeout=timeout))

    def acquire(self, *, timeout: float | None = None) -> PoolAcquireContext:
        """A connection of the pool's own, for transactions (`async with pool.acquire() as conn`)."""
        return self.pool.acquire(timeout=timeout)

    async def close(self) -> None:
        """Give the kept connections back, then close the pool (which waits for the ones in use)."""
        self._closing = True
        while self._waiters:  # each takes the pool's own connections from here on
            self._wake()
        idle, self._idle = self._idle, []
        for conn in idle:
            self._checked_out -= 1
            await self.pool.release(conn)
        if self._releases:
            await asyncio.gather(*self._releases, return_exceptions=True)
        await self.pool.close()

    def terminate(self) -> None:
        self._closing = True
        self._idle.clear()
        self.pool.terminate()

    async def _run(self, statement: Callable[[asyncpg.Connection], Coroutine[Any, Any, T]]) -> T:
        conn = await self._connection()
        if conn is None:  # closing: the pool's own connections serve what is still asked
            async with self.pool.acquire() as pooled:
                return await statement(pooled)
        try:
            result = await statement(conn)
        except BaseException:
            self._give_back(conn)
            raise
        if self._closing:
            self._give_back(conn)
        else:
            self._put(conn)
        return result

    async def _connection(self) -> asyncpg.Connection | None:
        """A free kept connection; else a newly checked out one while fewer than `kept` are; else the first
        one freed, in the order the callers asked (None once closing)."""
        while not self._closing:
            if self._idle and not self._waiters:
                conn = self._idle.pop()
                try:
                    closed = conn.is_closed()
                except asyncpg.InterfaceError:
                    # Its server went away while it was kept, and the pool took it back on its own.
                    self._checked_out -= 1
                    continue
                if not closed:
                    return conn
                self._give_back(conn)
                continue
            if self._checked_out < self.kept:
                self._checked_out += 1
                try:
                    return await self.pool.acquire()
                except BaseException:
                    self._checked_out -= 1
                    self._wake()
                    raise
            waiter: asyncio.Future[asyncpg.Connection | None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                handed = await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    # Handed over just as the caller gave up: pass it on.
                    late = waiter.result()
                    if late is not None:
                        self._put(late)
                    else:
                        self._wake()
                raise
            if handed is not None:
                return handed
            # None: a kept connection was given back to the pool; check out another in its place.
        return None

    def _put(self, conn: asyncpg.Connection) -> None:
        """A kept connection is free: to the longest waiting caller, else to the idle ones."""
        waiter = self._next_waiter()
        if waiter is None:
            self._idle.append(conn)
        else:
            waiter.set_result(conn)

    def _wake(self) -> None:
        """Room to check out another connection: the longest waiting caller takes it."""
        waiter = self._next_waiter()
        if waiter is not None:
            waiter.set_result(None)

    def _next_waiter(self) -> asyncio.Future[asyncpg.Connection | None] | None:
        """The longest waiting caller still waiting (one that gave up has a done future)."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                return waiter
        return None

    def _give_back(self, conn: asyncpg.Connection) -> None:
        """Return a kept connection to the pool, which resets it (or, closed or broken, replaces it)."""
        self._checked_out -= 1
        self._wake()
        # Its own task, shielded from the caller's cancellation as asyncpg's own release is: a connection still
        # cancelling its statement is waited for there, not dropped.
        task = asyncio.ensure_future(self._release(conn))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _release(self, conn: asyncpg.Connection) -> None:
        # A release that fails has terminated the connection; the pool makes a new one when next needed.
        with contextlib.suppress(Exception):
            await self.pool.release(conn)
