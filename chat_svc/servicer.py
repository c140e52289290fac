"""gRPC face of ChatService: validates ChatTurn, runs the turn, maps downstream failures to status codes."""

from __future__ import annotations

import re

import grpc
import nats.errors

from chat_svc.auth import may_act_for, require_user
from chat_svc.degradation import Shed
from chat_svc.jobs import BadCorrelationId, JobDeps, cancel, get_result, submit, user_of
from chat_svc.turn import TurnDeps, TurnInput, TurnResult, run_turn, stream_turn
from chatterbot.breaker import CircuitOpenError
from chatterbot.events import EventFanout
from chatterbot.guarded_client import dependency_unavailable_metadata, retry_after_of
from chatterbot.logs import correlation_id as log_correlation_id
from chatterbot.v1 import chat_pb2, chat_pb2_grpc, context_pb2, inference_pb2, store_pb2, types_pb2

_CONVERSATION_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_PASSTHROUGH = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS,
}
_PROMPT_ROLES = frozenset({types_pb2.ROLE_SYSTEM, types_pb2.ROLE_USER, types_pb2.ROLE_ASSISTANT})
# Bounds of a whole-prompt turn (ChatTurn.messages); the engine still refuses a prompt longer than its model's.
MAX_PROMPT_MESSAGES = 256
MAX_PROMPT_CHARS = 400_000


def _check_messages(turn: chat_pb2.ChatTurn) -> None:
    """The rules of a whole-prompt turn; raises ValueError for INVALID_ARGUMENT."""
    if len(turn.messages) > MAX_PROMPT_MESSAGES:
        raise ValueError(f"turn.messages holds at most {MAX_PROMPT_MESSAGES} messages")
    for i, m in enumerate(turn.messages):
        if m.role not in _PROMPT_ROLES:
            raise ValueError(f"turn.messages[{i}].role must be system, user or assistant")
    if sum(len(m.content) for m in turn.messages) > MAX_PROMPT_CHARS:
        raise ValueError(f"turn.messages hold at most {MAX_PROMPT_CHARS} characters in all")
    if turn.messages[-1].role != types_pb2.ROLE_USER:
        raise ValueError("the last of turn.messages must be a user message")
    if turn.messages[-1].content != turn.message:
        raise ValueError("turn.message must equal the content of the last of turn.messages")
    if turn.context:
        raise ValueError("turn.context must be empty when turn.messages is set")


def to_turn_input(turn: chat_pb2.ChatTurn, max_message_chars: int) -> TurnInput:
    """Validate a ChatTurn by the seed API's rules; raises ValueError for INVALID_ARGUMENT."""
    if not 3 <= len(turn.user_id) <= 50:
        raise ValueError("turn.user_id must be 3 to 50 characters")
    if not 1 <= len(turn.message) <= max_message_chars:
        raise ValueError(f"turn.message must be 1 to {max_message_chars} characters")
    if len(turn.context) > 10:
        raise ValueError("turn.context holds at most 10 strings")
    if turn.messages:
        _check_messages(turn)
    max_tokens = turn.max_tokens or 256
    # OpenAI-style clients may ask for very short answers.
    min_tokens = 1 if turn.messages else 10
    if not min_tokens <= max_tokens <= 1024:
        raise ValueError(f"turn.max_tokens must be {min_tokens} to 1024")
    temperature = turn.temperature or 0.7
    if not 0.0 < temperature <= 2.0:
        raise ValueError("turn.temperature must be above 0 and at most 2")
    if turn.greedy:
        temperature = 0.0
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
        messages=list(turn.messages),
    )


async def abort_for(context: grpc.aio.ServicerContext, exc: BaseException, dependency: str = "") -> None:
    """End the call with the status a downstream failure deserves."""
    if isinstance(exc, Shed):
        await context.abort(
            grpc.StatusCode.UNAVAILABLE,
            f"shedding load: {exc}",
            trailing_metadata=dependency_unavailable_metadata("inference", exc.retry_after),
        )
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
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"{dependency or 'a dependency'} timed out"
            )
        await context.abort(
            grpc.StatusCode.UNAVAILABLE,
            f"{dependency or 'a dependency'} failed: {exc.code().name}",
            trailing_metadata=dependency_unavailable_metadata(
                dependency or "dependency", retry_after_of(exc) or 1.0
            ),
        )
    raise exc


_FINISH_VALUES = {
    "stop": types_pb2.FINISH_REASON_STOP,
    "length": types_pb2.FINISH_REASON_LENGTH,
    "abort": types_pb2.FINISH_REASON_ABORT,
}


def watch_response(event: dict) -> chat_pb2.WatchChatResponse:
    """A job event (as published by workers) on the wire."""
    response = chat_pb2.WatchChatResponse(
        sequence=event["seq"],
        text=event.get("token", ""),
        done=bool(event.get("done")),
        error=event.get("error", ""),
        restart=bool(event.get("restart")),
    )
    if response.done:
        response.conversation_id = event.get("conversation_id", "")
        response.finish_reason = _FINISH_VALUES.get(
            event.get("finish_reason", ""), types_pb2.FINISH_REASON_STOP
        )
        response.processing_time = event.get("processing_time", 0.0)
        usage = event.get("usage") or {}
        response.usage.prompt_tokens = usage.get("prompt_tokens", 0)
        response.usage.completion_tokens = usage.get("completion_tokens", 0)
        response.usage.total_tokens = usage.get("total_tokens", 0)
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
    )


class ChatServicer(chat_pb2_grpc.ChatServiceServicer):
    def __init__(self, deps: TurnDeps, jobs: JobDeps, fanout: EventFanout, max_message_chars: int) -> None:
        self.deps = deps
        self.store = deps.store
        self.jobs = jobs
        self.fanout = fanout
        self.max_message_chars = max_message_chars

    async def _turn(self, request, context) -> TurnInput:
        log_correlation_id.set(request.turn.request_id)
        try:
            turn = to_turn_input(request.turn, self.max_message_chars)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise  # unreachable: abort raises
        await require_user(context, turn.user_id)
        return turn

    async def Chat(self, request, context):
        turn = await self._turn(request, context)
        try:
            result = await run_turn(self.deps, turn)
        except (CircuitOpenError, grpc.aio.AioRpcError, Shed) as exc:
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
        except (CircuitOpenError, grpc.aio.AioRpcError, Shed) as exc:
            await abort_for(context, exc)

    async def GetStatus(self, request, context):
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

    async def ListModels(self, request, context):
        try:
            r = await self.deps.inference.call(
                self.deps.inference.stub.ListModels, inference_pb2.ListModelsRequest()
            )
        except (CircuitOpenError, grpc.aio.AioRpcError) as exc:
            await abort_for(context, exc, "inference")
        return chat_pb2.ChatServiceListModelsResponse(models=r.models)

    # --- queued chats on JetStream ---

    async def SubmitChat(self, request, context):
        turn = await self._turn(request, context)
        if turn.messages:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "queued turns take no turn.messages")
        try:
            correlation_id = await submit(self.jobs, turn, request.priority)
        except (CircuitOpenError, grpc.aio.AioRpcError) as exc:
            await abort_for(context, exc, "store")
        except nats.errors.Error as exc:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"job queue unavailable: {type(exc).__name__}",
                trailing_metadata=dependency_unavailable_metadata("nats", 1.0),
            )
        return chat_pb2.SubmitChatResponse(correlation_id=correlation_id, status=types_pb2.JOB_STATUS_PENDING)

    async def _job_user(self, request, context) -> str:
        try:
            owner = user_of(request.correlation_id)
        except BadCorrelationId:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown correlation id")
        # Another user's job answers like one that does not exist, for a user key as for a wrong user_id.
        if (request.user_id and request.user_id != owner) or not may_act_for(owner):
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown correlation id")
        return owner

    async def GetChatResult(self, request, context):
        user_id = await self._job_user(request, context)
        try:
            r = await get_result(self.jobs, request.correlation_id, user_id)
        except (CircuitOpenError, grpc.aio.AioRpcError) as exc:
            await abort_for(context, exc, "store")
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

    async def WatchChat(self, request, context):
        user_id = await self._job_user(request, context)
        try:
            await get_result(self.jobs, request.correlation_id, user_id)
        except (CircuitOpenError, grpc.aio.AioRpcError) as exc:
            await abort_for(context, exc, "store")
        async for event in self.fanout.watch(request.correlation_id, request.after_sequence):
            yield watch_response(event)

    async def CancelChat(self, request, context):
        user_id = await self._job_user(request, context)
        try:
            status = await cancel(self.jobs, request.correlation_id, user_id)
        except (CircuitOpenError, grpc.aio.AioRpcError) as exc:
            await abort_for(context, exc, "store")
        return chat_pb2.CancelChatResponse(status=status)

    # --- conversation history: scoped by user id, served by store_svc ---

    async def _store(self, context, method: str, request):
        try:
            return await self.store.call(getattr(self.store.stub, method), request)
        except (CircuitOpenError, grpc.aio.AioRpcError) as exc:
            await abort_for(context, exc, "store")

    async def ListConversations(self, request, context):
        await require_user(context, request.user_id)
        r = await self._store(
            context,
            "ListConversations",
            store_pb2.StoreServiceListConversationsRequest(
                user_id=request.user_id, page_size=request.page_size, page_token=request.page_token
            ),
        )
        return chat_pb2.ListConversationsResponse(
            conversations=r.conversations, next_page_token=r.next_page_token
        )

    async def CreateConversation(self, request, context):
        await require_user(context, request.user_id)
        r = await self._store(
            context,
            "CreateConversation",
            store_pb2.StoreServiceCreateConversationRequest(user_id=request.user_id, title=request.title),
        )
        return chat_pb2.CreateConversationResponse(conversation=r.conversation)

    async def RenameConversation(self, request, context):
        await require_user(context, request.user_id)
        r = await self._store(
            context,
            "RenameConversation",
            store_pb2.StoreServiceRenameConversationRequest(
                user_id=request.user_id, conversation_id=request.conversation_id, title=request.title
            ),
        )
        return chat_pb2.RenameConversationResponse(conversation=r.conversation)

    async def DeleteConversation(self, request, context):
        await require_user(context, request.user_id)
        deleted = None
        try:
            deleted = await self.store.call(
                self.store.stub.DeleteConversation,
                store_pb2.StoreServiceDeleteConversationRequest(
                    user_id=request.user_id, conversation_id=request.conversation_id
                ),
            )
        except (CircuitOpenError, grpc.aio.AioRpcError) as exc:
            if not (isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.NOT_FOUND):
                await abort_for(context, exc, "store")
        # The cached context goes too; also when the rows are gone already, so a retried delete finishes it.
        try:
            await self.deps.context.call(
                self.deps.context.stub.ClearContext,
                context_pb2.ClearContextRequest(
                    user_id=request.user_id, conversation_id=request.conversation_id
                ),
            )
        except (CircuitOpenError, grpc.aio.AioRpcError) as exc:
            await abort_for(context, exc, "context")
        if deleted is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"conversation {request.conversation_id!r} not found"
            )
        return chat_pb2.DeleteConversationResponse(message_count=deleted.message_count)

    async def ListMessages(self, request, context):
        await require_user(context, request.user_id)
        r = await self._store(
            context,
            "ListMessages",
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
