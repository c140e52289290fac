"""`POST /chat`: one turn through chat_svc, answered whole or streamed as server-sent events."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc
import orjson
from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from chatterbot import wire
from chatterbot.breaker import CircuitOpenError
from chatterbot.logs import correlation_id as log_correlation_id
from chatterbot.v1 import chat_pb2
from edge.auth import Caller, authorize_turn, require_key
from edge.chat_client import ChatClient, Metadata, chat_client, metadata
from edge.disconnects import unless_disconnected
from edge.idempotency import RESPONSES as IDEMPOTENCY_RESPONSES
from edge.idempotency import Claim, Recorder, idempotency_key, keyed, openapi_parameter, run_once
from edge.json_templates import JSONTemplate
from edge.middleware import StreamMeter
from edge.problems import ProblemError, downstream, problem_for_downstream
from edge.protocol import (
    ChatRequest,
    ChatResponse,
    Problem,
    StreamError,
    StreamEvent,
    Usage,
    finish_reason,
)
from edge.rate_limits import RATE_LIMITED_RESPONSE
from edge.responses import ModelResponse
from edge.sse import EventStreamResponse, close_iterator

router = APIRouter(tags=["chat"])

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "Missing API key"},
    403: {"model": Problem, "description": "Invalid API key, or a user key acting for another user_id"},
    422: {"model": Problem, "description": "Invalid body"},
    429: RATE_LIMITED_RESPONSE,
    503: {"model": Problem, "description": "A service is unavailable; see Retry-After"},
    504: {"model": Problem, "description": "The answer took too long"},
}
# `{"token": ..., "done": false}`, every token event of a chat stream (queued streams' too).
token_event = JSONTemplate(
    lambda text: StreamEvent.model_construct(token=text, done=False), exclude_unset=True
)


def to_chat_turn(body: ChatRequest, max_message_chars: int) -> chat_pb2.ChatTurn:
    if len(body.message) > max_message_chars:
        raise ProblemError(422, f"message must be at most {max_message_chars} characters")
    request_id = uuid.uuid4().hex
    log_correlation_id.set(request_id)
    return chat_pb2.ChatTurn(
        user_id=body.user_id,
        message=body.message,
        context=body.context,
        max_tokens=body.max_tokens,
        temperature=body.temperature,
        conversation_id=body.conversation_id or "",
        request_id=request_id,
        model=body.model or "",
    )


@router.post(
    "/chat",
    response_model=ChatResponse,
    responses={
        **ERRORS,
        **IDEMPOTENCY_RESPONSES,
        200: {"content": {"text/event-stream": {}}, "description": "The answer, or a stream"},
    },
    openapi_extra=openapi_parameter(),
)
async def chat(
    body: ChatRequest,
    request: Request,
    caller: Caller = Depends(require_key),
    client: ChatClient = Depends(chat_client),
) -> ChatResponse | Response:
    """Run one chat turn. With `stream: true` the answer arrives as `data: {"token", "done"}` events."""
    settings = request.app.state.settings
    turn = to_chat_turn(body, settings.max_message_chars)
    key = idempotency_key(request)
    if key is not None:
        return await _chat_once(body, request, caller, client, turn, key)
    await authorize_turn(request, caller, body.user_id, body.max_tokens)
    if body.stream:
        return await _stream(
            client, turn, metadata(caller), settings.sse_keepalive_seconds, StreamMeter(request, "/chat")
        )
    return await _answer(request, client, caller, turn)


async def _answer(
    request: Request, client: ChatClient, caller: Caller, turn: chat_pb2.ChatTurn
) -> ChatResponse:
    reply: chat_pb2.ChatResponse = await downstream(
        unless_disconnected(
            request,
            client.call(client.stub.Chat, chat_pb2.ChatRequest(turn=turn), metadata=metadata(caller)),
        )
    )
    return ChatResponse(
        response=reply.response, conversation_id=reply.conversation_id, processing_time=reply.processing_time
    )


def _token_text(data: str) -> str | None:
    """The text of a plain token event (`{"token", "done": false}`), None for any other."""
    event = orjson.loads(data)
    return event["token"] if event.keys() == {"token", "done"} and event["done"] is False else None


def _is_error(event: Mapping[str, str]) -> bool:
    return event.get("event") == "error"


async def _chat_once(
    body: ChatRequest,
    request: Request,
    caller: Caller,
    client: ChatClient,
    turn: chat_pb2.ChatTurn,
    key: str,
) -> Response:
    """A turn with an Idempotency-Key (edge.idempotency): run once, its answer (or stream) replayed after."""
    settings = request.app.state.settings
    once = keyed(caller.principal.key_id, key, "/chat", body)
    turn.request_id = once.request_id
    log_correlation_id.set(once.request_id)

    async def run(claim: Claim) -> Response:
        await authorize_turn(request, caller, body.user_id, body.max_tokens)
        if body.stream:
            record = claim.recorder(_is_error, _token_text, token_event)
            meter = StreamMeter(request, "/chat")
            return await _stream(
                client, turn, metadata(caller), settings.sse_keepalive_seconds, meter, record
            )
        return ModelResponse(await _answer(request, client, caller, turn))

    if body.stream:
        return await run_once(
            request, once, run, wait_seconds=None, replay=lambda stored: stored.stream(numbered=True)
        )
    return await run_once(request, once, run, wait_seconds=settings.deadline_seconds)


def done_event(message: chat_pb2.StreamChatResponse) -> str:
    """The last event of a chat stream: no token, and the turn's details."""
    return StreamEvent(
        token="",
        done=True,
        conversation_id=message.conversation_id,
        finish_reason=finish_reason(message.finish_reason),
        usage=Usage(**wire.usage_dict(message.usage)),
        processing_time=message.processing_time,
    ).model_dump_json(exclude_unset=True)


async def _stream(
    client: ChatClient,
    turn: chat_pb2.ChatTurn,
    call_metadata: Metadata,
    keepalive_seconds: float,
    meter: StreamMeter,
    record: Recorder | None = None,
) -> EventStreamResponse:
    """`record`: what the events pass through on their way (a keyed stream keeps them)."""
    stream: AsyncIterator[chat_pb2.StreamChatResponse] = client.stream(
        client.stub.StreamChat, chat_pb2.StreamChatRequest(turn=turn), metadata=call_metadata
    )
    try:
        # Wait for the first message so that an unavailable mesh is a 503, not a broken stream.
        first = await anext(stream)
    except (CircuitOpenError, grpc.aio.AioRpcError) as exc:
        await close_iterator(stream)
        raise problem_for_downstream(exc) from None

    async def events() -> AsyncIterator[dict[str, str]]:
        try:
            message = first
            seq = 0
            while True:
                seq += 1
                if message.finish_reason:
                    yield {"id": str(seq), "data": done_event(message)}
                    yield {"id": str(seq + 1), "data": "[DONE]"}
                    return
                meter.token()
                yield {"id": str(seq), "data": token_event(message.text)}
                message = await anext(stream)
        except (CircuitOpenError, grpc.aio.AioRpcError) as exc:
            problem = problem_for_downstream(exc)
            error = StreamError(status=problem.status, detail=problem.detail)
            yield {"event": "error", "data": error.model_dump_json()}
        finally:
            meter.close()
            # Closing the guarded stream cancels the gRPC call, and with it the generation.
            await close_iterator(stream)

    source = events() if record is None else record(events())
    return EventStreamResponse(source, ping_seconds=keepalive_seconds)
