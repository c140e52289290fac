"""Users on shards by jump consistent hash, and `chatterbot shards rebalance` growing 2 → 3 shards under writes.

Real PostgreSQL: every shard is a database of the session's embedded server.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import asyncpg
import pytest
from alembic.script import ScriptDirectory

from store_svc.migrate import alembic_config, upgrade_all
from store_svc.rebalance import COLUMNS, rebalance, shard_counts
from store_svc.repository import StoreRepository, ToolCall, ToolResult
from store_svc.sharding import ShardRouter, jump_hash, shard_of, shard_specs, user_hash

REPO_ROOT = Path(__file__).resolve().parent.parent


# --- the hash ---


@pytest.mark.parametrize("shards", [1, 2, 3, 5, 8, 16])
def test_users_spread_evenly_over_the_shards(shards):
    users = [f"user-{i}" for i in range(20_000)]
    counts = Counter(shard_of(u, shards) for u in users)
    assert set(counts) == set(range(shards))
    for count in counts.values():
        assert abs(count / len(users) - 1 / shards) < 0.02


@pytest.mark.parametrize("before", [1, 2, 3, 4, 7, 9])
def test_growing_n_to_n_plus_1_moves_about_one_in_n_plus_1_users_all_to_the_new_shard(before):
    users = [uuid.uuid4().hex for _ in range(20_000)]
    moved = [u for u in users if shard_of(u, before) != shard_of(u, before + 1)]
    assert abs(len(moved) / len(users) - 1 / (before + 1)) < 0.015
    assert {shard_of(u, before + 1) for u in moved} == {before}


def test_the_hash_is_stable_across_processes():
    # Python's own hash() is salted per process; the shard of a user must never depend on the process.
    code = "from store_svc.sharding import shard_of; print([shard_of(f'user-{i}', 7) for i in range(50)])"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT
    )
    assert out.stdout.strip() == str([shard_of(f"user-{i}", 7) for i in range(50)])
    assert jump_hash(user_hash("user-1"), 1) == 0


def test_shard_specs_fall_back_to_the_single_dsn_and_pair_replicas_by_position():
    assert shard_specs([], [], "postgresql://one/db")[0].dsn == "postgresql://one/db"
    specs = shard_specs(
        ["postgresql://a/s0", "postgresql://b/s1", "postgresql://c/s2"], ["postgresql://ra/s0", ""]
    )
    assert [(s.index, s.replica_dsn) for s in specs] == [(0, "postgresql://ra/s0"), (1, ""), (2, "")]
    assert shard_specs([], [], "") == []
    with pytest.raises(ValueError):
        shard_specs(["postgresql://a/s0"], ["postgresql://r/1", "postgresql://r/2"])


# --- shards on real PostgreSQL ---


def new_shards(servers, count: int) -> list[str]:
    """`count` fresh, migrated shard databases on the session's server."""
    prefix = f"shard_{uuid.uuid4().hex[:8]}"
    dsns = []
    for i in range(count):
        servers.postgres.ensure_database(f"{prefix}_{i}")
        dsns.append(servers.postgres.dsn(f"{prefix}_{i}"))
    upgrade_all(dsns)
    return dsns


async def open_pools(dsns: list[str]) -> list[asyncpg.Pool]:
    return [await asyncpg.create_pool(dsn, min_size=1, max_size=6) for dsn in dsns]


async def close_pools(pools: list[asyncpg.Pool]) -> None:
    for pool in pools:
        await pool.close()


async def rows_by_shard(pools: list[asyncpg.Pool], table: str) -> list[list[asyncpg.Record]]:
    return [await pool.fetch(f"SELECT * FROM {table}") for pool in pools]


async def test_each_users_rows_live_on_their_shard_only(servers):
    dsns = new_shards(servers, 2)
    pools = await open_pools(dsns)
    try:
        repo = StoreRepository(ShardRouter(pools))
        users = [f"user-{i}" for i in range(40)]
        for u in users:
            await repo.append_exchange(u, "c1", f"{u}-r1", "q", "a")
        per_shard = await rows_by_shard(pools, "messages")
        assert all(per_shard), "both shards hold users"
        for index, rows in enumerate(per_shard):
            assert {shard_of(r["user_id"], 2) for r in rows} == {index}
        assert sum(len(rows) for rows in per_shard) == 2 * len(users)
    finally:
        await close_pools(pools)


async def test_list_and_history_reads_go_to_the_replica_writes_to_the_primary(servers):
    # A "replica" here is a second database the test fills itself: what it shows is where each call goes.
    primary, replica = new_shards(servers, 2)
    pools = await open_pools([primary, replica])
    try:
        repo = StoreRepository(ShardRouter([pools[0]], [pools[1]]))
        await repo.append_exchange("user-replica", "c1", "r1", "written", "to the primary")
        assert (await repo.get_conversation("user-replica", "c1")).message_count == 2
        # Not replicated (no streaming replication here): the replica does not have it, and the reads say so.
        assert (await repo.list_conversations("user-replica")).conversations == []
        await StoreRepository(pools[1]).append_exchange(
            "user-replica", "c1", "r1", "read", "from the replica"
        )
        page = await repo.list_messages("user-replica", "c1")
        assert [m.content for m in page.messages] == ["read", "from the replica"]
    finally:
        await close_pools(pools)


async def test_growing_from_two_to_three_shards_under_writes_loses_nothing(servers):
    dsns = new_shards(servers, 3)
    pools = await open_pools(dsns)
    try:
        users = [f"user-{i:03d}" for i in range(90)]
        expected: dict[str, list[str]] = {u: [] for u in users}
        two = StoreRepository(ShardRouter(pools[:2]))
        for u in users:
            for k in range(3):
                await two.append_exchange(u, "c1", f"{u}-r{k}", f"{u} q{k}", f"{u} a{k}")
                expected[u] += [f"{u} q{k}", f"{u} a{k}"]
            await two.put_job_result(_job(u))
        movers = {u for u in users if shard_of(u, 2) != shard_of(u, 3)}
        assert 20 <= len(movers) <= 40

        # store_svc during the rebalance: three shards, told there were two.
        during = StoreRepository(ShardRouter(pools, previous_shard_count=2))
        stop = asyncio.Event()
        writes = Counter()

        async def writer(mine: list[str]) -> None:
            i = 0
            while not stop.is_set():
                u = mine[i % len(mine)]
                await during.append_exchange(u, "c1", f"{u}-w{i}", f"{u} wq{i}", f"{u} wa{i}")
                expected[u] += [f"{u} wq{i}", f"{u} wa{i}"]
                # At every moment, before, during and after its move, the user's history is whole.
                page = await during.list_messages(u, "c1", page_size=500)
                assert [m.content for m in page.messages] == expected[u]
                writes[u] += 1
                i += 1

        # Disjoint users per writer: one user's exchanges are sequential, so their order is known.
        writers = [asyncio.create_task(writer(users[w::4])) for w in range(4)]
        report = await rebalance(dsns, concurrency=4)
        await asyncio.sleep(0.3)  # writes after the move go to the new shard
        stop.set()
        await asyncio.gather(*writers)

        assert report.complete and not report.stranded_users
        assert report.moved_users == len(movers)
        assert set(report.moves) == {(0, 2), (1, 2)}
        assert sum(writes[u] for u in movers) > 0

        after = StoreRepository(ShardRouter(pools))  # the rebalance is over: no previous shard count
        for u in users:
            page = await after.list_messages(u, "c1", page_size=500)
            assert [m.content for m in page.messages] == expected[u], u
            ids = [m.message_id for m in page.messages]
            assert ids == sorted(set(ids)), f"message ids of {u} must keep increasing after its move"
            assert (await after.get_conversation(u, "c1")).message_count == len(expected[u])
            assert (await after.get_job_result(u, f"job-{u}")).response == f"done for {u}"

        # Row counts match: every message once, each user only on their shard, markers for the movers.
        messages = await rows_by_shard(pools, "messages")
        assert sum(len(rows) for rows in messages) == sum(len(v) for v in expected.values())
        for table in COLUMNS:
            for index, rows in enumerate(await rows_by_shard(pools, table)):
                assert all(shard_of(r["user_id"], 3) == index for r in rows), table
        markers = await rows_by_shard(pools, "shard_moves")
        assert {r["user_id"] for rows in markers for r in rows} == movers
        assert all(r["target_shard"] == 2 and r["shard_count"] == 3 for rows in markers for r in rows)
        assert all(c.misplaced_users == 0 for c in await shard_counts(dsns))
    finally:
        await close_pools(pools)


async def test_tool_calls_and_results_move_with_their_user(servers):
    dsns = new_shards(servers, 3)
    pools = await open_pools(dsns)
    try:
        movers = [u for u in (f"tool-user-{i:03d}" for i in range(60)) if shard_of(u, 2) != shard_of(u, 3)][
            :5
        ]
        two = StoreRepository(ShardRouter(pools[:2]))
        call = ToolCall("call_1", "get_weather", '{"city": "Oslo"}')
        for u in movers:
            await two.append_exchange(u, "c1", f"{u}-r1", "weather?", "", tool_calls=[call])
            await two.append_exchange(
                u, "c1", f"{u}-r2", "", "12C in Oslo", tool_results=[ToolResult("call_1", '{"temp": 12}')]
            )
        report = await rebalance(dsns, concurrency=2)
        assert report.complete and report.moved_users == len(movers)
        after = StoreRepository(ShardRouter(pools))
        for u in movers:
            page = await after.list_messages(u, "c1", page_size=10)
            assert [(m.role, m.content, m.tool_calls, m.tool_call_id) for m in page.messages] == [
                ("user", "weather?", (), ""),
                ("assistant", "", (call,), ""),
                ("tool", '{"temp": 12}', (), "call_1"),
                ("assistant", "12C in Oslo", (), ""),
            ]
    finally:
        await close_pools(pools)


async def test_an_interrupted_rebalance_continues_where_it_stopped(servers):
    dsns = new_shards(servers, 3)
    pools = await open_pools(dsns)
    try:
        users = [f"user-{i:03d}" for i in range(60)]
        two = StoreRepository(ShardRouter(pools[:2]))
        for u in users:
            await two.append_exchange(u, "c1", f"{u}-r1", "q", "a")
        movers = sorted(u for u in users if shard_of(u, 2) != shard_of(u, 3))

        first = await rebalance(dsns, max_users=5)
        assert not first.complete and first.moved_users == 5

        # A run that died between its two commits: the copy is on the new shard, the originals still on the
        # old one, no marker.
        unmoved = [u for u in movers if not await _moved(pools, u)]
        half = unmoved[0]
        source = pools[shard_of(half, 2)]
        for table, columns in COLUMNS.items():
            records = await source.fetch(f"SELECT {', '.join(columns)} FROM {table} WHERE user_id = $1", half)
            if records:
                await pools[2].copy_records_to_table(table, records=records, columns=columns)

        # The rest by the command an operator runs.
        out = subprocess.run(
            [
                str(Path(sys.executable).with_name("chatterbot")),
                "shards",
                "rebalance",
                "--shards",
                ",".join(dsns),
            ],
            capture_output=True,
            text=True,
            cwd=REPO_ROOT,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        assert f"moved {len(movers) - 5}" in out.stdout and "complete" in out.stdout

        totals = [sum(len(r) for r in await rows_by_shard(pools, t)) for t in ("users", "messages")]
        assert totals == [len(users), 2 * len(users)]
        assert await pools[2].fetchval("SELECT count(*) FROM messages WHERE user_id = $1", half) == 2
        again = await rebalance(dsns)
        assert again.moved_users == 0 and again.complete

        status = subprocess.run(
            [
                str(Path(sys.executable).with_name("chatterbot")),
                "shards",
                "status",
                "--shards",
                ",".join(dsns),
            ],
            capture_output=True,
            text=True,
            cwd=REPO_ROOT,
            timeout=60,
            check=True,
        )
        lines = status.stdout.strip().splitlines()
        assert len(lines) == 4 and all(line.split()[-1] == "0" for line in lines[1:])
    finally:
        await close_pools(pools)


async def test_rows_written_to_an_old_shard_after_a_move_are_left_for_an_operator(servers):
    dsns = new_shards(servers, 3)
    pools = await open_pools(dsns)
    try:
        user = next(f"user-{i}" for i in range(1000) if shard_of(f"user-{i}", 2) != shard_of(f"user-{i}", 3))
        await StoreRepository(ShardRouter(pools[:2])).append_exchange(user, "c1", "r1", "q", "a")
        assert (await rebalance(dsns)).moved_users == 1
        # A store_svc that never heard of the third shard writes to the old one.
        await StoreRepository(ShardRouter(pools[:2])).append_exchange(user, "c1", "r2", "stray", "write")
        report = await rebalance(dsns)
        assert report.stranded_users == [user]
        assert await pools[2].fetchval("SELECT count(*) FROM messages WHERE user_id = $1", user) == 2
    finally:
        await close_pools(pools)


def test_migrate_applies_to_every_shard_and_reruns_as_a_no_op(servers):
    prefix = f"mig_{uuid.uuid4().hex[:8]}"
    dsns = []
    for i in range(2):
        servers.postgres.ensure_database(f"{prefix}_{i}")
        dsns.append(servers.postgres.dsn(f"{prefix}_{i}"))
    for _ in range(2):
        out = subprocess.run(
            [str(Path(sys.executable).with_name("chatterbot")), "migrate", "--shards", ",".join(dsns)],
            capture_output=True,
            text=True,
            cwd=REPO_ROOT,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines() == ["shard 0: migrations applied", "shard 1: migrations applied"]

    async def versions() -> list[str]:
        found = []
        for dsn in dsns:
            conn = await asyncpg.connect(dsn)
            found.append(await conn.fetchval("SELECT version_num FROM alembic_version"))
            await conn.close()
        return found

    head = ScriptDirectory.from_config(alembic_config(dsns[0])).get_current_head()
    assert asyncio.run(versions()) == [head, head]


def _job(user: str):
    from store_svc.repository import JobResult

    return JobResult(user, f"job-{user}", status=2, response=f"done for {user}")


async def _moved(pools: list[asyncpg.Pool], user: str) -> bool:
    return (
        await pools[shard_of(user, 2)].fetchval("SELECT count(*) FROM shard_moves WHERE user_id = $1", user)
        > 0
    )
