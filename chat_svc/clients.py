"""The guarded clients a chat turn needs, opened and closed together, and the token counter it counts with."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TypeAlias

from chat_svc.turn import TurnDeps
from chatterbot.guarded_client import GuardedClient
from chatterbot.settings import Settings
from chatterbot.tokens import token_counter
from chatterbot.v1 import context_pb2_grpc, inference_pb2_grpc, store_pb2_grpc

ContextClient: TypeAlias = "GuardedClient[context_pb2_grpc.ContextServiceAsyncStub]"
InferenceClient: TypeAlias = "GuardedClient[inference_pb2_grpc.InferenceServiceAsyncStub]"
StoreClient: TypeAlias = "GuardedClient[store_pb2_grpc.StoreServiceAsyncStub]"


@asynccontextmanager
async def downstream_clients(settings: Settings) -> AsyncIterator[TurnDeps]:
    """The clients of context, inference and store, with the configured token counter (built once here)."""
    context: ContextClient = GuardedClient(
        "context", settings.context_addr, context_pb2_grpc.ContextServiceStub, settings
    )
    inference: InferenceClient = GuardedClient(
        "inference", settings.inference_addr, inference_pb2_grpc.InferenceServiceStub, settings
    )
    store: StoreClient = GuardedClient(
        "store", settings.store_addr, store_pb2_grpc.StoreServiceStub, settings
    )
    try:
        yield TurnDeps(
            context=context,
            inference=inference,
            store=store,
            system_prompt=settings.system_prompt,
            context_token_budget=settings.context_token_budget,
            reduced_context_token_budget=settings.reduced_context_token_budget,
            count_tokens=token_counter(settings.context_tokenizer),
        )
    finally:
        for client in (context, inference, store):
            await client.close()
