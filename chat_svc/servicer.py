"""gRPC face of ChatService: validates ChatTurn, calls the plain async functions that do the work.

Errors are raised, not aborted: the request's own as `chatterbot.status` errors, a failed downstream call as
it comes (the shared interceptor passes it on), a shed turn or a job-queue failure as chat_svc's own, which
`chat_svc.errors.chat_status` (registered by `chat_svc.main`) turns into status.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

import grpc

from chat_svc.auth import may_act_for, require_user
from chat_svc.conversations import delete_conversation
from chat_svc.jobs import JobDeps, cancel, get_result, submit, user_of
from chat_svc.turn import TurnDeps, TurnInput, TurnResult, run_turn, stream_turn
from chatterbot import wire
from chatterbot.events import EventFanout
from chatterbot.jetstream import JobEvent
from chatterbot.logs import correlation_id as log_correlation_id
from chatterbot.status import InvalidArgument, NotFound
from chatterbot.v1 import chat_pb2, chat_pb2_grpc, inference_pb2, store_pb2, types_pb2

# Bounds of a whole-prompt turn (ChatTurn.messages); the engine still refuses a prompt longer than its model's.
MAX_PROMPT_MESSAGES = 256
MAX_PROMPT_CHARS = 400_000


class InvalidTurn(InvalidArgument, ValueError):
    """A ChatTurn that breaks the seed API's rules: INVALID_ARGUMENT on the wire, a ValueError to a caller that
    only validates."""


def _check_messages(turn: chat_pb2.ChatTurn) -> None:
    """The rules of a whole-prompt turn; raises InvalidTurn."""
    if len(turn.messages) > MAX_PROMPT_MESSAGES:
        raise InvalidTurn(f"turn.messages holds at most {MAX_PROMPT_MESSAGES} messages")
    calls: set[str] = set()  # ids of the calls a tool message may answer: the assistant message's before it
    for i, m in enumerate(turn.messages):
        if m.role not in wire.PROMPT_ROLES:
            raise InvalidTurn(f"turn.messages[{i}].role must be system, user, assistant or tool")
        if m.tool_calls and m.role != types_pb2.ROLE_ASSISTANT:
            raise InvalidTurn(f"turn.messages[{i}]: only assistant messages carry tool calls")
        if m.role == types_pb2.ROLE_ASSISTANT:
            calls = {c.id for c in m.tool_calls}
            if len(calls) != len(m.tool_calls) or not all(calls) or not all(c.name for c in m.tool_calls):
                raise InvalidTurn(f"turn.messages[{i}].tool_calls need ids of their own and names")
        elif m.role != types_pb2.ROLE_TOOL:
            calls = set()
        elif m.tool_call_id not in calls:
            raise InvalidTurn(
                f"turn.messages[{i}] is a tool message whose tool_call_id is not a call of the assistant "
                "message before it"
            )
    if sum(len(m.content) for m in turn.messages) > MAX_PROMPT_CHARS:
        raise InvalidTurn(f"turn.messages hold at most {MAX_PROMPT_CHARS} characters in all")
    last = turn.messages[-1]
    if last.role == types_pb2.ROLE_TOOL:
        if turn.message:
            raise InvalidTurn("turn.message must be empty when the last of turn.messages is a tool result")
    elif last.role != types_pb2.ROLE_USER:
        raise InvalidTurn("the last of turn.messages must be a user message or a tool result")
    elif last.content != turn.message:
        raise InvalidTurn("turn.message must equal the content of the last of turn.messages")
    if turn.context:
        raise InvalidTurn("turn.context must be empty when turn.messages is set")


def _is_tool_turn(turn: chat_pb2.ChatTurn) -> bool:
    return bool(turn.messages) and turn.messages[-1].role == types_pb2.ROLE_TOOL


def to_turn_input(turn: chat_pb2.ChatTurn, max_message_chars: int) -> TurnInput:
    """Validate a ChatTurn by the seed API's rules; raises InvalidTurn."""
    if not wire.is_user_id(turn.user_id):
        raise InvalidTurn(f"turn.user_id must be {wire.USER_ID_RULE}")
    if not 1 <= len(turn.message) <= max_message_chars and not _is_tool_turn(turn):
        raise InvalidTurn(f"turn.message must be 1 to {max_message_chars} characters")
    if len(turn.context) > 10:
        raise InvalidTurn("turn.context holds at most 10 strings")
    if turn.messages:
        _check_messages(turn)
    max_tokens = turn.max_tokens or 256
    # OpenAI-style clients may ask for very short answers.
    min_tokens = 1 if turn.messages else 10
    if not min_tokens <= max_tokens <= 1024:
        raise InvalidTurn(f"turn.max_tokens must be {min_tokens} to 1024")
    temperature = turn.temperature or 0.7
    if not 0.0 < temperature <= 2.0:
        raise InvalidTurn("turn.temperature must be above 0 and at most 2")
    if turn.greedy:
        temperature = 0.0
    top_p = turn.top_p or 1.0
    if not 0.0 < top_p <= 1.0:
        raise InvalidTurn("turn.top_p must be above 0 and at most 1")
    if turn.conversation_id and not wire.is_conversation_id(turn.conversation_id):
        raise InvalidTurn(f"turn.conversation_id must be {wire.CONVERSATION_ID_RULE}")
    if len(turn.request_id) > wire.REQUEST_ID_MAX:
        raise InvalidTurn(f"turn.request_id must be at most {wire.REQUEST_ID_MAX} characters")
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
        messages=list(turn.messages),
        options=turn.options if turn.HasField("options") else None,
    )


def watch_response(event: JobEvent) -> chat_pb2.WatchChatResponse:
    """A job event (as published by workers) on the wire."""
    response = chat_pb2.WatchChatResponse(
        sequence=event.seq, text=event.token, done=event.done, error=event.error, restart=event.restart
    )
    if event.done:
        response.conversation_id = event.conversation_id
        response.finish_reason = wire.finish_value(event.finish_reason)
        response.processing_time = event.processing_time
        if event.usage is not None:
            response.usage.CopyFrom(event.usage)
    return response


def _chat_response(result: TurnResult) -> chat_pb2.ChatResponse:
    return chat_pb2.ChatResponse(
        response=result.response,
        conversation_id=result.conversation_id,
        processing_time=result.processing_time,
        request_id=result.request_id,
        finish_reason=result.finish_reason,
        usage=result.usage,
        model=result.model,
        tool_calls=result.tool_calls,
        logprobs=result.logprobs,
    )


class ChatServicer(chat_pb2_grpc.ChatServiceServicer):
    def __init__(self, deps: TurnDeps, jobs: JobDeps, fanout: EventFanout, max_message_chars: int) -> None:
        self.deps = deps
        self.store = deps.store
        self.jobs = jobs
        self.fanout = fanout
        self.max_message_chars = max_message_chars

    def _turn(self, turn: chat_pb2.ChatTurn) -> TurnInput:
        log_correlation_id.set(turn.request_id)
        checked = to_turn_input(turn, self.max_message_chars)
        require_user(checked.user_id)
        return checked

    async def Chat(
        self, request: chat_pb2.ChatRequest, context: grpc.aio.ServicerContext
    ) -> chat_pb2.ChatResponse:
        return _chat_response(await run_turn(self.deps, self._turn(request.turn)))

    async def StreamChat(
        self, request: chat_pb2.StreamChatRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[chat_pb2.StreamChatResponse]:
        async with aclosing(stream_turn(self.deps, self._turn(request.turn))) as chunks:
            async for chunk, result in chunks:
                if result is None:
                    yield chat_pb2.StreamChatResponse(
                        text=chunk.text, tool_calls=chunk.tool_calls, logprobs=chunk.logprobs
                    )
                else:
                    yield chat_pb2.StreamChatResponse(
                        conversation_id=result.conversation_id,
                        finish_reason=result.finish_reason,
                        usage=result.usage,
                        processing_time=result.processing_time,
                        model=result.model,
                        request_id=result.request_id,
                    )

    async def GetStatus(
        self, request: chat_pb2.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> chat_pb2.GetStatusResponse:
        response = chat_pb2.GetStatusResponse(
            breakers={
                c.target: c.breaker.state for c in (self.deps.context, self.deps.inference, self.deps.store)
            }
        )
        if self.deps.ladder is None:
            response.rung = chat_pb2.DEGRADATION_RUNG_NONE
            return response
        rung, reason = self.deps.ladder.status()
        response.rung, response.reason = rung.to_proto(), reason
        response.inference_waiting = self.deps.ladder.waiting
        return response

    async def ListModels(
        self, request: chat_pb2.ChatServiceListModelsRequest, context: grpc.aio.ServicerContext
    ) -> chat_pb2.ChatServiceListModelsResponse:
        r: inference_pb2.ListModelsResponse = await self.deps.inference.call(
            self.deps.inference.stub.ListModels, inference_pb2.ListModelsRequest()
        )
        return chat_pb2.ChatServiceListModelsResponse(models=r.models)

    # --- queued chats on JetStream ---

    async def SubmitChat(
        self, request: chat_pb2.SubmitChatRequest, context: grpc.aio.ServicerContext
    ) -> chat_pb2.SubmitChatResponse:
        turn = self._turn(request.turn)
        if turn.messages:
            raise InvalidArgument("queued turns take no turn.messages")
        if turn.options is not None:
            raise InvalidArgument("queued turns take no turn.options")
        correlation_id = await submit(self.jobs, turn, request.priority)
        return chat_pb2.SubmitChatResponse(correlation_id=correlation_id, status=types_pb2.JOB_STATUS_PENDING)

    @staticmethod
    def _job_user(correlation_id: str, user_id: str) -> str:
        """The owner of a job the caller may see; NotFound otherwise."""
        owner = user_of(correlation_id)
        # Another user's job answers like one that does not exist, for a user key as for a wrong user_id.
        if (user_id and user_id != owner) or not may_act_for(owner):
            raise NotFound("unknown correlation id")
        return owner

    async def GetChatResult(
        self, request: chat_pb2.GetChatResultRequest, context: grpc.aio.ServicerContext
    ) -> chat_pb2.GetChatResultResponse:
        user_id = self._job_user(request.correlation_id, request.user_id)
        r = await get_result(self.jobs, request.correlation_id, user_id)
        return chat_pb2.GetChatResultResponse(
            correlation_id=r.correlation_id,
            status=r.status,
            response=r.response,
            conversation_id=r.conversation_id,
            processing_time=r.processing_time,
            error=r.error,
            finish_reason=r.finish_reason,
            usage=r.usage,
        )

    async def WatchChat(
        self, request: chat_pb2.WatchChatRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[chat_pb2.WatchChatResponse]:
        user_id = self._job_user(request.correlation_id, request.user_id)
        await get_result(self.jobs, request.correlation_id, user_id)
        async for event in self.fanout.watch(request.correlation_id, request.after_sequence):
            if event is not None:
                yield watch_response(event)

    async def CancelChat(
        self, request: chat_pb2.CancelChatRequest, context: grpc.aio.ServicerContext
    ) -> chat_pb2.CancelChatResponse:
        user_id = self._job_user(request.correlation_id, request.user_id)
        return chat_pb2.CancelChatResponse(status=await cancel(self.jobs, request.correlation_id, user_id))

    # --- conversation history: scoped by user id, served by store_svc ---

    async def ListConversations(
        self, request: chat_pb2.ListConversationsRequest, context: grpc.aio.ServicerContext
    ) -> chat_pb2.ListConversationsResponse:
        require_user(request.user_id)
        r: store_pb2.StoreServiceListConversationsResponse = await self.store.call(
            self.store.stub.ListConversations,
            store_pb2.StoreServiceListConversationsRequest(
                user_id=request.user_id, page_size=request.page_size, page_token=request.page_token
            ),
        )
        return chat_pb2.ListConversationsResponse(
            conversations=r.conversations, next_page_token=r.next_page_token
        )

    async def CreateConversation(
        self, request: chat_pb2.CreateConversationRequest, context: grpc.aio.ServicerContext
    ) -> chat_pb2.CreateConversationResponse:
        require_user(request.user_id)
        r: store_pb2.StoreServiceCreateConversationResponse = await self.store.call(
            self.store.stub.CreateConversation,
            store_pb2.StoreServiceCreateConversationRequest(user_id=request.user_id, title=request.title),
        )
        return chat_pb2.CreateConversationResponse(conversation=r.conversation)

    async def RenameConversation(
        self, request: chat_pb2.RenameConversationRequest, context: grpc.aio.ServicerContext
    ) -> chat_pb2.RenameConversationResponse:
        require_user(request.user_id)
        r: store_pb2.StoreServiceRenameConversationResponse = await self.store.call(
            self.store.stub.RenameConversation,
            store_pb2.StoreServiceRenameConversationRequest(
                user_id=request.user_id, conversation_id=request.conversation_id, title=request.title
            ),
        )
        return chat_pb2.RenameConversationResponse(conversation=r.conversation)

    async def DeleteConversation(
        self, request: chat_pb2.DeleteConversationRequest, context: grpc.aio.ServicerContext
    ) -> chat_pb2.DeleteConversationResponse:
        require_user(request.user_id)
        deleted = await delete_conversation(
            self.store, self.deps.context, request.user_id, request.conversation_id
        )
        return chat_pb2.DeleteConversationResponse(message_count=deleted)

    async def ListMessages(
        self, request: chat_pb2.ListMessagesRequest, context: grpc.aio.ServicerContext
    ) -> chat_pb2.ListMessagesResponse:
        require_user(request.user_id)
        r: store_pb2.StoreServiceListMessagesResponse = await self.store.call(
            self.store.stub.ListMessages,
            store_pb2.StoreServiceListMessagesRequest(
                user_id=request.user_id,
                conversation_id=request.conversation_id,
                page_size=request.page_size,
                before_message_id=request.before_message_id,
            ),
        )
        return chat_pb2.ListMessagesResponse(
            messages=r.messages, next_before_message_id=r.next_before_message_id
        )
