"""gRPC face of ChatService: validates ChatTurn, runs the turn, maps downstream failures to status codes."""

from __future__ import annotations

import re

import grpc

from chat_svc.turn import TurnDeps, TurnInput, TurnResult, run_turn, stream_turn
from chatterbot.breaker import CircuitOpenError
from chatterbot.guarded_client import GuardedClient, dependency_unavailable_metadata, retry_after_of
from chatterbot.v1 import chat_pb2, chat_pb2_grpc, store_pb2

_CONVERSATION_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_PASSTHROUGH = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS,
}


def to_turn_input(turn: chat_pb2.ChatTurn, max_message_chars: int) -> TurnInput:
    """Validate a ChatTurn by the seed API's rules; raises ValueError for INVALID_ARGUMENT."""
    if not 3 <= len(turn.user_id) <= 50:
        raise ValueError("turn.user_id must be 3 to 50 characters")
    if not 1 <= len(turn.message) <= max_message_chars:
        raise ValueError(f"turn.message must be 1 to {max_message_chars} characters")
    if len(turn.context) > 10:
        raise ValueError("turn.context holds at most 10 strings")
    max_tokens = turn.max_tokens or 256
    if not 10 <= max_tokens <= 1024:
        raise ValueError("turn.max_tokens must be 10 to 1024")
    temperature = turn.temperature or 0.7
    if not 0.0 < temperature <= 2.0:
        raise ValueError("turn.temperature must be above 0 and at most 2")
    top_p = turn.top_p or 1.0
    if not 0.0 < top_p <= 1.0:
        raise ValueError("turn.top_p must be above 0 and at most 1")
    if turn.conversation_id and not _CONVERSATION_ID.match(turn.conversation_id):
        raise ValueError("turn.conversation_id must be 1 to 64 of A-Z a-z 0-9 _ . : -")
    if len(turn.request_id) > 128:
        raise ValueError("turn.request_id must be at most 128 characters")
    return TurnInput(
        user_id=turn.user_id,
        message=turn.message,
        context=list(turn.context),
        max_tokens=max_tokens,
        temperature=temperature,
        conversation_id=turn.conversation_id,
        request_id=turn.request_id,
        model=turn.model,
        top_p=top_p,
        seed=turn.seed if turn.HasField("seed") else None,
        stop=list(turn.stop),
    )


async def abort_for(context: grpc.aio.ServicerContext, exc: BaseException, dependency: str = "") -> None:
    """End the call with the status a downstream failure deserves."""
    if isinstance(exc, CircuitOpenError):
        await context.abort(
            grpc.StatusCode.UNAVAILABLE,
            f"{exc.target} is unavailable (circuit open)",
            trailing_metadata=dependency_unavailable_metadata(exc.target, exc.retry_after),
        )
    if isinstance(exc, grpc.aio.AioRpcError):
        if exc.code() in _PASSTHROUGH:
            await context.abort(exc.code(), exc.details() or "")
        if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"{dependency or 'a dependency'} timed out")
        await context.abort(
            grpc.StatusCode.UNAVAILABLE,
            f"{dependency or 'a dependency'} failed: {exc.code().name}",
            trailing_metadata=dependency_unavailable_metadata(dependency or "dependency", retry_after_of(exc) or 1.0),
        )
    raise exc


def _chat_response(result: TurnResult) -> chat_pb2.ChatResponse:
    return chat_pb2.ChatResponse(
        response=result.response,
        conversation_id=result.conversation_id,
        processing_time=result.processing_time,
        request_id=result.request_id,
        finish_reason=result.finish_reason,
        usage=result.usage,
        model=result.model,
    )


class ChatServicer(chat_pb2_grpc.ChatServiceServicer):
    def __init__(self, deps: TurnDeps, store: GuardedClient, max_message_chars: int) -> None:
        self.deps = deps
        self.store = store
        self.max_message_chars = max_message_chars

    async def _turn(self, request, context) -> TurnInput:
        try:
            return to_turn_input(request.turn, self.max_message_chars)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise  # unreachable: abort raises

    async def Chat(self, request, context):
        turn = await self._turn(request, context)
        try:
            result = await run_turn(self.deps, turn)
        except (CircuitOpenError, grpc.aio.AioRpcError) as exc:
            await abort_for(context, exc)
        return _chat_response(result)

    async def StreamChat(self, request, context):
        turn = await self._turn(request, context)
        try:
            async for text, result in stream_turn(self.deps, turn):
                if result is None:
                    yield chat_pb2.StreamChatResponse(text=text)
                else:
                    yield chat_pb2.StreamChatResponse(
                        conversation_id=result.conversation_id,
                        finish_reason=result.finish_reason,
                        usage=result.usage,
                        processing_time=result.processing_time,
                        model=result.model,
                        request_id=result.request_id,
                    )
        except (CircuitOpenError, grpc.aio.AioRpcError) as exc:
            await abort_for(context, exc)

    # --- conversation history: scoped by user id, served by store_svc ---

    async def _store(self, context, method: str, request):
        try:
            return await self.store.unary(method, request)
        except (CircuitOpenError, grpc.aio.AioRpcError) as exc:
            await abort_for(context, exc, "store")

    async def ListConversations(self, request, context):
        r = await self._store(context, "ListConversations", store_pb2.StoreServiceListConversationsRequest(
            user_id=request.user_id, page_size=request.page_size, page_token=request.page_token))
        return chat_pb2.ListConversationsResponse(conversations=r.conversations, next_page_token=r.next_page_token)

    async def CreateConversation(self, request, context):
        r = await self._store(context, "CreateConversation", store_pb2.StoreServiceCreateConversationRequest(
            user_id=request.user_id, title=request.title))
        return chat_pb2.CreateConversationResponse(conversation=r.conversation)

    async def RenameConversation(self, request, context):
        r = await self._store(context, "RenameConversation", store_pb2.StoreServiceRenameConversationRequest(
            user_id=request.user_id, conversation_id=request.conversation_id, title=request.title))
        return chat_pb2.RenameConversationResponse(conversation=r.conversation)

    async def DeleteConversation(self, request, context):
        r = await self._store(context, "DeleteConversation", store_pb2.StoreServiceDeleteConversationRequest(
            user_id=request.user_id, conversation_id=request.conversation_id))
        return chat_pb2.DeleteConversationResponse(message_count=r.message_count)

    async def ListMessages(self, request, context):
        r = await self._store(context, "ListMessages", store_pb2.StoreServiceListMessagesRequest(
            user_id=request.user_id, conversation_id=request.conversation_id, page_size=request.page_size,
            before_message_id=request.before_message_id))
        return chat_pb2.ListMessagesResponse(messages=r.messages, next_before_message_id=r.next_before_message_id)
