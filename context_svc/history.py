"""Context rebuilt from history: the newest messages of a conversation, read from store_svc."""

from __future__ import annotations

import grpc

from chatterbot import wire
from chatterbot.guarded_client import GuardedClient
from chatterbot.tokens import TokenCounter
from chatterbot.v1 import store_pb2, store_pb2_grpc, types_pb2
from context_svc.turns import HistoryLoader, Turn

_CONTEXT_ROLES = frozenset({types_pb2.ROLE_SYSTEM, types_pb2.ROLE_USER, types_pb2.ROLE_ASSISTANT})


def store_history(
    store: GuardedClient[store_pb2_grpc.StoreServiceAsyncStub], count_tokens: TokenCounter
) -> HistoryLoader:
    """A `HistoryLoader` over store_svc's ListMessages (which reads the shard's replica when there is one)."""

    async def load(user_id: str, conversation_id: str, limit: int) -> list[Turn] | None:
        request = store_pb2.StoreServiceListMessagesRequest(
            user_id=user_id, conversation_id=conversation_id, page_size=limit
        )
        try:
            page: store_pb2.StoreServiceListMessagesResponse = await store.call(
                store.stub.ListMessages, request
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        return [
            Turn(
                role=wire.role_name(m.role),
                content=m.content,
                # Stored with the message when it was written; counted here only for messages stored without.
                token_count=m.token_count or count_tokens(m.content),
                created_at=m.create_time.ToNanoseconds() / 1e9,
                request_id=m.request_id,
            )
            for m in page.messages
            # A tool turn's calls and results mean nothing to a prompt built of roles and contents alone.
            if m.role in _CONTEXT_ROLES and not m.tool_calls
        ]

    return load
