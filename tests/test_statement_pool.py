"""StatementPool on a real PostgreSQL: single statements on kept connections, everything else through the pool,
and connections that fail go back to the pool instead of being used again."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from store_svc.statement_pool import StatementPool
from tests.meshes import Servers


@pytest.fixture
async def statements(servers: Servers) -> AsyncIterator[StatementPool]:
    pool = await asyncpg.create_pool(servers.postgres_dsn, min_size=1, max_size=4)
    statement_pool = StatementPool(pool, kept=2)
    try:
        yield statement_pool
    finally:
        await statement_pool.close()


async def backend_of(pool: StatementPool) -> int:
    pid = await pool.fetchval("SELECT pg_backend_pid()")
    assert isinstance(pid, int)
    return pid


async def test_one_statement_after_another_reuses_one_kept_connection_without_the_pool(
    statements: StatementPool,
) -> None:
    first = await backend_of(statements)
    idle_in_pool = statements.pool.get_idle_size()
    for _ in range(20):
        assert await backend_of(statements) == first
    # The kept connection stayed checked out: the pool's own idle connections were never touched.
    assert statements.pool.get_idle_size() == idle_in_pool


async def test_every_statement_kind_answers_as_on_the_pool(statements: StatementPool) -> None:
    assert await statements.fetch("SELECT x FROM generate_series(1, 3) AS x") == [(1,), (2,), (3,)]
    row = await statements.fetchrow("SELECT $1::text AS word, $2::int AS n", "hello", 7)
    assert row is not None and (row["word"], row["n"]) == ("hello", 7)
    assert await statements.fetchval("SELECT 41 + 1") == 42
    assert await statements.execute("SELECT 1") == "SELECT 1"


async def test_callers_beyond_the_kept_connections_wait_their_turn_in_order(
    statements: StatementPool,
) -> None:
    finished: list[int] = []

    async def sleep_then_note(i: int) -> int:
        pid = await backend_of_sleep(statements)
        finished.append(i)
        return pid

    tasks = []
    for i in range(6):
        tasks.append(asyncio.ensure_future(sleep_then_note(i)))
        await asyncio.sleep(0.01)  # asked in this order
    pids = await asyncio.gather(*tasks)
    assert len(set(pids)) == 2  # only the two kept connections served them
    assert finished == sorted(finished)  # none overtook one that asked before it


async def backend_of_sleep(pool: StatementPool) -> int:
    pid = await pool.fetchval("SELECT pg_backend_pid() FROM pg_sleep(0.1)")
    assert isinstance(pid, int)
    return pid


async def test_a_transaction_runs_while_every_kept_connection_is_busy(statements: StatementPool) -> None:
    busy = [asyncio.ensure_future(backend_of_sleep(statements)) for _ in range(3)]
    await asyncio.sleep(0.02)
    async with asyncio.timeout(5), statements.acquire() as conn, conn.transaction():
        assert await conn.fetchval("SELECT 8") == 8
    await asyncio.gather(*busy)


async def test_a_caller_cancelled_while_waiting_takes_no_connection_with_it(
    statements: StatementPool,
) -> None:
    busy = [asyncio.ensure_future(backend_of_sleep(statements)) for _ in range(2)]
    await asyncio.sleep(0.02)
    waiting = asyncio.ensure_future(statements.fetchval("SELECT 9"))
    await asyncio.sleep(0.02)
    waiting.cancel()
    await asyncio.gather(*busy)
    with pytest.raises(asyncio.CancelledError):
        await waiting
    # Both kept connections still serve: two statements side by side run on two backends at once.
    pids = await asyncio.gather(backend_of_sleep(statements), backend_of_sleep(statements))
    assert len(set(pids)) == 2


async def test_a_failed_statement_gives_its_connection_back_and_the_next_one_runs(
    statements: StatementPool,
) -> None:
    before = await backend_of(statements)
    with pytest.raises(asyncpg.exceptions.DivisionByZeroError):
        await statements.fetchval("SELECT 1 / 0")
    await asyncio.sleep(0.05)  # the release runs in a task of its own
    assert await statements.fetchval("SELECT 2") == 2
    # The failed connection was reset by the pool, which may hand the same backend out again; it is alive.
    assert isinstance(before, int)


async def test_a_cancelled_statement_stops_in_the_server_and_its_connection_is_not_reused_mid_cancel(
    statements: StatementPool, servers: Servers
) -> None:
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await statements.fetchval("SELECT pg_sleep(30)")
    watcher = await asyncpg.connect(servers.postgres_dsn)
    try:
        for _ in range(50):
            sleeping = await watcher.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(30)%' AND state = 'active'"
            )
            if sleeping == 0:
                break
            await asyncio.sleep(0.1)
        assert sleeping == 0
    finally:
        await watcher.close()
    assert await statements.fetchval("SELECT 3") == 3


async def test_a_kept_connection_whose_backend_died_fails_once_then_statements_run_again(
    statements: StatementPool, servers: Servers
) -> None:
    doomed = await backend_of(statements)
    killer = await asyncpg.connect(servers.postgres_dsn)
    try:
        assert await killer.fetchval("SELECT pg_terminate_backend($1)", doomed)
    finally:
        await killer.close()
    await asyncio.sleep(0.1)
    # The pool notices the lost connection and takes it back: the next statement gets a live one.
    assert await statements.fetchval("SELECT 4") == 4
    assert await statements.fetchval("SELECT 5") == 5
    assert await backend_of(statements) != doomed


async def test_transactions_go_through_the_pools_own_connections(statements: StatementPool) -> None:
    async with statements.acquire() as conn, conn.transaction():
        assert await conn.fetchval("SELECT 6") == 6
        assert conn.is_in_transaction()
    assert await statements.fetchval("SELECT 7") == 7


async def test_close_gives_the_kept_connections_back_and_closes_the_pool(servers: Servers) -> None:
    pool = await asyncpg.create_pool(servers.postgres_dsn, min_size=1, max_size=3)
    statements = StatementPool(pool, kept=2)
    await asyncio.gather(*(statements.fetchval("SELECT pg_sleep(0.1)") for _ in range(2)))
    await statements.close()
    assert pool.is_closing()
