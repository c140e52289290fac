"""`POST /chat`: one turn through chat_svc, answered whole or streamed as server-sent events."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import grpc
import orjson
from fastapi import APIRouter, Depends, Request

from chatterbot.api_keys import API_KEY_METADATA
from chatterbot.breaker import CircuitOpenError
from chatterbot.logs import correlation_id as log_correlation_id
from chatterbot.v1 import chat_pb2, types_pb2
from edge.auth import Caller, authorize_turn, require_key
from edge.disconnects import unless_disconnected
from edge.problems import ProblemError, problem_for_downstream
from edge.protocol import ChatRequest, ChatResponse, Problem
from edge.rate_limits import RATE_LIMITED_RESPONSE
from edge.sse import EventStreamResponse, with_pings

router = APIRouter(tags=["chat"])

FINISH_REASONS = {
    types_pb2.FINISH_REASON_STOP: "stop",
    types_pb2.FINISH_REASON_LENGTH: "length",
    types_pb2.FINISH_REASON_ABORT: "abort",
}
_ERRORS = {
    401: {"model": Problem, "description": "Missing API key"},
    403: {"model": Problem, "description": "Invalid API key, or a user key acting for another user_id"},
    422: {"model": Problem, "description": "Invalid body"},
    429: RATE_LIMITED_RESPONSE,
    503: {"model": Problem, "description": "A service is unavailable; see Retry-After"},
    504: {"model": Problem, "description": "The answer took too long"},
}


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
    )


@router.post(
    "/chat",
    response_model=ChatResponse,
    responses={
        **_ERRORS,
        200: {"content": {"text/event-stream": {}}, "description": "The answer, or a stream"},
    },
)
async def chat(body: ChatRequest, request: Request, caller: Caller = Depends(require_key)):
    """Run one chat turn. With `stream: true` the answer arrives as `data: {"token", "done"}` events."""
    state = request.app.state
    turn = to_chat_turn(body, state.settings.max_message_chars)
    await authorize_turn(request, caller, body.user_id, body.max_tokens)
    metadata = ((API_KEY_METADATA, caller.key),)
    if body.stream:
        return await _stream(state.chat, turn, metadata, state.settings.sse_keepalive_seconds)
    try:
        reply = await unless_disconnected(
            request, state.chat.call(state.chat.stub.Chat, chat_pb2.ChatRequest(turn=turn), metadata=metadata)
        )
    except (CircuitOpenError, grpc.aio.AioRpcError) as exc:
        raise problem_for_downstream(exc) from None
    return ChatResponse(
        response=reply.response, conversation_id=reply.conversation_id, processing_time=reply.processing_time
    )


async def _stream(chat, turn: chat_pb2.ChatTurn, metadata, keepalive_seconds: float) -> EventStreamResponse:
    stream = chat.stream(chat.stub.StreamChat, chat_pb2.StreamChatRequest(turn=turn), metadata=metadata)
    try:
        # Wait for the first message so that an unavailable mesh is a 503, not a broken stream.
        first = await anext(stream)
    except (CircuitOpenError, grpc.aio.AioRpcError) as exc:
        await stream.aclose()
        raise problem_for_downstream(exc) from None

    async def events() -> AsyncIterator[dict]:
        try:
            message = first
            seq = 0
            while True:
                seq += 1
                if message.finish_reason:
                    yield {
                        "id": str(seq),
                        "data": orjson.dumps(
                            {
                                "token": "",
                                "done": True,
                                "conversation_id": message.conversation_id,
                                "finish_reason": FINISH_REASONS.get(message.finish_reason, "stop"),
                                "usage": {
                                    "prompt_tokens": message.usage.prompt_tokens,
                                    "completion_tokens": message.usage.completion_tokens,
                                    "total_tokens": message.usage.total_tokens,
                                },
                                "processing_time": message.processing_time,
                            }
                        ).decode(),
                    }
                    yield {"id": str(seq + 1), "data": "[DONE]"}
                    return
                yield {"id": str(seq), "data": orjson.dumps({"token": message.text, "done": False}).decode()}
                message = await anext(stream)
        except (CircuitOpenError, grpc.aio.AioRpcError) as exc:
            problem = problem_for_downstream(exc)
            yield {
                "event": "error",
                "data": orjson.dumps({"status": problem.status, "detail": problem.detail}).decode(),
            }
        finally:
            # Closing the guarded stream cancels the gRPC call, and with it the generation.
            await stream.aclose()

    return EventStreamResponse(with_pings(events(), keepalive_seconds))
