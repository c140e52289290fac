"""The store schema on real PostgreSQL: keys that lead with the user, monthly partitions made ahead of time,
the plans of the hot reads (and of the head lookup of a continued conversation), and lz4 where the server
has it."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import asyncpg
import pytest

from chatterbot.settings import Settings
from store_svc import repository
from store_svc.main import app
from store_svc.migrate import upgrade

TABLES_KEYED_BY_USER = (
    "users",
    "conversations",
    "messages",
    "exchange_requests",
    "job_results",
    "shard_moves",
)


@pytest.fixture
async def db(servers):
    """A fresh, migrated database (one shard) and a connection to it."""
    name = f"schema_{uuid.uuid4().hex[:8]}"
    servers.postgres.ensure_database(name)
    dsn = servers.postgres.dsn(name)
    upgrade(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        yield dsn, conn
    finally:
        await conn.close()


def month_name(months_from_now: int) -> str:
    now = datetime.now(UTC)
    index = now.year * 12 + now.month - 1 + months_from_now
    return f"messages_p{index // 12:04d}_{index % 12 + 1:02d}"


async def partitions(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch(
        "SELECT inhrelid::regclass::text AS name FROM pg_inherits WHERE inhparent = 'messages'::regclass"
    )
    return {r["name"] for r in rows}


async def test_user_id_leads_every_primary_key(db):
    _, conn = db
    for table in TABLES_KEYED_BY_USER:
        first = await conn.fetchval(
            """
            SELECT a.attname FROM pg_index i
            JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
            WHERE i.indrelid = $1::regclass AND i.indisprimary
            """,
            table,
        )
        assert first == "user_id", table


async def test_messages_are_partitioned_by_month_with_partitions_made_ahead(db):
    _, conn = db
    assert (
        await conn.fetchval(
            "SELECT partstrat::text FROM pg_partitioned_table WHERE partrelid = 'messages'::regclass"
        )
        == "r"
    )
    made = await partitions(conn)
    assert {month_name(i) for i in range(4)} <= made

    assert await conn.fetchval("SELECT messages_ensure_partitions(6)") == 3
    assert {month_name(i) for i in range(7)} <= await partitions(conn)
    assert await conn.fetchval("SELECT messages_ensure_partitions(6)") == 0

    # Bounds are whole UTC months.
    bound = await conn.fetchval(
        "SELECT pg_get_expr(relpartbound, oid) FROM pg_class WHERE relname = $1", month_name(1)
    )
    assert bound.startswith("FOR VALUES FROM (") and "00:00:00+00" in bound


async def test_an_append_into_a_month_without_partition_creates_it(db):
    dsn, conn = db
    await conn.execute(f"DROP TABLE {month_name(0)}")
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    try:
        repo = repository.StoreRepository(pool)
        exchange = await repo.append_exchange("user-partition", "c1", "r1", "q", "a")
        assert exchange.created
    finally:
        await pool.close()
    assert month_name(0) in await partitions(conn)
    assert await conn.fetchval(f"SELECT count(*) FROM {month_name(0)}") == 2


async def test_the_service_keeps_partitions_ahead_from_the_start(servers):
    name = f"schema_{uuid.uuid4().hex[:8]}"
    servers.postgres.ensure_database(name)
    settings = Settings(
        _env_file=None,
        postgres_shards=[servers.postgres.dsn(name)],
        postgres_partitions_ahead_months=5,
        postgres_pool_min=1,
        postgres_pool_max=2,
    )
    async with app(settings):
        conn = await asyncpg.connect(servers.postgres.dsn(name))
        try:
            for _ in range(50):
                if month_name(5) in await partitions(conn):
                    break
                await asyncio.sleep(0.1)
            assert month_name(5) in await partitions(conn)
        finally:
            await conn.close()


async def test_content_is_lz4_compressed_exactly_where_the_server_has_lz4(db):
    _, conn = db
    has_lz4 = await conn.fetchval(
        "SELECT 'lz4' = ANY (enumvals) FROM pg_settings WHERE name = 'default_toast_compression'"
    )
    methods = await conn.fetch(
        """
        SELECT c.relname, a.attcompression::text AS attcompression FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
        WHERE a.attname = 'content' AND (c.relname = 'messages' OR c.relname LIKE 'messages_p%')
        """
    )
    assert methods
    expected = "l" if has_lz4 else ""
    assert {m["attcompression"] for m in methods} == {expected}, (has_lz4, methods)


async def test_hot_reads_use_the_indexes(db):
    """The plans of "a user's recent conversations" and "a conversation's messages in order" (README)."""
    _, conn = db
    await conn.execute(
        """
        INSERT INTO users (user_id) SELECT 'user-' || u FROM generate_series(1, 40) u;
        INSERT INTO conversations (user_id, conversation_id, title, updated_at)
        SELECT 'user-' || u, 'c' || c, 'title', now() - make_interval(mins => c)
        FROM generate_series(1, 40) u, generate_series(1, 100) c;
        INSERT INTO messages (user_id, conversation_id, role, content)
        SELECT 'user-' || u, 'c' || c, CASE WHEN m % 2 = 0 THEN 'user' ELSE 'assistant' END, repeat('x', 200)
        FROM generate_series(1, 40) u, generate_series(1, 5) c, generate_series(1, 60) m;
        ANALYZE;
        """
    )

    async def plan(sql: str, *args) -> str:
        return "\n".join(r[0] for r in await conn.fetch("EXPLAIN (COSTS OFF) " + sql, *args))

    conversations = await plan(repository._LIST_CONVERSATIONS_FIRST, "user-7", 21)
    print("\n-- a user's recent conversations\n" + conversations)
    assert "conversations_recent_idx" in conversations and "Seq Scan" not in conversations
    assert "Sort" not in conversations

    history = await plan(repository._LIST_MESSAGES, "user-7", "c3", 2**63 - 1, 21)
    print("\n-- a conversation's messages in order\n" + history)
    assert f"Index Scan Backward using {month_name(0)}_pkey" in history
    assert "Seq Scan" not in history

    await conn.execute(
        "UPDATE conversations SET head_digest = md5(user_id || conversation_id) WHERE conversation_id LIKE 'c1%'"
    )
    await conn.execute("ANALYZE conversations")
    args = ("user-7", "c-new", "req-1", "q", 1, "a", 1, 0.1, "m", "t", "head-of-c3", "next-head")
    append = await plan(repository._APPEND_EXCHANGE, *args)
    print("\n-- the conversation a whole-prompt turn continues (AppendExchange)\n" + append)
    assert "Index Scan using conversations_head_recent_idx on conversations" in append
    assert "Seq Scan on conversations" not in append
    # The hot statement is the plain exchange's alone; an exchange with tools has a statement of its own.
    assert "tool_call" not in repository._APPEND_EXCHANGE
    tool_args = (*args[:3], ["tool", "assistant"], ["21 °C", "a"], [2, 1], ["call-1", None], *args[7:], None)
    tool_turn = await plan(repository._APPEND_TOOL_EXCHANGE, *tool_args)
    print("\n-- a tool turn continuing a conversation (AppendExchange)\n" + tool_turn)
    assert "Index Scan using conversations_head_recent_idx on conversations" in tool_turn
    assert "Seq Scan on conversations" not in tool_turn
    # The statement is prepared once and may run on a generic plan: the partial index serves that too, whatever the head.
    await conn.execute("SET plan_cache_mode = force_generic_plan")
    for statement, values in (
        (repository._APPEND_EXCHANGE, args),
        (repository._APPEND_TOOL_EXCHANGE, tool_args),
    ):
        generic = await plan(statement, *values)
        assert "Index Scan using conversations_head_recent_idx on conversations" in generic, generic
