"""Conversation history as a chat user changes it: plain async functions over the guarded clients."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

from chatterbot.status import NotFound
from chatterbot.v1 import context_pb2, store_pb2

if TYPE_CHECKING:
    from chat_svc.clients import ContextClient, StoreClient


async def delete_conversation(
    store: StoreClient, context: ContextClient, user_id: str, conversation_id: str
) -> int:
    """Delete a conversation's history, then its cached context; returns how many messages went.

    NotFound when history holds no such conversation (the cached context is cleared all the same)."""
    deleted: store_pb2.StoreServiceDeleteConversationResponse | None = None
    try:
        deleted = await store.call(
            store.stub.DeleteConversation,
            store_pb2.StoreServiceDeleteConversationRequest(user_id=user_id, conversation_id=conversation_id),
        )
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND:
            raise
    # The cached context goes too; also when the rows are gone already, so a retried delete finishes it.
    await context.call(
        context.stub.ClearContext,
        context_pb2.ClearContextRequest(user_id=user_id, conversation_id=conversation_id),
    )
    if deleted is None:
        raise NotFound(f"conversation {conversation_id!r} not found")
    return deleted.message_count
