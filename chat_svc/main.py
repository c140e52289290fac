"""`chatterbot serve chat`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from chat_svc.auth import ApiKeyInterceptor
from chat_svc.clients import downstream_clients
from chat_svc.degradation import DegradationLadder
from chat_svc.errors import chat_status
from chat_svc.jobs import JobDeps
from chat_svc.servicer import ChatServicer
from chatterbot.api_keys import KeyResolver, store_lookup
from chatterbot.events import EventFanout
from chatterbot.grpc_server import GrpcApp, run_service
from chatterbot.jetstream import connect, disconnect, ensure_streams
from chatterbot.settings import Settings
from chatterbot.v1 import chat_pb2, chat_pb2_grpc


@asynccontextmanager
async def app(settings: Settings) -> AsyncIterator[GrpcApp]:
    nc = await connect(settings, "chatterbot-chat")
    await ensure_streams(nc.jetstream(), settings)
    fanout = EventFanout(nc)
    await fanout.start()
    async with downstream_clients(settings) as deps:
        deps.ladder = DegradationLadder(deps.inference, settings)
        await deps.ladder.start()
        jobs = JobDeps(nc.jetstream(), nc, deps.store, settings.job_result_ttl_seconds)

        async def nats_up() -> bool:
            return nc.is_connected

        try:
            yield GrpcApp(
                name="chat",
                servicers=[
                    (
                        chat_pb2_grpc.add_ChatServiceServicer_to_server,
                        ChatServicer(deps, jobs, fanout, settings.max_message_chars),
                    ),
                ],
                service_names=[chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name],
                interceptors=[
                    ApiKeyInterceptor(KeyResolver.from_settings(settings, store_lookup(deps.store)))
                ],
                # Direct chats work without NATS; only queued ones need it.
                probes={"nats": nats_up},
                optional_probes=frozenset({"nats"}),
                # Shed turns and job-queue failures; failed downstream calls are known to every service.
                error_translators=[chat_status],
            )
        finally:
            await deps.ladder.stop()
            await fanout.stop()
            await disconnect(nc)


def main() -> None:
    run_service("chat", app)


if __name__ == "__main__":
    main()
