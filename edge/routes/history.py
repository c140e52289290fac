"""Conversations and history, served directly (no queue): ChatService's history RPCs, scoped by user id."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query
from google.protobuf.timestamp_pb2 import Timestamp
from pydantic import AfterValidator

from chatterbot import wire
from chatterbot.v1 import chat_pb2, types_pb2
from edge.auth import Caller, check_user, require_key
from edge.chat_client import ChatClient, chat_client, metadata
from edge.problems import downstream
from edge.protocol import (
    Conversation,
    ConversationCreate,
    ConversationDeleted,
    ConversationList,
    ConversationTitle,
    FunctionCall,
    History,
    HistoryMessage,
    Problem,
    SeedConversationTitle,
    ToolCall,
    role_name,
    storable,
)
from edge.rate_limits import RATE_LIMITED_RESPONSE

router = APIRouter(tags=["history"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "Missing API key"},
    403: {"model": Problem, "description": "Invalid API key, or a user key acting for another user_id"},
    404: {"model": Problem, "description": "No such conversation for this user"},
    422: {"model": Problem, "description": "Invalid request"},
    429: RATE_LIMITED_RESPONSE,
    503: {"model": Problem, "description": "A service is unavailable; see Retry-After"},
}
UserIdPath = Annotated[
    str, Path(min_length=wire.USER_ID_MIN, max_length=wire.USER_ID_MAX), AfterValidator(storable)
]
UserIdQuery = Annotated[
    str, Query(min_length=wire.USER_ID_MIN, max_length=wire.USER_ID_MAX), AfterValidator(storable)
]
ConversationIdPath = Annotated[str, Path(pattern=wire.CONVERSATION_ID_PATTERN)]
ConversationIdQuery = Annotated[str, Query(pattern=wire.CONVERSATION_ID_PATTERN)]
ConversationIdFilter = Annotated[str | None, Query(pattern=wire.CONVERSATION_ID_PATTERN)]


def _time(ts: Timestamp) -> str:
    return ts.ToDatetime().isoformat(timespec="microseconds") + "Z"


def _conversation(c: types_pb2.Conversation) -> Conversation:
    return Conversation(
        conversation_id=c.conversation_id,
        title=c.title,
        created_at=_time(c.create_time),
        updated_at=_time(c.update_time),
        message_count=c.message_count,
    )


@router.get("/conversations/{user_id}", response_model=ConversationList, responses=_ERRORS)
async def list_conversations(
    user_id: UserIdPath,
    limit: int = Query(50, ge=1, le=200),
    page_token: str | None = Query(None, max_length=512),
    caller: Caller = Depends(require_key),
    client: ChatClient = Depends(chat_client),
) -> ConversationList:
    """The user's conversations, most recently updated first."""
    check_user(caller, user_id)
    reply: chat_pb2.ListConversationsResponse = await downstream(
        client.call(
            client.stub.ListConversations,
            chat_pb2.ListConversationsRequest(user_id=user_id, page_size=limit, page_token=page_token or ""),
            metadata=metadata(caller),
        )
    )
    return ConversationList(
        user_id=user_id,
        conversations=[_conversation(c) for c in reply.conversations],
        next_page_token=reply.next_page_token or None,
    )


@router.post("/conversations", response_model=Conversation, status_code=201, responses=_ERRORS)
async def create_conversation(
    body: ConversationCreate,
    caller: Caller = Depends(require_key),
    client: ChatClient = Depends(chat_client),
) -> Conversation:
    """A new, empty conversation; chat in it with its `conversation_id`."""
    check_user(caller, body.user_id)
    reply: chat_pb2.CreateConversationResponse = await downstream(
        client.call(
            client.stub.CreateConversation,
            chat_pb2.CreateConversationRequest(user_id=body.user_id, title=body.title),
            metadata=metadata(caller),
        )
    )
    return _conversation(reply.conversation)


def _message(m: types_pb2.HistoryMessage, conversation_id: str | None = None) -> HistoryMessage:
    return HistoryMessage(
        message_id=m.message_id,
        conversation_id=conversation_id,
        role=role_name(m.role),
        content=m.content,
        token_count=m.token_count,
        created_at=_time(m.create_time),
        processing_time=m.processing_time if m.role == types_pb2.ROLE_ASSISTANT else None,
        model=m.model or None,
        tool_calls=[
            ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments)) for c in m.tool_calls
        ]
        or None,
        tool_call_id=m.tool_call_id or None,
    )


async def _messages(
    client: ChatClient, caller: Caller, user_id: str, conversation_id: str, limit: int, before: int
) -> chat_pb2.ListMessagesResponse:
    reply: chat_pb2.ListMessagesResponse = await downstream(
        client.call(
            client.stub.ListMessages,
            chat_pb2.ListMessagesRequest(
                user_id=user_id, conversation_id=conversation_id, page_size=limit, before_message_id=before
            ),
            metadata=metadata(caller),
        )
    )
    return reply


# Conversations one page of the seed's history across conversations spans.
CONVERSATIONS_PER_HISTORY_PAGE = 10


@router.get("/history/{user_id}", response_model=History, responses=_ERRORS)
async def history(
    user_id: UserIdPath,
    conversation_id: ConversationIdFilter = None,
    limit: int = Query(50, ge=1, le=500),
    before: int | None = Query(None, ge=1, description="next_before of the previous page"),
    page_token: str | None = Query(
        None, max_length=512, description="Without conversation_id: next_page_token of the previous page"
    ),
    caller: Caller = Depends(require_key),
    client: ChatClient = Depends(chat_client),
) -> History:
    """A conversation's messages, oldest first; page towards older ones with `before`. Without
    `conversation_id` (the seed API's form): the newest `limit` messages of each of the user's latest
    conversations, newest conversation first; page towards older conversations with `page_token`. A tool
    turn shows as such: the answer's `tool_calls`, then a `tool` message per result with its `tool_call_id`."""
    check_user(caller, user_id)
    if conversation_id is not None:
        reply = await _messages(client, caller, user_id, conversation_id, limit, before or 0)
        return History(
            user_id=user_id,
            conversation_id=conversation_id,
            messages=[_message(m) for m in reply.messages],
            next_before=reply.next_before_message_id or None,
        )
    listed: chat_pb2.ListConversationsResponse = await downstream(
        client.call(
            client.stub.ListConversations,
            chat_pb2.ListConversationsRequest(
                user_id=user_id, page_size=CONVERSATIONS_PER_HISTORY_PAGE, page_token=page_token or ""
            ),
            metadata=metadata(caller),
        )
    )
    ids = [c.conversation_id for c in listed.conversations]
    pages = await asyncio.gather(*(_messages(client, caller, user_id, cid, limit, 0) for cid in ids))
    return History(
        user_id=user_id,
        conversation_id=None,
        messages=[_message(m, cid) for cid, page in zip(ids, pages, strict=True) for m in page.messages],
        next_page_token=listed.next_page_token or None,
    )


@router.put("/conversations/{conversation_id}/title", response_model=Conversation, responses=_ERRORS)
async def rename_conversation(
    body: ConversationTitle,
    conversation_id: ConversationIdPath,
    caller: Caller = Depends(require_key),
    client: ChatClient = Depends(chat_client),
) -> Conversation:
    """Rename one of the user's conversations."""
    check_user(caller, body.user_id)
    reply: chat_pb2.RenameConversationResponse = await downstream(
        client.call(
            client.stub.RenameConversation,
            chat_pb2.RenameConversationRequest(
                user_id=body.user_id, conversation_id=conversation_id, title=body.title
            ),
            metadata=metadata(caller),
        )
    )
    return _conversation(reply.conversation)


@router.put("/conversations/title", response_model=Conversation, responses=_ERRORS)
async def rename_conversation_seed(
    body: SeedConversationTitle,
    caller: Caller = Depends(require_key),
    client: ChatClient = Depends(chat_client),
) -> Conversation:
    """The seed API's rename: the conversation named in the body."""
    return await rename_conversation(body, body.conversation_id, caller, client)


@router.delete("/conversations/{conversation_id}", response_model=ConversationDeleted, responses=_ERRORS)
async def delete_conversation(
    conversation_id: ConversationIdPath,
    user_id: UserIdQuery,
    caller: Caller = Depends(require_key),
    client: ChatClient = Depends(chat_client),
) -> ConversationDeleted:
    """Delete one of the user's conversations, its messages and its cached context."""
    check_user(caller, user_id)
    reply: chat_pb2.DeleteConversationResponse = await downstream(
        client.call(
            client.stub.DeleteConversation,
            chat_pb2.DeleteConversationRequest(user_id=user_id, conversation_id=conversation_id),
            metadata=metadata(caller),
        )
    )
    return ConversationDeleted(conversation_id=conversation_id, deleted_messages=reply.message_count)


@router.delete(
    "/conversations/{user_id}/{conversation_id}", response_model=ConversationDeleted, responses=_ERRORS
)
async def delete_conversation_seed(
    user_id: UserIdPath,
    conversation_id: ConversationIdPath,
    caller: Caller = Depends(require_key),
    client: ChatClient = Depends(chat_client),
) -> ConversationDeleted:
    """The seed API's delete: the user in the path."""
    return await delete_conversation(conversation_id, user_id, caller, client)
