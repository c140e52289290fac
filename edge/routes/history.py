"""Conversations and history, served directly (no queue): ChatService's history RPCs, scoped by user id."""

from __future__ import annotations

import grpc
from fastapi import APIRouter, Depends, Path, Query, Request
from google.protobuf.timestamp_pb2 import Timestamp

from chatterbot.api_keys import API_KEY_METADATA
from chatterbot.breaker import CircuitOpenError
from chatterbot.v1 import chat_pb2, types_pb2
from edge.auth import Caller, check_user, require_key
from edge.problems import problem_for_downstream
from edge.protocol import (
    CONVERSATION_ID_PATTERN,
    Conversation,
    ConversationCreate,
    ConversationDeleted,
    ConversationList,
    ConversationTitle,
    History,
    HistoryMessage,
    Problem,
)
from edge.rate_limits import RATE_LIMITED_RESPONSE

router = APIRouter(tags=["history"])

_ROLES = {types_pb2.ROLE_SYSTEM: "system", types_pb2.ROLE_USER: "user", types_pb2.ROLE_ASSISTANT: "assistant"}
_ERRORS = {
    401: {"model": Problem, "description": "Missing API key"},
    403: {"model": Problem, "description": "Invalid API key, or a user key acting for another user_id"},
    404: {"model": Problem, "description": "No such conversation for this user"},
    422: {"model": Problem, "description": "Invalid request"},
    429: RATE_LIMITED_RESPONSE,
    503: {"model": Problem, "description": "A service is unavailable; see Retry-After"},
}
UserId = Path(min_length=3, max_length=50)
ConversationId = Path(pattern=CONVERSATION_ID_PATTERN)


async def _call(request: Request, caller: Caller, method: str, message):
    chat = request.app.state.chat
    try:
        return await chat.call(
            getattr(chat.stub, method), message, metadata=((API_KEY_METADATA, caller.key),)
        )
    except (CircuitOpenError, grpc.aio.AioRpcError) as exc:
        raise problem_for_downstream(exc) from None


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
    request: Request,
    user_id: str = UserId,
    limit: int = Query(50, ge=1, le=200),
    page_token: str | None = Query(None, max_length=512),
    caller: Caller = Depends(require_key),
) -> ConversationList:
    """The user's conversations, most recently updated first."""
    check_user(caller, user_id)
    reply = await _call(
        request,
        caller,
        "ListConversations",
        chat_pb2.ListConversationsRequest(user_id=user_id, page_size=limit, page_token=page_token or ""),
    )
    return ConversationList(
        user_id=user_id,
        conversations=[_conversation(c) for c in reply.conversations],
        next_page_token=reply.next_page_token or None,
    )


@router.post("/conversations", response_model=Conversation, status_code=201, responses=_ERRORS)
async def create_conversation(
    body: ConversationCreate, request: Request, caller: Caller = Depends(require_key)
) -> Conversation:
    """A new, empty conversation; chat in it with its `conversation_id`."""
    check_user(caller, body.user_id)
    reply = await _call(
        request,
        caller,
        "CreateConversation",
        chat_pb2.CreateConversationRequest(user_id=body.user_id, title=body.title),
    )
    return _conversation(reply.conversation)


@router.get("/history/{user_id}", response_model=History, responses=_ERRORS)
async def history(
    request: Request,
    user_id: str = UserId,
    conversation_id: str = Query(pattern=CONVERSATION_ID_PATTERN),
    limit: int = Query(50, ge=1, le=500),
    before: int | None = Query(None, ge=1, description="next_before of the previous page"),
    caller: Caller = Depends(require_key),
) -> History:
    """A conversation's messages, oldest first; page towards older ones with `before`."""
    check_user(caller, user_id)
    reply = await _call(
        request,
        caller,
        "ListMessages",
        chat_pb2.ListMessagesRequest(
            user_id=user_id, conversation_id=conversation_id, page_size=limit, before_message_id=before or 0
        ),
    )
    return History(
        user_id=user_id,
        conversation_id=conversation_id,
        messages=[
            HistoryMessage(
                message_id=m.message_id,
                role=_ROLES.get(m.role, "user"),
                content=m.content,
                token_count=m.token_count,
                created_at=_time(m.create_time),
                processing_time=m.processing_time if m.role == types_pb2.ROLE_ASSISTANT else None,
                model=m.model or None,
            )
            for m in reply.messages
        ],
        next_before=reply.next_before_message_id or None,
    )


@router.put("/conversations/{conversation_id}/title", response_model=Conversation, responses=_ERRORS)
async def rename_conversation(
    body: ConversationTitle,
    request: Request,
    conversation_id: str = ConversationId,
    caller: Caller = Depends(require_key),
) -> Conversation:
    """Rename one of the user's conversations."""
    check_user(caller, body.user_id)
    reply = await _call(
        request,
        caller,
        "RenameConversation",
        chat_pb2.RenameConversationRequest(
            user_id=body.user_id, conversation_id=conversation_id, title=body.title
        ),
    )
    return _conversation(reply.conversation)


@router.delete("/conversations/{conversation_id}", response_model=ConversationDeleted, responses=_ERRORS)
async def delete_conversation(
    request: Request,
    conversation_id: str = ConversationId,
    user_id: str = Query(min_length=3, max_length=50),
    caller: Caller = Depends(require_key),
) -> ConversationDeleted:
    """Delete one of the user's conversations, its messages and its cached context."""
    check_user(caller, user_id)
    reply = await _call(
        request,
        caller,
        "DeleteConversation",
        chat_pb2.DeleteConversationRequest(user_id=user_id, conversation_id=conversation_id),
    )
    return ConversationDeleted(conversation_id=conversation_id, deleted_messages=reply.message_count)
