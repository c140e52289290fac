"""How routes reach chat_svc: the edge's one guarded, typed client, as a FastAPI dependency."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeAlias

import grpc
from fastapi import Request

from chatterbot.api_keys import API_KEY_METADATA
from chatterbot.guarded_client import GuardedClient
from chatterbot.settings import Settings
from chatterbot.v1 import chat_pb2_grpc
from edge.auth import Caller

if TYPE_CHECKING:
    ChatClient: TypeAlias = GuardedClient[chat_pb2_grpc.ChatServiceAsyncStub]
else:
    # The generated async stub type exists only for type checkers; FastAPI sees the plain class.
    ChatClient = GuardedClient
Metadata: TypeAlias = tuple[tuple[str, str], ...]


def new_chat_client(settings: Settings) -> ChatClient:
    """The client of chat_svc; create it in the running event loop (at startup)."""
    return GuardedClient("chat", settings.chat_addr, _async_stub, settings)


def _async_stub(channel: grpc.aio.Channel) -> chat_pb2_grpc.ChatServiceAsyncStub:
    # On an aio channel the generated class makes the async stub (its __new__ overload says so).
    return chat_pb2_grpc.ChatServiceStub(channel)


async def chat_client(request: Request) -> ChatClient:
    """FastAPI dependency: the app's client of chat_svc (async: FastAPI runs a plain function in a thread)."""
    client: ChatClient = request.app.state.chat
    return client


def metadata(caller: Caller) -> Metadata:
    """The metadata of a call made for `caller`: its API key, which chat_svc checks again."""
    return ((API_KEY_METADATA, caller.key),)
