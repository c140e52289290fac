"""`chatterbot serve context`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from chatterbot.grpc_server import GrpcApp, run_service
from chatterbot.guarded_client import GuardedClient
from chatterbot.redis_client import redis_client
from chatterbot.settings import Settings
from chatterbot.tokens import token_counter
from chatterbot.v1 import context_pb2, context_pb2_grpc, store_pb2_grpc
from context_svc.errors import redis_status
from context_svc.history import store_history
from context_svc.servicer import ContextServicer
from context_svc.turns import TurnStore


@asynccontextmanager
async def app(settings: Settings) -> AsyncIterator[GrpcApp]:
    if not settings.redis_configured():
        raise SystemExit("neither CHATTERBOT_REDIS_URL nor CHATTERBOT_REDIS_SENTINELS is set")
    # Directly or through Sentinel; the redis probe below asks the same client, so it follows a failover too.
    client = redis_client(settings, timeout=2.0)
    count_tokens = token_counter(settings.context_tokenizer)
    # On a miss, context is rebuilt from history.
    store = GuardedClient("store", settings.store_addr, store_pb2_grpc.StoreServiceStub, settings)
    turns = TurnStore(
        client,
        settings.context_max_turns,
        settings.context_ttl_seconds,
        history=store_history(store, count_tokens),
        lock_timeout=settings.context_lock_timeout_seconds,
        # A turn waits for the one before it, but not past a caller's deadline.
        lock_wait=min(settings.context_lock_timeout_seconds, settings.deadline_seconds),
        count_tokens=count_tokens,
    )

    async def redis_up() -> bool:
        return bool(await client.ping())

    try:
        yield GrpcApp(
            name="context",
            servicers=[
                (
                    context_pb2_grpc.add_ContextServiceServicer_to_server,
                    ContextServicer(turns, settings.context_token_budget),
                ),
            ],
            service_names=[context_pb2.DESCRIPTOR.services_by_name["ContextService"].full_name],
            probes={"redis": redis_up},
            error_translators=[redis_status],
        )
    finally:
        await store.close()
        await client.aclose()


def main() -> None:
    run_service("context", app)


if __name__ == "__main__":
    main()
