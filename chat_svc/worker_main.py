"""`chatterbot serve worker`: a job worker, with gRPC health on `CHATTERBOT_WORKER_ADDR`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from chat_svc.clients import downstream_clients
from chat_svc.errors import chat_status
from chat_svc.jobs import JobDeps
from chat_svc.worker import Worker
from chatterbot.grpc_server import GrpcApp, run_service
from chatterbot.jetstream import connect, disconnect, ensure_streams
from chatterbot.settings import Settings


@asynccontextmanager
async def app(settings: Settings) -> AsyncIterator[GrpcApp]:
    nc = await connect(settings, "chatterbot-worker")
    await ensure_streams(nc.jetstream(), settings)
    async with downstream_clients(settings) as deps:
        worker = Worker(
            nc, deps, JobDeps(nc.jetstream(), nc, deps.store, settings.job_result_ttl_seconds), settings
        )
        await worker.start()

        async def nats_up() -> bool:
            return nc.is_connected

        try:
            yield GrpcApp(
                name="worker",
                servicers=[],
                service_names=[],
                probes={"nats": nats_up},
                error_translators=[chat_status],
            )
        finally:
            await worker.stop(settings.shutdown_grace_seconds)
            await disconnect(nc)


def main() -> None:
    run_service("worker", app)


if __name__ == "__main__":
    main()
