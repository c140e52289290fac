"""Context rebuilt from history: the newest messages of a conversation, read from store_svc."""

from __future__ import annotations

from collections.abc import Callable

import grpc

from chatterbot.guarded_client import GuardedClient
from chatterbot.v1 import store_pb2, types_pb2
from context_svc.turns import HistoryLoader, Turn

_ROLE_NAMES = {
    types_pb2.ROLE_SYSTEM: "system",
    types_pb2.ROLE_USER: "user",
    types_pb2.ROLE_ASSISTANT: "assistant",
}


def store_history(store: GuardedClient, count_tokens: Callable[[str], int]) -> HistoryLoader:
    """A `HistoryLoader` over store_svc's ListMessages (which reads the shard's replica when there is one)."""

    async def load(user_id: str, conversation_id: str, limit: int) -> list[Turn] | None:
        request = store_pb2.StoreServiceListMessagesRequest(
            user_id=user_id, conversation_id=conversation_id, page_size=limit
        )
        try:
            page = await store.call(store.stub.ListMessages, request)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        return [
            Turn(
                role=_ROLE_NAMES[m.role],
                content=m.content,
                # Stored with the message when it was written; counted here only for messages stored without.
                token_count=m.token_count or count_tokens(m.content),
                created_at=m.create_time.ToNanoseconds() / 1e9,
                request_id=m.request_id,
            )
            for m in page.messages
            if m.role in _ROLE_NAMES
        ]

    return load
