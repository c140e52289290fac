"""Entry point of the store service: migrate, open the asyncpg pool, serve StoreService over gRPC."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

from chatterbot.grpc_server import GrpcApp, run_service
from chatterbot.settings import Settings
from chatterbot.v1 import store_pb2, store_pb2_grpc
from store_svc.migrate import upgrade_async
from store_svc.repository import StoreRepository
from store_svc.servicer import StoreServicer

log = logging.getLogger(__name__)

# Prepared statements per connection: the service runs a couple of dozen distinct queries, all of them hot.
STATEMENT_CACHE_SIZE = 256
PROBE_TIMEOUT_SECONDS = 1.0
POOL_CLOSE_SECONDS = 5.0
PURGE_INTERVAL_SECONDS = 300.0


@asynccontextmanager
async def app(settings: Settings) -> AsyncIterator[GrpcApp]:
    """The store service for `run_service`: owns the pool, which it opens after migrating the schema."""
    dsn = settings.postgres_dsn
    if not dsn:
        raise RuntimeError(
            "CHATTERBOT_POSTGRES_DSN is not set: the store service needs a PostgreSQL database"
        )
    await upgrade_async(dsn)
    pool = await asyncpg.create_pool(
        dsn,
        min_size=settings.postgres_pool_min,
        max_size=settings.postgres_pool_max,
        statement_cache_size=STATEMENT_CACHE_SIZE,
        # A query slower than a caller's deadline has no one waiting for its answer.
        command_timeout=settings.deadline_seconds,
        reset=_keep_session,
    )
    repo = StoreRepository(pool)
    purger = asyncio.create_task(_purge_expired_job_results(repo), name="purge-expired-job-results")

    async def postgres_probe() -> bool:
        async with pool.acquire(timeout=PROBE_TIMEOUT_SECONDS) as conn:
            return await conn.fetchval("SELECT 1", timeout=PROBE_TIMEOUT_SECONDS) == 1

    try:
        yield GrpcApp(
            name="store",
            servicers=[(store_pb2_grpc.add_StoreServiceServicer_to_server, StoreServicer(repo))],
            service_names=[store_pb2.DESCRIPTOR.services_by_name["StoreService"].full_name],
            probes={"postgres": postgres_probe},
        )
    finally:
        purger.cancel()
        await asyncio.gather(purger, return_exceptions=True)
        try:
            await asyncio.wait_for(pool.close(), POOL_CLOSE_SECONDS)
        except TimeoutError:
            log.warning("connections still busy after %gs; terminating the pool", POOL_CLOSE_SECONDS)
            pool.terminate()


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
