"""Entry point of the store service: migrate every shard, open a pool per shard, serve StoreService over gRPC
(its key-managing RPCs to admin keys only, see store_svc.auth)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

from chatterbot.api_keys import KeyResolver
from chatterbot.grpc_server import GrpcApp, run_service
from chatterbot.settings import Settings
from chatterbot.v1 import store_pb2, store_pb2_grpc
from store_svc.auth import AdminKeyInterceptor, stored_key_lookup
from store_svc.errors import database_status
from store_svc.keys import ApiKeyRepository
from store_svc.migrate import upgrade_all_async
from store_svc.partitions import keep_partitions_ahead
from store_svc.repository import StoreRepository
from store_svc.servicer import StoreServicer
from store_svc.sharding import Pool, ShardRouter, ShardSpec, shard_specs
from store_svc.statement_pool import StatementPool

log = logging.getLogger(__name__)

# Prepared statements per connection: the service runs a couple of dozen distinct queries, all of them hot.
STATEMENT_CACHE_SIZE = 256
PROBE_TIMEOUT_SECONDS = 1.0
POOL_CLOSE_SECONDS = 5.0
PURGE_INTERVAL_SECONDS = 300.0
# Partitions are made months ahead; checking a few times a day is plenty.
PARTITIONS_INTERVAL_SECONDS = 6 * 3600.0


@asynccontextmanager
async def app(settings: Settings) -> AsyncIterator[GrpcApp]:
    """The store service for `run_service`: owns a pool per shard, opened after migrating every shard."""
    specs = shard_specs(settings.postgres_shards, settings.postgres_replicas, settings.postgres_dsn)
    if not specs:
        raise RuntimeError(
            "CHATTERBOT_POSTGRES_DSN is not set: the store service needs a PostgreSQL database "
            "(or CHATTERBOT_POSTGRES_SHARDS)"
        )
    await upgrade_all_async([spec.dsn for spec in specs])
    router = await open_router(specs, settings)
    repo = StoreRepository(router, partitions_ahead_months=settings.postgres_partitions_ahead_months)
    keys = ApiKeyRepository.on_control_shard(router)
    # Managing keys needs an admin key: a static one, or one of this store's own.
    admins = KeyResolver.from_settings(settings, stored_key_lookup(keys))
    tasks = [
        asyncio.create_task(_purge_expired_job_results(repo), name="purge-expired-job-results"),
        asyncio.create_task(
            keep_partitions_ahead(repo.ensure_partitions, PARTITIONS_INTERVAL_SECONDS),
            name="message-partitions",
        ),
    ]

    async def postgres_probe() -> bool:
        async def one(pool: Pool) -> bool:
            async with pool.acquire(timeout=PROBE_TIMEOUT_SECONDS) as conn:
                return await conn.fetchval("SELECT 1", timeout=PROBE_TIMEOUT_SECONDS) == 1

        return all(await asyncio.gather(*(one(pool) for pool in router.primaries)))

    try:
        yield GrpcApp(
            name="store",
            servicers=[(store_pb2_grpc.add_StoreServiceServicer_to_server, StoreServicer(repo, keys))],
            service_names=[store_pb2.DESCRIPTOR.services_by_name["StoreService"].full_name],
            probes={"postgres": postgres_probe},
            interceptors=[AdminKeyInterceptor(admins)],
            error_translators=[database_status],
        )
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await asyncio.wait_for(router.close(), POOL_CLOSE_SECONDS)
        except TimeoutError:
            log.warning("connections still busy after %gs; terminating the pools", POOL_CLOSE_SECONDS)
            router.terminate()


async def open_router(specs: list[ShardSpec], settings: Settings) -> ShardRouter:
    """A pool per shard primary and per replica, routed as the settings say."""
    primaries = [await _statement_pool(spec.dsn, settings) for spec in specs]
    replicas = [
        await _statement_pool(spec.replica_dsn, settings) if spec.replica_dsn else None for spec in specs
    ]
    return ShardRouter(primaries, replicas, previous_shard_count=settings.postgres_previous_shard_count)


async def _statement_pool(dsn: str, settings: Settings) -> Pool:
    # One of the pool's connections stays for transactions (and readiness probes); the rest run single
    # statements. A pool of one keeps none.
    pool = await _pool(dsn, settings)
    return (
        StatementPool(pool, kept=settings.postgres_pool_max - 1) if settings.postgres_pool_max > 1 else pool
    )


async def _pool(dsn: str, settings: Settings) -> asyncpg.Pool:
    return await asyncpg.create_pool(
        dsn,
        min_size=settings.postgres_pool_min,
        max_size=settings.postgres_pool_max,
        statement_cache_size=STATEMENT_CACHE_SIZE,
        # A query slower than a caller's deadline has no one waiting for its answer.
        command_timeout=settings.deadline_seconds,
        reset=_keep_session,
    )


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool reset hook that sends nothing.

    The default reset (`RESET ALL`, `UNLISTEN *`, unlocking advisory locks...) is a round trip on every release,
    doubling the cost of a one-statement call, to undo session state this service never sets. An open
    transaction is still rolled back by asyncpg before this hook runs.
    """


async def _purge_expired_job_results(repo: StoreRepository) -> None:
    """Delete expired job results now and then; reads already ignore them, this only reclaims the space."""
    while True:
        await asyncio.sleep(PURGE_INTERVAL_SECONDS)
        try:
            # Batches keep each delete (and the locks it holds) short.
            while await repo.purge_expired_job_results() > 0:
                pass
        except Exception:
            log.warning("purging expired job results failed; will retry", exc_info=True)


def main() -> None:
    """`chatterbot serve store`: run the store service until SIGTERM."""
    run_service("store", app)


if __name__ == "__main__":
    main()
