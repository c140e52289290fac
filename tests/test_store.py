"""store_svc on a real embedded PostgreSQL: migrations, the repository, and the gRPC servicer."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import grpc
import pytest
from alembic import command

from chatterbot.grpc_server import GrpcApp, build_server
from chatterbot.guarded_client import dependency_of
from chatterbot.settings import Settings
from chatterbot.v1 import store_pb2, store_pb2_grpc, types_pb2
from ops.embedded import PostgresServer
from store_svc.errors import InvalidInput, NotFound, database_status
from store_svc.main import app
from store_svc.migrate import alembic_config, upgrade, upgrade_async
from store_svc.repository import (
    MAX_TOOL_CALLS,
    MAX_TOOL_TEXT,
    JobResult,
    StoreRepository,
    ToolCall,
    ToolResult,
    derive_title,
)
from store_svc.servicer import StoreServicer

TABLES = {"users", "conversations", "messages", "job_results", "exchange_requests", "shard_moves", "api_keys"}
HEAD = "0007"
REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    # Started from the main thread (a sync fixture): the server dies with the thread that started it.
    server = PostgresServer(tmp_path_factory.mktemp("store-pg"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def dsn(postgres):
    postgres.ensure_database("store_test")
    dsn = postgres.dsn("store_test")
    upgrade(dsn)
    return dsn


@pytest.fixture(scope="module")
async def pool(dsn):
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=4)
    yield pool
    await pool.close()


@pytest.fixture
def repo(pool):
    return StoreRepository(pool)


def new_user() -> str:
    """A user of one test only, so tests sharing the database never see each other's rows."""
    return f"u-{uuid.uuid4().hex[:12]}"


async def tables_and_version(dsn: str) -> tuple[set[str], list[str]]:
    conn = await asyncpg.connect(dsn)
    try:
        tables = {
            r["tablename"]
            for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        }
        versions = [r["version_num"] for r in await conn.fetch("SELECT version_num FROM alembic_version")]
        return tables, versions
    finally:
        await conn.close()


# --- migrations ---


async def test_migrations_apply_to_an_empty_database_and_rerun_as_a_no_op(postgres):
    postgres.ensure_database("migrate_test")
    dsn = postgres.dsn("migrate_test")

    await upgrade_async(dsn)
    tables, versions = await tables_and_version(dsn)
    assert tables >= TABLES
    assert versions == [HEAD]

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("INSERT INTO users (user_id) VALUES ('survivor')")
    finally:
        await conn.close()

    await upgrade_async(dsn)
    await upgrade_async(dsn)
    tables, versions = await tables_and_version(dsn)
    assert tables >= TABLES
    assert versions == [HEAD]
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM users") == 1
    finally:
        await conn.close()


async def test_replicas_migrating_at_once_take_turns(postgres):
    postgres.ensure_database("migrate_race")
    dsn = postgres.dsn("migrate_race")

    async def replica() -> int:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", f"from store_svc.migrate import upgrade; upgrade({dsn!r})", cwd=REPO_ROOT
        )
        return await proc.wait()

    assert await asyncio.gather(replica(), replica(), replica()) == [0, 0, 0]
    tables, versions = await tables_and_version(dsn)
    assert tables >= TABLES
    assert versions == [HEAD]


async def test_the_tool_migration_leaves_a_populated_table_in_place_and_checks_every_partition(postgres):
    postgres.ensure_database("migrate_tools")
    dsn = postgres.dsn("migrate_tools")
    await asyncio.to_thread(command.upgrade, alembic_config(dsn), "0006")
    conn = await asyncpg.connect(dsn)
    try:
        # Rows in an older month's partition and in this month's, as a store that has been running holds.
        await conn.execute(
            """
            SELECT messages_ensure_partitions(3, now() - interval '2 months');
            INSERT INTO users (user_id) VALUES ('old-user');
            INSERT INTO conversations (user_id, conversation_id, title, message_count)
            VALUES ('old-user', 'c1', 'before tools', 4);
            INSERT INTO messages (user_id, conversation_id, role, content, created_at)
            SELECT 'old-user', 'c1', role, 'old ' || role, at
            FROM unnest(ARRAY[now() - interval '2 months', now()]) at, unnest(ARRAY['user', 'assistant']) role;
            """
        )
        # The partitions and their indexes.
        files = "SELECT relname, relkind::text, relfilenode FROM pg_class WHERE relname LIKE 'messages_p%' ORDER BY 1"
        before = await conn.fetch(files)

        await upgrade_async(dsn)
        assert (await tables_and_version(dsn))[1] == [HEAD]
        assert await conn.fetch(files) == before  # nothing rewritten: every partition keeps its file
        # Nor scanned: the partitions there were take the new checks unvalidated (every row passes them).
        scanned = await conn.fetch(
            "SELECT DISTINCT conrelid::regclass::text AS rel, convalidated FROM pg_constraint "
            "WHERE conname IN ('messages_role_check', 'messages_tool_check')"
        )
        partitions = {r["relname"] for r in before if r["relkind"] == "r"}
        assert {(r["rel"], r["convalidated"]) for r in scanned} == {
            (p, False) for p in partitions | {"messages"}
        }
        rows = await conn.fetch(
            "SELECT role, content, tool_calls, tool_call_id FROM messages WHERE user_id = 'old-user' "
            "ORDER BY created_at, message_id"
        )
        assert [tuple(r) for r in rows] == [
            ("user", "old user", None, None),
            ("assistant", "old assistant", None, None),
        ] * 2

        # The checks hold on a partition from before the migration, on this month's, and on one made after it.
        await conn.execute("SELECT messages_ensure_partitions(6)")
        insert = "INSERT INTO messages (user_id, conversation_id, role, content, tool_calls, tool_call_id, created_at) "
        for at in ("now() - interval '2 months'", "now()", "now() + interval '5 months'"):
            await conn.execute(insert + f"VALUES ('old-user', 'c1', 'tool', 'result', NULL, 'call-1', {at})")
            await conn.execute(insert + f"VALUES ('old-user', 'c1', 'assistant', '', '[]', NULL, {at})")
            for role, calls, call_id in (
                ("robot", "NULL", "NULL"),
                ("tool", "NULL", "NULL"),
                ("user", "NULL", "'call-1'"),
                ("user", "'[]'", "NULL"),
            ):
                with pytest.raises(asyncpg.exceptions.CheckViolationError):
                    await conn.execute(
                        insert + f"VALUES ('old-user', 'c1', '{role}', 'x', {calls}, {call_id}, {at})"
                    )
    finally:
        await conn.close()


# --- exchanges ---


async def test_append_exchange_stores_both_messages_in_order(repo):
    user = new_user()
    exchange = await repo.append_exchange(
        user,
        "c1",
        "req-1",
        "What is PostgreSQL?",
        "A database.",
        user_token_count=4,
        assistant_token_count=3,
        model="sim-7b",
        processing_time=0.25,
    )
    assert exchange.created
    assert exchange.conversation.message_count == 2
    assert exchange.conversation.title == "What is PostgreSQL?"
    assert exchange.user_message.message_id < exchange.assistant_message.message_id
    assert (exchange.user_message.role, exchange.user_message.content) == ("user", "What is PostgreSQL?")
    assert (exchange.assistant_message.role, exchange.assistant_message.content) == (
        "assistant",
        "A database.",
    )
    assert exchange.assistant_message.model == "sim-7b"
    assert exchange.assistant_message.processing_time == 0.25
    assert exchange.assistant_message.token_count == 3
    assert exchange.user_message.request_id == exchange.assistant_message.request_id == "req-1"

    page = await repo.list_messages(user, "c1")
    assert [m.content for m in page.messages] == ["What is PostgreSQL?", "A database."]
    assert page.next_before_message_id == 0


async def test_append_exchange_is_idempotent_on_the_request_id(repo, pool):
    user = new_user()
    first = await repo.append_exchange(user, "c1", "req-1", "hello", "hi there")
    replay = await repo.append_exchange(user, "c1", "req-1", "hello (retried)", "a different answer")

    assert not replay.created
    assert replay.user_message == first.user_message
    assert replay.assistant_message == first.assistant_message
    assert replay.conversation.message_count == 2
    assert replay.conversation.updated_at == first.conversation.updated_at
    assert await pool.fetchval("SELECT count(*) FROM messages WHERE user_id = $1", user) == 2
    assert (await repo.get_conversation(user, "c1")).message_count == 2


async def test_a_replay_naming_another_conversation_returns_the_stored_exchange_and_creates_nothing(repo):
    user = new_user()
    await repo.append_exchange(user, "c1", "req-1", "hello", "hi")
    replay = await repo.append_exchange(user, "c2", "req-1", "hello", "hi")
    assert not replay.created
    assert replay.conversation.conversation_id == "c1"
    with pytest.raises(NotFound):
        await repo.get_conversation(user, "c2")


async def test_concurrent_duplicates_store_one_exchange(repo, pool):
    user = new_user()
    results = await asyncio.gather(*(repo.append_exchange(user, "c1", "req-1", "q", "a") for _ in range(4)))
    assert sorted(r.created for r in results) == [False, False, False, True]
    assert await pool.fetchval("SELECT count(*) FROM messages WHERE user_id = $1", user) == 2
    assert (await repo.get_conversation(user, "c1")).message_count == 2


async def test_later_exchanges_extend_the_conversation_and_keep_its_title(repo):
    user = new_user()
    first = await repo.append_exchange(user, "c1", "req-1", "first question", "a", title="Chosen title")
    second = await repo.append_exchange(user, "c1", "req-2", "second question", "b", title="ignored")
    assert second.created
    assert second.conversation.message_count == 4
    assert second.conversation.title == "Chosen title"
    assert second.conversation.updated_at > first.conversation.updated_at


async def test_append_exchange_without_ids_starts_a_new_conversation_each_time(repo):
    user = new_user()
    a = await repo.append_exchange(user, "", "", "q", "a")
    b = await repo.append_exchange(user, "", "", "q", "a")
    assert a.created and b.created
    assert a.conversation.conversation_id != b.conversation.conversation_id


async def head_of(pool: asyncpg.Pool, user: str, conversation_id: str) -> str | None:
    return await pool.fetchval(
        "SELECT head_digest FROM conversations WHERE user_id = $1 AND conversation_id = $2",
        user,
        conversation_id,
    )


async def test_an_append_continuing_a_head_extends_that_conversation_and_moves_its_head(repo, pool):
    user, other = new_user(), new_user()
    first = await repo.append_exchange(user, "", "req-1", "q1", "a1", head_digest="h1")
    second = await repo.append_exchange(
        user, "", "req-2", "q2", "a2", continues_digest="h1", head_digest="h2"
    )
    conversation_id = first.conversation.conversation_id
    assert second.created and second.conversation.conversation_id == conversation_id
    assert second.conversation.message_count == 4
    assert second.conversation.title == "q1"
    assert await head_of(pool, user, conversation_id) == "h2"

    # The head moved on: continuing the old one again is a fork, a conversation of its own.
    fork = await repo.append_exchange(
        user, "", "req-3", "q2", "other", continues_digest="h1", head_digest="h3"
    )
    assert fork.conversation.conversation_id != conversation_id
    assert fork.conversation.message_count == 2
    # A head nobody has, and another user's head, continue nothing.
    unknown = await repo.append_exchange(user, "", "req-4", "q", "a", continues_digest="nowhere")
    foreign = await repo.append_exchange(other, "", "req-1", "q3", "a3", continues_digest="h2")
    assert unknown.conversation.message_count == foreign.conversation.message_count == 2
    assert await head_of(pool, user, unknown.conversation.conversation_id) is None
    assert (await repo.get_conversation(user, conversation_id)).message_count == 4

    # A replay writes nothing, the head included.
    replay = await repo.append_exchange(
        user, "", "req-2", "q2", "a2", continues_digest="h1", head_digest="hx"
    )
    assert not replay.created and replay.conversation.conversation_id == conversation_id
    assert await head_of(pool, user, conversation_id) == "h2"


async def test_an_append_naming_its_conversation_ignores_continues_and_clears_the_head(repo, pool):
    user = new_user()
    first = await repo.append_exchange(user, "", "req-1", "q1", "a1", head_digest="h1")
    elsewhere = await repo.append_exchange(user, "c-named", "req-2", "q", "a", continues_digest="h1")
    assert elsewhere.conversation.conversation_id == "c-named"
    conversation_id = first.conversation.conversation_id
    assert await head_of(pool, user, conversation_id) == "h1"

    # A turn of the seed API names the conversation and sends no head: nothing continues it by digest.
    await repo.append_exchange(user, conversation_id, "req-3", "q2", "a2")
    assert await head_of(pool, user, conversation_id) is None
    after = await repo.append_exchange(user, "", "req-4", "q3", "a3", continues_digest="h1")
    assert after.conversation.conversation_id != conversation_id


async def test_two_appends_continuing_one_head_at_once_fork(repo, pool, dsn):
    user = new_user()
    first = await repo.append_exchange(user, "", "req-0", "q", "a", head_digest="shared")
    conversation_id = first.conversation.conversation_id

    # Hold the conversation's row so that both appends are waiting for it before either can take it.
    blocker = await asyncpg.connect(dsn)
    try:
        holding = blocker.transaction()
        await holding.start()
        await blocker.execute(
            "SELECT FROM conversations WHERE user_id = $1 AND conversation_id = $2 FOR UPDATE",
            user,
            conversation_id,
        )
        appends = [
            asyncio.create_task(
                repo.append_exchange(
                    user,
                    "",
                    f"req-{i}",
                    "next",
                    f"answer {i}",
                    continues_digest="shared",
                    head_digest=f"h{i}",
                )
            )
            for i in (1, 2)
        ]
        for _ in range(200):
            # From outside the blocker's transaction, which would see one snapshot of the activity only.
            waiting = await pool.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%continued AS%'"
            )
            if waiting == 2:
                break
            await asyncio.sleep(0.02)
        assert waiting == 2
        await holding.commit()
        results = await asyncio.gather(*appends)
    finally:
        await blocker.close()

    assert all(r.created for r in results)
    continued = [r for r in results if r.conversation.conversation_id == conversation_id]
    forked = [r for r in results if r.conversation.conversation_id != conversation_id]
    assert len(continued) == len(forked) == 1
    assert continued[0].conversation.message_count == 4
    assert forked[0].conversation.message_count == 2
    winner = continued[0].user_message.request_id[len("req-") :]
    assert await head_of(pool, user, conversation_id) == f"h{winner}"
    assert await head_of(pool, user, forked[0].conversation.conversation_id) != f"h{winner}"


async def test_many_concurrent_continuations_of_one_head_continue_it_once(repo):
    user = new_user()
    first = await repo.append_exchange(user, "", "req-0", "q", "a", head_digest="shared")
    results = await asyncio.gather(
        *(
            repo.append_exchange(
                user, "", f"req-{i}", "next", "a", continues_digest="shared", head_digest=f"h{i}"
            )
            for i in range(1, 9)
        )
    )
    ids = [r.conversation.conversation_id for r in results]
    assert ids.count(first.conversation.conversation_id) == 1
    assert len(set(ids)) == 8


def test_a_derived_title_is_the_start_of_the_user_message():
    assert derive_title("  short\n question ") == "short question"
    long = derive_title("word " * 40)
    assert len(long) <= 60 and long.endswith("…")
    assert derive_title("   ") == "New conversation"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"user_id": ""},
        {"user_id": "x" * 51},
        {"conversation_id": "has space"},
        {"conversation_id": "c" * 65},
        {"title": "t" * 201},
    ],
)
async def test_invalid_input_is_refused_before_reaching_the_database(repo, kwargs):
    args = {"user_id": new_user(), "conversation_id": "c1", "title": "", **kwargs}
    with pytest.raises(InvalidInput):
        await repo.append_exchange(
            args["user_id"], args["conversation_id"], "req-1", "q", "a", title=args["title"]
        )


# --- tool turns ---

WEATHER = ToolCall("call-1", "get_weather", '{"city": "Lisbon"}')
TIME = ToolCall("call-2", "get_time", '{"zone": "Europe/Lisbon"}')


async def test_tool_calls_and_the_tool_turn_answering_them_are_stored_in_order_and_listed(repo):
    user = new_user()
    asked = await repo.append_exchange(
        user,
        "c1",
        "req-1",
        "Weather and time in Lisbon?",
        "",
        assistant_token_count=9,
        tool_calls=[WEATHER, TIME],
    )
    assert asked.created and asked.conversation.message_count == 2
    assert asked.user_message is not None and asked.user_message.content == "Weather and time in Lisbon?"
    assert asked.assistant_message.tool_calls == (WEATHER, TIME)
    assert asked.conversation.title == "Weather and time in Lisbon?"

    answered = await repo.append_exchange(
        user,
        "c1",
        "req-2",
        "",
        "Sunny, 21 °C, and it is noon.",
        model="sim-7b",
        processing_time=0.5,
        tool_results=[
            ToolResult("call-1", '{"sky": "sunny", "celsius": 21}', 8),
            ToolResult("call-2", "12:00", 2),
        ],
    )
    assert answered.created and answered.user_message is None
    assert [(m.role, m.tool_call_id, m.content, m.token_count) for m in answered.tool_results] == [
        ("tool", "call-1", '{"sky": "sunny", "celsius": 21}', 8),
        ("tool", "call-2", "12:00", 2),
    ]
    assert answered.assistant_message.tool_calls == ()
    assert (answered.assistant_message.model, answered.assistant_message.processing_time) == ("sim-7b", 0.5)
    assert all(m.model == "" and m.processing_time == 0.0 for m in answered.tool_results)
    assert answered.conversation.message_count == 5
    assert answered.conversation.title == "Weather and time in Lisbon?"

    listed = (await repo.list_messages(user, "c1")).messages
    assert [(m.role, m.tool_call_id, m.tool_calls) for m in listed] == [
        ("user", "", ()),
        ("assistant", "", (WEATHER, TIME)),
        ("tool", "call-1", ()),
        ("tool", "call-2", ()),
        ("assistant", "", ()),
    ]
    ids = [m.message_id for m in listed]
    assert ids == sorted(ids) and len(set(ids)) == 5
    assert listed[2:] == [*answered.tool_results, answered.assistant_message]
    assert (await repo.get_conversation(user, "c1")).message_count == 5
    assert await repo.delete_conversation(user, "c1") == 5


async def test_a_replayed_tool_turn_returns_the_stored_results_and_answer_and_writes_nothing(repo, pool):
    user = new_user()
    asked = await repo.append_exchange(user, "c1", "req-1", "q", "let me look", tool_calls=[WEATHER])
    results = [ToolResult("call-1", "sunny", 1)]
    first = await repo.append_exchange(
        user, "c1", "req-2", "", "", tool_calls=[TIME], tool_results=results, head_digest="h2"
    )

    asked_again = await repo.append_exchange(user, "c1", "req-1", "q", "another answer")
    assert not asked_again.created
    assert asked_again.assistant_message == asked.assistant_message
    assert asked_again.assistant_message.tool_calls == (WEATHER,)
    replay = await repo.append_exchange(
        user, "c1", "req-2", "", "different", tool_results=[ToolResult("call-9", "other")], head_digest="hx"
    )
    assert not replay.created and replay.user_message is None
    assert replay.tool_results == first.tool_results
    assert replay.assistant_message == first.assistant_message
    assert replay.assistant_message.tool_calls == (TIME,)
    assert replay.conversation.message_count == 4
    assert await pool.fetchval("SELECT count(*) FROM messages WHERE user_id = $1", user) == 4
    assert await head_of(pool, user, "c1") == "h2"


async def test_concurrent_duplicates_of_a_tool_turn_store_it_once(repo, pool):
    user = new_user()
    await repo.append_exchange(user, "c1", "req-1", "q", "", tool_calls=[WEATHER, TIME])
    turn = [ToolResult("call-1", "sunny"), ToolResult("call-2", "noon")]
    exchanges = await asyncio.gather(
        *(repo.append_exchange(user, "c1", "req-2", "", "both", tool_results=turn) for _ in range(4))
    )
    assert sorted(e.created for e in exchanges) == [False, False, False, True]
    assert len({e.tool_results for e in exchanges}) == 1
    assert await pool.fetchval("SELECT count(*) FROM messages WHERE user_id = $1", user) == 5


async def test_a_tool_turn_continues_the_conversation_of_its_head(repo, pool):
    user = new_user()
    asked = await repo.append_exchange(user, "", "req-1", "q", "", tool_calls=[WEATHER], head_digest="h1")
    answered = await repo.append_exchange(
        user,
        "",
        "req-2",
        "",
        "sunny",
        tool_results=[ToolResult("call-1", "sunny")],
        continues_digest="h1",
        head_digest="h2",
    )
    conversation_id = asked.conversation.conversation_id
    assert answered.conversation.conversation_id == conversation_id
    assert answered.conversation.message_count == 4
    assert await head_of(pool, user, conversation_id) == "h2"


async def test_a_conversation_started_by_a_tool_turn_is_titled_from_its_answer_or_plainly(repo):
    user = new_user()
    results = [ToolResult("call-1", "sunny")]
    from_answer = await repo.append_exchange(
        user, "", "req-1", "", "It is sunny in Lisbon.", tool_results=results
    )
    assert from_answer.conversation.title == "It is sunny in Lisbon."
    calling_again = await repo.append_exchange(
        user, "", "req-2", "", "", tool_calls=[TIME], tool_results=results
    )
    assert calling_again.conversation.title == "New conversation"
    named = await repo.append_exchange(user, "", "req-3", "", "x", title="Weather", tool_results=results)
    assert named.conversation.title == "Weather"


@pytest.mark.parametrize(
    ("kwargs", "detail"),
    [
        ({"tool_results": [ToolResult("", "sunny")]}, "tool_results[0].tool_call_id is required"),
        ({"tool_results": [ToolResult("c" * 201, "sunny")]}, "tool_call_id is longer than 200"),
        ({"tool_results": [ToolResult("call-1", "a\x00b")]}, "tool_results[0].content holds a NUL"),
        ({"tool_results": [ToolResult("call-1", "x" * (MAX_TOOL_TEXT + 1))]}, "content is longer"),
        ({"tool_results": [ToolResult("call-1", "x", -1)]}, "token count -1 is out of range"),
        (
            {"tool_results": [ToolResult(f"c{i}", "x") for i in range(MAX_TOOL_CALLS + 1)]},
            "at most 128 tool results",
        ),
        ({"user_content": "a question too", "tool_results": [ToolResult("call-1", "x")]}, "not both"),
        ({"tool_calls": [ToolCall("", "get_weather", "{}")]}, "tool_calls[0].id is required"),
        ({"tool_calls": [ToolCall("call-1", "", "{}")]}, "tool_calls[0].name is required"),
        ({"tool_calls": [ToolCall("call-1", "f", '{"a": "\x00"}')]}, "tool_calls[0].arguments holds a NUL"),
        ({"tool_calls": [ToolCall("call-1", "f" * 201, "{}")]}, "name is longer than 200"),
        ({"tool_calls": [WEATHER, ToolCall("call-1", "again", "{}")]}, "need ids of their own"),
        (
            {"tool_calls": [ToolCall(f"c{i}", "f", "{}") for i in range(MAX_TOOL_CALLS + 1)]},
            "at most 128 tool calls",
        ),
    ],
)
async def test_invalid_tool_turns_are_refused_before_reaching_the_database(repo, pool, kwargs, detail):
    user = new_user()
    args = {"user_content": "", **kwargs}
    with pytest.raises(InvalidInput) as refused:
        await repo.append_exchange(user, "c1", "req-1", args.pop("user_content"), "a", **args)
    assert detail in str(refused.value)
    assert await pool.fetchval("SELECT count(*) FROM messages WHERE user_id = $1", user) == 0


# --- conversations ---


async def test_conversations_list_most_recently_updated_first_with_pagination(repo):
    user = new_user()
    for name in ("c1", "c2", "c3", "c4", "c5"):
        await repo.create_conversation(user, title=name, conversation_id=name)
    # Activity moves c2 to the top.
    await repo.append_exchange(user, "c2", "req-1", "q", "a")

    seen, token = [], ""
    while True:
        page = await repo.list_conversations(user, page_size=2, page_token=token)
        assert len(page.conversations) <= 2
        seen += [c.conversation_id for c in page.conversations]
        token = page.next_page_token
        if not token:
            break
    assert seen == ["c2", "c5", "c4", "c3", "c1"]

    everything = await repo.list_conversations(user)
    assert [c.conversation_id for c in everything.conversations] == seen
    assert everything.next_page_token == ""


async def test_conversations_with_the_same_update_time_page_without_gaps(repo, pool):
    user = new_user()
    for i in range(5):
        await repo.create_conversation(user, conversation_id=f"c{i}")
    await pool.execute(
        "UPDATE conversations SET updated_at = '2025-01-01T00:00:00Z' WHERE user_id = $1", user
    )
    seen, token = [], ""
    while True:
        page = await repo.list_conversations(user, page_size=2, page_token=token)
        seen += [c.conversation_id for c in page.conversations]
        if not (token := page.next_page_token):
            break
    assert seen == ["c0", "c1", "c2", "c3", "c4"]


async def test_a_malformed_page_token_is_invalid_input(repo):
    with pytest.raises(InvalidInput):
        await repo.list_conversations(new_user(), page_token="not a token")


async def test_create_conversation_generates_an_id_and_a_default_title(repo):
    user = new_user()
    conversation = await repo.create_conversation(user)
    assert len(conversation.conversation_id) == 32
    assert conversation.title == "New conversation"
    assert conversation.message_count == 0
    assert await repo.get_conversation(user, conversation.conversation_id) == conversation
    again = await repo.create_conversation(user, title="other", conversation_id=conversation.conversation_id)
    assert again == conversation


async def test_rename_changes_the_title(repo):
    user = new_user()
    await repo.create_conversation(user, conversation_id="c1")
    renamed = await repo.rename_conversation(user, "c1", "  Holiday plans ")
    assert renamed.title == "Holiday plans"
    assert (await repo.get_conversation(user, "c1")).title == "Holiday plans"
    with pytest.raises(InvalidInput):
        await repo.rename_conversation(user, "c1", "   ")


async def test_a_user_cannot_read_rename_or_delete_another_users_conversation(repo):
    alice, bob = new_user(), new_user()
    await repo.append_exchange(alice, "shared-id", "req-1", "alice's secret", "noted")

    with pytest.raises(NotFound):
        await repo.get_conversation(bob, "shared-id")
    with pytest.raises(NotFound):
        await repo.list_messages(bob, "shared-id")
    with pytest.raises(NotFound):
        await repo.rename_conversation(bob, "shared-id", "mine now")
    with pytest.raises(NotFound):
        await repo.delete_conversation(bob, "shared-id")
    assert (await repo.list_conversations(bob)).conversations == []

    untouched = await repo.get_conversation(alice, "shared-id")
    assert untouched.title == "alice's secret"
    assert untouched.message_count == 2


async def test_delete_removes_the_conversation_and_its_messages(repo, pool):
    user = new_user()
    await repo.append_exchange(user, "c1", "req-1", "q1", "a1")
    await repo.append_exchange(user, "c1", "req-2", "q2", "a2")
    await repo.append_exchange(user, "c2", "req-3", "kept", "kept")

    assert await repo.delete_conversation(user, "c1") == 4
    with pytest.raises(NotFound):
        await repo.get_conversation(user, "c1")
    with pytest.raises(NotFound):
        await repo.delete_conversation(user, "c1")
    rows = await pool.fetch("SELECT conversation_id FROM messages WHERE user_id = $1", user)
    assert {r["conversation_id"] for r in rows} == {"c2"}


# --- history ---


async def test_history_pages_backwards_with_the_cursor(repo):
    user = new_user()
    for i in range(5):
        await repo.append_exchange(user, "c1", f"req-{i}", f"q{i}", f"a{i}")

    newest = await repo.list_messages(user, "c1", page_size=4)
    assert [m.content for m in newest.messages] == ["q3", "a3", "q4", "a4"]
    middle = await repo.list_messages(
        user, "c1", page_size=4, before_message_id=newest.next_before_message_id
    )
    assert [m.content for m in middle.messages] == ["q1", "a1", "q2", "a2"]
    oldest = await repo.list_messages(
        user, "c1", page_size=4, before_message_id=middle.next_before_message_id
    )
    assert [m.content for m in oldest.messages] == ["q0", "a0"]
    assert oldest.next_before_message_id == 0


async def test_history_of_an_empty_conversation_is_empty(repo):
    user = new_user()
    await repo.create_conversation(user, conversation_id="c1")
    page = await repo.list_messages(user, "c1")
    assert page.messages == [] and page.next_before_message_id == 0


# --- users ---


async def test_ensure_user_creates_once(repo):
    user = new_user()
    with pytest.raises(NotFound):
        await repo.get_user(user)
    created, was_created = await repo.ensure_user(user)
    again, created_again = await repo.ensure_user(user)
    assert was_created and not created_again
    assert created == again == await repo.get_user(user)


# --- job results ---


async def test_job_results_round_trip_and_upsert(repo):
    user = new_user()
    pending = await repo.put_job_result(JobResult(user, "corr-1", status=types_pb2.JOB_STATUS_PENDING))
    assert pending.created_at is not None and pending.expires_at > pending.created_at

    done = await repo.put_job_result(
        JobResult(
            user,
            "corr-1",
            status=types_pb2.JOB_STATUS_SUCCEEDED,
            response="the answer",
            conversation_id="c1",
            processing_time=1.5,
            finish_reason=types_pb2.FINISH_REASON_STOP,
            prompt_tokens=10,
            completion_tokens=3,
        ),
        ttl_seconds=60,
    )
    fetched = await repo.get_job_result(user, "corr-1")
    assert fetched == done
    assert fetched.status == types_pb2.JOB_STATUS_SUCCEEDED
    assert fetched.response == "the answer"
    assert (fetched.prompt_tokens, fetched.completion_tokens) == (10, 3)
    assert fetched.created_at == pending.created_at
    assert fetched.updated_at >= pending.updated_at

    with pytest.raises(NotFound):
        await repo.get_job_result(new_user(), "corr-1")


async def test_expired_job_results_are_not_found_and_get_purged(repo, pool):
    user = new_user()
    await repo.put_job_result(JobResult(user, "corr-1", status=types_pb2.JOB_STATUS_FAILED, error="boom"))
    await pool.execute(
        "UPDATE job_results SET expires_at = now() - interval '1 second' WHERE user_id = $1", user
    )
    with pytest.raises(NotFound):
        await repo.get_job_result(user, "corr-1")
    assert await repo.purge_expired_job_results() >= 1
    assert await pool.fetchval("SELECT count(*) FROM job_results WHERE user_id = $1", user) == 0


# --- gRPC ---


@contextlib.asynccontextmanager
async def serving(servicer: StoreServicer) -> AsyncIterator[store_pb2_grpc.StoreServiceAsyncStub]:
    """`servicer` on a real server built by the shared bootstrap, with the store's error translator."""
    server = build_server(
        GrpcApp(
            name="store",
            servicers=[(store_pb2_grpc.add_StoreServiceServicer_to_server, servicer)],
            service_names=["chatterbot.v1.StoreService"],
            error_translators=[database_status],
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield store_pb2_grpc.StoreServiceStub(channel)
    finally:
        await channel.close()
        await server.stop(None)


@pytest.fixture
async def store_stub(repo):
    async with serving(StoreServicer(repo)) as stub:
        yield stub


async def test_grpc_append_exchange_is_idempotent_and_errors_map_to_status_codes(store_stub):
    user = new_user()
    request = store_pb2.AppendExchangeRequest(
        user_id=user,
        conversation_id="c1",
        request_id="req-1",
        user_message=store_pb2.ExchangeMessage(content="hello", token_count=1),
        assistant_message=store_pb2.ExchangeMessage(content="hi!", token_count=2),
        model="sim-7b",
        processing_time=0.5,
    )
    first = await store_stub.AppendExchange(request, timeout=5)
    second = await store_stub.AppendExchange(request, timeout=5)
    assert first.created and not second.created
    assert second.conversation.message_count == 2
    assert first.user_message.role == types_pb2.ROLE_USER
    assert first.assistant_message.role == types_pb2.ROLE_ASSISTANT
    assert second.assistant_message == first.assistant_message
    assert first.assistant_message.create_time.seconds > 0

    history = await store_stub.ListMessages(
        store_pb2.StoreServiceListMessagesRequest(user_id=user, conversation_id="c1"), timeout=5
    )
    assert [m.content for m in history.messages] == ["hello", "hi!"]

    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        await store_stub.AppendExchange(store_pb2.AppendExchangeRequest(conversation_id="c1"), timeout=5)
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await store_stub.GetConversation(
            store_pb2.GetConversationRequest(user_id=user, conversation_id="no-such-conversation"), timeout=5
        )
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_grpc_append_exchange_continues_the_conversation_of_a_head(store_stub):
    user = new_user()

    def exchange(request_id: str, continues: str, head: str) -> store_pb2.AppendExchangeRequest:
        return store_pb2.AppendExchangeRequest(
            user_id=user,
            request_id=request_id,
            user_message=store_pb2.ExchangeMessage(content=f"q {request_id}"),
            assistant_message=store_pb2.ExchangeMessage(content=f"a {request_id}"),
            continues_digest=continues,
            head_digest=head,
        )

    first = await store_stub.AppendExchange(exchange("req-1", "", "h1"), timeout=5)
    second = await store_stub.AppendExchange(exchange("req-2", "h1", "h2"), timeout=5)
    fresh = await store_stub.AppendExchange(exchange("req-3", "", "h3"), timeout=5)
    assert second.conversation.conversation_id == first.conversation.conversation_id
    assert second.conversation.message_count == 4
    assert fresh.conversation.conversation_id != first.conversation.conversation_id

    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        await store_stub.AppendExchange(exchange("req-4", "x" * 65, ""), timeout=5)
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_grpc_tool_turns_round_trip_and_misplaced_tool_fields_are_invalid_argument(store_stub):
    user = new_user()
    call = types_pb2.ToolCall(id="call-1", name="get_weather", arguments='{"city": "Lisbon"}')
    asked = await store_stub.AppendExchange(
        store_pb2.AppendExchangeRequest(
            user_id=user,
            conversation_id="c1",
            request_id="req-1",
            user_message=store_pb2.ExchangeMessage(content="Weather in Lisbon?", token_count=4),
            assistant_message=store_pb2.ExchangeMessage(tool_calls=[call], token_count=7),
        ),
        timeout=5,
    )
    assert list(asked.assistant_message.tool_calls) == [call] and asked.user_message.content
    turn = store_pb2.AppendExchangeRequest(
        user_id=user,
        conversation_id="c1",
        request_id="req-2",
        tool_results=[store_pb2.ExchangeMessage(content="sunny", token_count=1, tool_call_id="call-1")],
        assistant_message=store_pb2.ExchangeMessage(content="It is sunny.", token_count=4),
        model="sim-7b",
    )
    first = await store_stub.AppendExchange(turn, timeout=5)
    again = await store_stub.AppendExchange(turn, timeout=5)
    assert first.created and not again.created
    assert not first.HasField("user_message") and not again.HasField("user_message")
    assert [(m.role, m.tool_call_id, m.content) for m in first.tool_results] == [
        (types_pb2.ROLE_TOOL, "call-1", "sunny")
    ]
    assert again.tool_results == first.tool_results and again.assistant_message == first.assistant_message
    assert first.conversation.message_count == 4

    history = await store_stub.ListMessages(
        store_pb2.StoreServiceListMessagesRequest(user_id=user, conversation_id="c1"), timeout=5
    )
    assert [(m.role, list(m.tool_calls), m.tool_call_id) for m in history.messages] == [
        (types_pb2.ROLE_USER, [], ""),
        (types_pb2.ROLE_ASSISTANT, [call], ""),
        (types_pb2.ROLE_TOOL, [], "call-1"),
        (types_pb2.ROLE_ASSISTANT, [], ""),
    ]

    def misplaced(**fields) -> store_pb2.AppendExchangeRequest:
        request = store_pb2.AppendExchangeRequest(user_id=user, conversation_id="c1", request_id="req-3")
        for name, value in fields.items():
            getattr(request, name).MergeFrom(value)
        return request

    for request, detail in (
        (
            misplaced(user_message=store_pb2.ExchangeMessage(content="q", tool_call_id="call-1")),
            "user_message",
        ),
        (misplaced(user_message=store_pb2.ExchangeMessage(content="q", tool_calls=[call])), "user_message"),
        (misplaced(assistant_message=store_pb2.ExchangeMessage(tool_call_id="call-1")), "assistant_message"),
        (
            misplaced(tool_results=[store_pb2.ExchangeMessage(tool_call_id="call-1", tool_calls=[call])]),
            "tool_results take no tool_calls",
        ),
        (
            misplaced(
                user_message=store_pb2.ExchangeMessage(content="q"),
                tool_results=[store_pb2.ExchangeMessage(tool_call_id="call-1")],
            ),
            "not both",
        ),
        (misplaced(tool_results=[store_pb2.ExchangeMessage(content="no id")]), "tool_call_id is required"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await store_stub.AppendExchange(request, timeout=5)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert detail in (refused.value.details() or "")


async def test_grpc_text_the_database_refuses_is_invalid_argument(store_stub):
    request = store_pb2.AppendExchangeRequest(
        user_id=new_user(),
        conversation_id="c1",
        request_id="req-nul",
        user_message=store_pb2.ExchangeMessage(content="a\x00b", token_count=1),
        assistant_message=store_pb2.ExchangeMessage(content="ok", token_count=1),
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await store_stub.AppendExchange(request, timeout=5)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details().startswith("rejected by the database: ")


async def test_grpc_a_closed_pool_is_database_unavailable(dsn):
    closed = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    await closed.close()
    async with serving(StoreServicer(StoreRepository(closed))) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as down:
            await stub.GetUser(store_pb2.GetUserRequest(user_id=new_user()), timeout=5)
    assert down.value.code() == grpc.StatusCode.UNAVAILABLE
    assert down.value.details() == "database unavailable"
    # Plain UNAVAILABLE, blaming no dependency: the store itself is what its callers cannot use.
    assert dependency_of(down.value) is None


def test_connection_errors_are_unavailable_and_other_errors_are_not_the_databases():
    assert database_status(ConnectionRefusedError()).code == grpc.StatusCode.UNAVAILABLE
    assert database_status(TimeoutError()).code == grpc.StatusCode.UNAVAILABLE
    assert database_status(KeyError("x")) is None


async def test_grpc_api_key_of_no_known_kind_is_invalid_argument(store_stub):
    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        await store_stub.CreateApiKey(
            store_pb2.CreateApiKeyRequest(key_hash=b"k" * 32, prefix="cb_abcdefgh"), timeout=5
        )
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert invalid.value.details() == "unknown API key kind 0"


async def test_grpc_update_api_key_changes_only_the_masked_limits(store_stub):
    created = await store_stub.CreateApiKey(
        store_pb2.CreateApiKeyRequest(
            key_hash=hashlib.sha256(uuid.uuid4().bytes).digest(),
            prefix="cb_" + uuid.uuid4().hex[:8],
            kind=store_pb2.API_KEY_KIND_SERVICE,
            requests_per_minute=7,
            route_limits=[store_pb2.RouteLimit(route="/chat", limit="5/minute")],
        ),
        timeout=5,
    )
    key_id = created.api_key.key_id
    assert [(r.route, r.limit) for r in created.api_key.route_limits] == [("/chat", "5/minute")]
    update = store_pb2.UpdateApiKeyRequest(
        key_id_or_prefix=key_id,
        api_key=store_pb2.ApiKey(
            tokens_per_minute=900,
            requests_per_minute=1,  # not in the mask: left alone
            route_limits=[store_pb2.RouteLimit(route="/stream-chat", limit="600/minute;10000/hour")],
        ),
    )
    update.update_mask.paths.extend(["tokens_per_minute", "route_limits"])
    updated = (await store_stub.UpdateApiKey(update, timeout=5)).api_key
    assert (updated.requests_per_minute, updated.tokens_per_minute) == (7, 900)
    assert [(r.route, r.limit) for r in updated.route_limits] == [("/stream-chat", "600/minute;10000/hour")]


@pytest.mark.parametrize(
    ("paths", "limit", "detail"),
    [
        ([], "5/minute", "update_mask must name some of"),
        (["name"], "5/minute", "not name"),
        (["route_limits"], "lots", "is not a limit such as 600/minute"),
    ],
)
async def test_grpc_update_api_key_refuses_what_it_cannot_apply(store_stub, paths, limit, detail):
    created = await store_stub.CreateApiKey(
        store_pb2.CreateApiKeyRequest(
            key_hash=hashlib.sha256(uuid.uuid4().bytes).digest(),
            prefix="cb_" + uuid.uuid4().hex[:8],
            kind=store_pb2.API_KEY_KIND_SERVICE,
        ),
        timeout=5,
    )
    update = store_pb2.UpdateApiKeyRequest(
        key_id_or_prefix=created.api_key.key_id,
        api_key=store_pb2.ApiKey(route_limits=[store_pb2.RouteLimit(route="/chat", limit=limit)]),
    )
    update.update_mask.paths.extend(paths)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await store_stub.UpdateApiKey(update, timeout=5)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert detail in (refused.value.details() or "")


async def test_grpc_job_results_round_trip(store_stub):
    user = new_user()
    put = await store_stub.PutJobResult(
        store_pb2.PutJobResultRequest(
            result=store_pb2.JobResult(
                user_id=user,
                correlation_id="corr-1",
                status=types_pb2.JOB_STATUS_SUCCEEDED,
                response="done",
                usage=types_pb2.Usage(prompt_tokens=5, completion_tokens=7),
            ),
            ttl_seconds=60,
        ),
        timeout=5,
    )
    got = await store_stub.GetJobResult(
        store_pb2.GetJobResultRequest(user_id=user, correlation_id="corr-1"), timeout=5
    )
    assert got.result == put.result
    assert got.result.usage.total_tokens == 12
    assert got.result.expire_time.seconds - got.result.create_time.seconds == 60


# --- service wiring ---


async def test_the_service_migrates_on_start_and_probes_postgres(postgres):
    postgres.ensure_database("app_test")
    settings = Settings(postgres_dsn=postgres.dsn("app_test"), postgres_pool_min=1, postgres_pool_max=2)
    async with app(settings) as grpc_app:
        assert grpc_app.service_names == ["chatterbot.v1.StoreService"]
        assert await grpc_app.probes["postgres"]()
        assert grpc_app.error_translators == [database_status]
    tables, versions = await tables_and_version(postgres.dsn("app_test"))
    assert tables >= TABLES and versions == [HEAD]


async def test_the_service_refuses_to_start_without_a_dsn():
    with pytest.raises(RuntimeError, match="CHATTERBOT_POSTGRES_DSN is not set"):
        async with app(Settings(postgres_dsn="")):
            pass
