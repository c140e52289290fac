"""The OpenAI-compatible API: `POST /v1/chat/completions` (whole or streamed) and `GET /v1/models`.

A completion is one chat turn through chat_svc whose prompt is the request's `messages` (ChatTurn.messages):
no stored context is read, but the exchange (the last user message and the answer) is stored as history
like any other turn. Errors are problem bodies, as on every route, that also carry OpenAI's `error` object.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from http import HTTPStatus
from typing import Any

import grpc
import orjson
from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from chatterbot.api_keys import API_KEY_METADATA
from chatterbot.breaker import CircuitOpenError
from chatterbot.settings import Settings
from chatterbot.v1 import chat_pb2, types_pb2
from edge.auth import Caller, authorize_turn, require_key
from edge.disconnects import unless_disconnected
from edge.openai_protocol import ChatCompletion, ChatCompletionRequest, ModelList, OpenAIProblem
from edge.problems import PROBLEM_MEDIA_TYPE, ProblemError, problem_for_downstream
from edge.protocol import CONVERSATION_ID_PATTERN
from edge.responses import JSONBytesResponse
from edge.sse import EventStreamResponse, with_pings

FINISH_REASONS = {
    types_pb2.FINISH_REASON_STOP: "stop",
    types_pb2.FINISH_REASON_LENGTH: "length",
    types_pb2.FINISH_REASON_ABORT: "abort",
}
_ROLES = {
    "system": types_pb2.ROLE_SYSTEM,
    "developer": types_pb2.ROLE_SYSTEM,
    "user": types_pb2.ROLE_USER,
    "assistant": types_pb2.ROLE_ASSISTANT,
}
# OpenAI's error types by status; the SDKs pick their exception class by the status alone.
_ERROR_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


def error_object(status: int, message: str | None, param: str | None = None) -> dict:
    """OpenAI's `error` object for an HTTP status."""
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"message": message or HTTPStatus(status).phrase, "type": kind, "param": param, "code": status}


def openai_problem(
    status: int,
    detail: str | None,
    headers: dict[str, str] | None = None,
    errors: list[dict] | None = None,
    param: str | None = None,
) -> JSONBytesResponse:
    """A problem response (RFC 9457) that OpenAI's SDKs also understand."""
    body: dict[str, Any] = {"type": "about:blank", "title": HTTPStatus(status).phrase, "status": status}
    if detail:
        body["detail"] = detail
    if errors is not None:
        body["errors"] = errors
    body["error"] = error_object(status, detail, param)
    return JSONBytesResponse(body, status_code=status, headers=headers, media_type=PROBLEM_MEDIA_TYPE)


def _validation_problem(exc: RequestValidationError) -> JSONBytesResponse:
    errors, described = [], []
    for e in exc.errors():
        loc = [str(part) for part in e.get("loc", ())]
        msg = str(e.get("msg", "")).removeprefix("Value error, ")
        errors.append({"loc": loc, "msg": msg, "type": e.get("type", "")})
        field = ".".join(loc[1:]) if loc[:1] == ["body"] else ".".join(loc)
        described.append(f"{field}: {msg}" if field else msg)
    param = next((".".join(err["loc"][1:]) for err in errors if len(err["loc"]) > 1), None)
    detail = "the request is not valid: " + "; ".join(described[:3])
    return openai_problem(422, detail, errors=errors, param=param)


class OpenAIErrorRoute(APIRoute):
    """A route whose errors (auth, validation, downstream) also carry OpenAI's `error` object."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def handler(request: Request) -> Response:
            try:
                return await handle(request)
            except ProblemError as exc:
                return openai_problem(exc.status, exc.detail, exc.headers)
            except RequestValidationError as exc:
                return _validation_problem(exc)
            except StarletteHTTPException as exc:
                detail = exc.detail if isinstance(exc.detail, str) else None
                return openai_problem(exc.status_code, detail, getattr(exc, "headers", None))

        return handler


router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIErrorRoute)

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": OpenAIProblem, "description": "Missing API key"},
    403: {"model": OpenAIProblem, "description": "Invalid API key"},
    404: {"model": OpenAIProblem, "description": "Unknown model"},
    422: {"model": OpenAIProblem, "description": "Invalid body or header"},
    429: {"model": OpenAIProblem, "description": "Over a rate limit; see Retry-After"},
    503: {"model": OpenAIProblem, "description": "A service is unavailable; see Retry-After"},
    504: {"model": OpenAIProblem, "description": "The answer took too long"},
}


def to_chat_turn(
    body: ChatCompletionRequest, settings: Settings, conversation_id: str | None
) -> chat_pb2.ChatTurn:
    """The chat turn of a completion request: its messages are the whole prompt."""
    messages = [types_pb2.ChatMessage(role=_ROLES[m.role], content=m.text) for m in body.messages]
    last = messages[-1].content
    if not 1 <= len(last) <= settings.max_message_chars:
        raise ProblemError(422, f"the last message must be 1 to {settings.max_message_chars} characters")
    turn = chat_pb2.ChatTurn(
        user_id=body.user or settings.openai_default_user,
        message=last,
        messages=messages,
        max_tokens=body.completion_tokens_limit,
        # OpenAI's default temperature is 1; 0 asks for greedy sampling, which ChatTurn spells `greedy`.
        temperature=1.0 if body.temperature is None else body.temperature,
        greedy=body.temperature == 0,
        top_p=body.top_p or 1.0,
        stop=body.stop_sequences,
        conversation_id=conversation_id or "",
        request_id=uuid.uuid4().hex,
        model=body.model,
    )
    if body.seed is not None:
        turn.seed = body.seed
    return turn


def _usage(usage: types_pb2.Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    responses={
        **_ERRORS,
        200: {
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
            "description": "The completion, or with `stream: true` `data:` events each holding a "
            "`chat.completion.chunk` (see ChatCompletionChunk in edge/openai_protocol.py), "
            "ending with `data: [DONE]`",
        },
    },
)
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    caller: Caller = Depends(require_key),
    x_conversation_id: str | None = Header(
        None,
        pattern=CONVERSATION_ID_PATTERN,
        description="Store the exchange in this conversation. Omitted: a conversation derived from the user and "
        "the first user message, so resending a growing conversation keeps to one stored conversation",
    ),
):
    """Generate the next assistant message of `messages` (OpenAI's chat completions API)."""
    state = request.app.state
    settings: Settings = state.settings
    turn = to_chat_turn(body, settings, x_conversation_id)
    if caller.user_id and not body.user:
        turn.user_id = caller.user_id  # a user key speaks for its own user
    await authorize_turn(request, caller, turn.user_id, turn.max_tokens)
    metadata = ((API_KEY_METADATA, caller.key),)
    created = int(time.time())
    if body.stream:
        return await _stream(
            state.chat,
            turn,
            metadata,
            body,
            created,
            body.model or settings.model_name,
            settings.sse_keepalive_seconds,
        )
    try:
        # A whole generation, as a stream would be: the stream deadline bounds it, not the unary one.
        reply = await unless_disconnected(
            request,
            state.chat.call(
                state.chat.stub.Chat,
                chat_pb2.ChatRequest(turn=turn),
                metadata=metadata,
                timeout=settings.stream_deadline_seconds,
            ),
        )
    except (CircuitOpenError, grpc.aio.AioRpcError) as exc:
        raise problem_for_downstream(exc) from None
    completion = {
        "id": f"chatcmpl-{reply.request_id or turn.request_id}",
        "object": "chat.completion",
        "created": created,
        "model": reply.model or body.model or settings.model_name,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply.response, "refusal": None},
                "logprobs": None,
                "finish_reason": FINISH_REASONS.get(reply.finish_reason, "stop"),
            }
        ],
        "usage": _usage(reply.usage),
    }
    return JSONBytesResponse(completion, headers={"X-Conversation-Id": reply.conversation_id})


async def _stream(
    chat,
    turn: chat_pb2.ChatTurn,
    metadata,
    body: ChatCompletionRequest,
    created: int,
    model: str,
    keepalive_seconds: float,
) -> EventStreamResponse:
    stream = chat.stream(chat.stub.StreamChat, chat_pb2.StreamChatRequest(turn=turn), metadata=metadata)
    try:
        # Wait for the first message so that an unavailable mesh is a 503, not a broken stream.
        first = await anext(stream)
    except StopAsyncIteration:
        raise ProblemError(502, "the chat service ended the stream without an answer") from None
    except (CircuitOpenError, grpc.aio.AioRpcError) as exc:
        await stream.aclose()
        raise problem_for_downstream(exc) from None

    completion_id = f"chatcmpl-{turn.request_id}"
    include_usage = body.include_usage

    def chunk(delta: dict, finish_reason: str | None = None, answered_by: str = model) -> dict:
        data: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": answered_by,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }
        if include_usage:
            data["usage"] = None
        return {"data": orjson.dumps(data).decode()}

    async def events() -> AsyncIterator[dict]:
        try:
            yield chunk({"role": "assistant", "content": ""})
            message = first
            while not message.finish_reason:
                if message.text:
                    yield chunk({"content": message.text})
                message = await anext(stream)
            answered_by = message.model or model
            yield chunk({}, FINISH_REASONS.get(message.finish_reason, "stop"), answered_by)
            if include_usage:
                yield {
                    "data": orjson.dumps(
                        {
                            "id": completion_id,
                            "object": "chat.completion.chunk",
                            "created": created,
                            "model": answered_by,
                            "choices": [],
                            "usage": _usage(message.usage),
                        }
                    ).decode()
                }
        except (CircuitOpenError, grpc.aio.AioRpcError) as exc:
            # OpenAI's SDKs raise an APIError for an event that carries `error`.
            problem = problem_for_downstream(exc)
            yield {"data": orjson.dumps({"error": error_object(problem.status, problem.detail)}).decode()}
        except StopAsyncIteration:
            yield {"data": orjson.dumps({"error": error_object(502, "the answer ended early")}).decode()}
        finally:
            # Closing the guarded stream cancels the gRPC call, and with it the generation down to the engine.
            await stream.aclose()
        yield {"data": "[DONE]"}

    return EventStreamResponse(with_pings(events(), keepalive_seconds))


@router.get("/models", response_model=ModelList, responses={k: _ERRORS[k] for k in (401, 403, 429, 503, 504)})
async def list_models(request: Request, caller: Caller = Depends(require_key)):
    """The models the inference service serves (OpenAI's model list)."""
    try:
        reply = await request.app.state.chat.call(
            request.app.state.chat.stub.ListModels,
            chat_pb2.ChatServiceListModelsRequest(),
            metadata=((API_KEY_METADATA, caller.key),),
        )
    except (CircuitOpenError, grpc.aio.AioRpcError) as exc:
        raise problem_for_downstream(exc) from None
    created = int(time.time())
    return JSONBytesResponse(
        {
            "object": "list",
            "data": [
                {"id": m.id, "object": "model", "created": created, "owned_by": "chatterbot"}
                for m in reply.models
            ],
        }
    )
