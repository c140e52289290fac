"""`chatterbot serve chat`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from chat_svc.auth import ApiKeyInterceptor
from chat_svc.servicer import ChatServicer
from chat_svc.turn import TurnDeps
from chatterbot.grpc_server import GrpcApp, run_service
from chatterbot.guarded_client import GuardedClient
from chatterbot.settings import Settings
from chatterbot.v1 import chat_pb2, chat_pb2_grpc, context_pb2_grpc, inference_pb2_grpc, store_pb2_grpc


@asynccontextmanager
async def app(settings: Settings) -> AsyncIterator[GrpcApp]:
    context = GuardedClient("context", settings.context_addr, context_pb2_grpc.ContextServiceStub, settings)
    inference = GuardedClient("inference", settings.inference_addr, inference_pb2_grpc.InferenceServiceStub, settings)
    store = GuardedClient("store", settings.store_addr, store_pb2_grpc.StoreServiceStub, settings)
    deps = TurnDeps(
        context=context,
        inference=inference,
        store=store,
        system_prompt=settings.system_prompt,
        context_token_budget=settings.context_token_budget,
    )
    try:
        yield GrpcApp(
            name="chat",
            servicers=[
                (chat_pb2_grpc.add_ChatServiceServicer_to_server,
                 ChatServicer(deps, store, settings.max_message_chars)),
            ],
            service_names=[chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name],
            interceptors=[ApiKeyInterceptor([*settings.api_keys, *settings.admin_keys])],
        )
    finally:
        for client in (context, inference, store):
            await client.close()


def main() -> None:
    run_service("chat", app)


if __name__ == "__main__":
    main()
