#!/usr/bin/env python
"""Append and history-read throughput of the store, per shard.

Runs store_svc's own data path (`StoreRepository` over a `ShardRouter`, one asyncpg pool per shard) against
real PostgreSQL: the shards given with --shards, or else an embedded PostgreSQL started in a temporary
directory with --embedded-shards databases on it (what `chatterbot up` runs). Each phase runs for --seconds
with --concurrency workers spread over --users users; every worker call is one store call (AppendExchange:
one statement storing two messages; history: ListMessages of the newest --page messages). Prints the command
that produced the figures, then ops/s and latency per shard.

    .venv/bin/python scripts/bench_store.py --seconds 10 --concurrency 16
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shlex
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from store_svc.migrate import upgrade_all
from store_svc.repository import StoreRepository
from store_svc.sharding import ShardRouter, shard_of

QUESTION = "How do I keep conversation history fast to read when it grows past one database? " * 2
ANSWER = "Shard it by user id, keep the user's rows together, and page through them with a cursor. " * 6


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", help="comma-separated shard DSNs (default: an embedded PostgreSQL)")
    parser.add_argument(
        "--embedded-shards", type=int, default=2, help="shard databases on the embedded server"
    )
    parser.add_argument("--users", type=int, default=400)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each phase")
    parser.add_argument("--concurrency", type=int, default=16, help="calls in flight")
    parser.add_argument("--pool-size", type=int, default=8, help="connections per shard")
    parser.add_argument("--page", type=int, default=50, help="messages per history read")
    return parser.parse_args()


async def run_phase(name: str, call, users: list[str], shard_count: int, args: argparse.Namespace) -> dict:
    latencies: dict[int, list[float]] = defaultdict(list)
    deadline = time.perf_counter() + args.seconds

    async def worker(seed: int) -> None:
        rng = random.Random(seed)
        while time.perf_counter() < deadline:
            user = rng.choice(users)
            started = time.perf_counter()
            await call(user, rng)
            latencies[shard_of(user, shard_count)].append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(args.concurrency)))
    elapsed = time.perf_counter() - started
    return {"name": name, "elapsed": elapsed, "latencies": latencies}


def report(result: dict, shard_count: int) -> None:
    print(f"\n{result['name']}")
    print(f"  {'shard':>5} {'ops':>8} {'ops/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
    total = 0
    for shard in range(shard_count):
        lat = sorted(result["latencies"].get(shard, []))
        total += len(lat)
        if not lat:
            print(f"  {shard:>5} {0:>8}")
            continue
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        print(
            f"  {shard:>5} {len(lat):>8} {len(lat) / result['elapsed']:>9.0f} "
            f"{statistics.median(lat) * 1000:>8.2f} {p99 * 1000:>8.2f}"
        )
    print(f"  {'all':>5} {total:>8} {total / result['elapsed']:>9.0f}")


async def bench(dsns: list[str], args: argparse.Namespace) -> None:
    upgrade_all(dsns)
    pools = [await asyncpg.create_pool(dsn, min_size=args.pool_size, max_size=args.pool_size) for dsn in dsns]
    try:
        repo = StoreRepository(ShardRouter(pools))
        run = random.randrange(1 << 30)
        users = [f"bench-{run}-{i}" for i in range(args.users)]
        counter = iter(range(1 << 62))

        async def append(user: str, rng: random.Random) -> None:
            n = next(counter)
            await repo.append_exchange(
                user,
                "c1",
                f"req-{n}",
                QUESTION,
                ANSWER,
                user_token_count=40,
                assistant_token_count=130,
                model="bench",
                processing_time=0.5,
            )

        async def history(user: str, rng: random.Random) -> None:
            await repo.list_messages(user, "c1", page_size=args.page)

        async def conversations(user: str, rng: random.Random) -> None:
            await repo.list_conversations(user)

        # Every user has a conversation with history before the reads.
        for user in users:
            await repo.append_exchange(user, "c1", f"seed-{user}", QUESTION, ANSWER)
        print(
            f"users per shard: {[sum(1 for u in users if shard_of(u, len(dsns)) == s) for s in range(len(dsns))]}"
        )
        for name, call in (
            ("AppendExchange (2 messages, 1 statement)", append),
            (f"ListMessages (newest {args.page})", history),
            ("ListConversations", conversations),
        ):
            report(await run_phase(name, call, users, len(dsns), args), len(dsns))
        counts = [await pool.fetchval("SELECT count(*) FROM messages") for pool in pools]
        print(f"\nmessages per shard after the run: {counts}")
    finally:
        for pool in pools:
            await pool.close()


def main() -> None:
    args = parse_args()
    print("$ " + shlex.join([Path(sys.executable).name, *sys.argv]))
    print(f"python {sys.version.split()[0]}; concurrency {args.concurrency}; {args.seconds:g} s per phase")
    if args.shards:
        asyncio.run(bench([d.strip() for d in args.shards.split(",") if d.strip()], args))
        return
    from ops.embedded import PostgresServer

    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        server = PostgresServer(Path(tmp) / "postgres")
        server.start(timeout=60)
        try:
            names = [f"bench_shard{i}" for i in range(args.embedded_shards)]
            for name in names:
                server.ensure_database(name)
            print(f"embedded PostgreSQL, {len(names)} shard databases on one server")
            asyncio.run(bench([server.dsn(name) for name in names], args))
        finally:
            server.stop()


if __name__ == "__main__":
    main()
