"""`chatterbot serve context`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as redis

from chatterbot.grpc_server import GrpcApp, run_service
from chatterbot.settings import Settings
from chatterbot.v1 import context_pb2, context_pb2_grpc
from context_svc.servicer import ContextServicer
from context_svc.turns import TurnStore


@asynccontextmanager
async def app(settings: Settings) -> AsyncIterator[GrpcApp]:
    if not settings.redis_url:
        raise SystemExit("CHATTERBOT_REDIS_URL is not set")
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
    turns = TurnStore(client, settings.context_max_turns, settings.context_ttl_seconds)

    async def redis_up() -> bool:
        return bool(await client.ping())

    try:
        yield GrpcApp(
            name="context",
            servicers=[
                (context_pb2_grpc.add_ContextServiceServicer_to_server,
                 ContextServicer(turns, settings.context_token_budget)),
            ],
            service_names=[context_pb2.DESCRIPTOR.services_by_name["ContextService"].full_name],
            probes={"redis": redis_up},
        )
    finally:
        await client.aclose()


def main() -> None:
    run_service("context", app)


if __name__ == "__main__":
    main()
