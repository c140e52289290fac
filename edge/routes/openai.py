"""The OpenAI-compatible API: `POST /v1/chat/completions` (whole or streamed), `GET /v1/models` and
`GET /v1/models/{model}`.

A completion is one chat turn through chat_svc whose prompt is the request's `messages` (ChatTurn.messages):
no stored context is read, but the exchange (the last user message, or the tool results that end the prompt, and
the answer) is stored as history like any other turn. Tools, structured output, penalties and log probabilities
travel as ChatTurn.options to the engine, which refuses what it cannot honour (INVALID_ARGUMENT with a `param`
trailer: a 400 naming it). Errors are problem bodies, as on every route, that also carry OpenAI's `error` object.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from http import HTTPStatus
from typing import Any

import grpc
import orjson
from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from chatterbot import wire
from chatterbot.breaker import CircuitOpenError
from chatterbot.logs import correlation_id as log_correlation_id
from chatterbot.settings import Settings
from chatterbot.v1 import chat_pb2, types_pb2
from edge.auth import Caller, authorize_turn, require_key
from edge.chat_client import ChatClient, Metadata, chat_client, metadata
from edge.disconnects import unless_disconnected
from edge.idempotency import DONE, Claim, Recorder, idempotency_key, keyed, openapi_parameter, run_once
from edge.idempotency import KEY_DESCRIPTION as IDEMPOTENCY_KEY_DESCRIPTION
from edge.json_templates import JSONTemplate
from edge.middleware import StreamMeter
from edge.openai_protocol import (
    REFUSAL_TYPES,
    UNRECOGNIZED_PARAMETER,
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChoiceLogprobs,
    ChunkChoice,
    ChunkDelta,
    ChunkFunctionCall,
    ChunkToolCall,
    ErrorObject,
    ModelCard,
    ModelList,
    NamedToolChoice,
    OpenAIProblem,
    StreamErrorEvent,
    TokenLogprob,
    TopLogprob,
)
from edge.problems import (
    PROBLEM_MEDIA_TYPE,
    ProblemError,
    describe,
    downstream,
    field_errors,
    problem_for_downstream,
)
from edge.protocol import FieldError, FinishReason, FunctionCall, ToolCall, Usage, finish_reason
from edge.responses import ModelResponse
from edge.sse import Burst, EventStreamResponse, close_iterator

# `developer` is OpenAI's newer name for `system`.
_ROLE_ALIASES = {"developer": "system"}
# The lowest log probability sent: JSON has no -infinity (vLLM's server clamps the same way).
_MIN_LOGPROB = -9999.0


def _role(name: str) -> types_pb2.Role:
    return wire.role_value(_ROLE_ALIASES.get(name, name))


# OpenAI's error types by status; the SDKs pick their exception class by the status alone.
_ERROR_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


def error_object(status: int, message: str | None, param: str | None = None) -> ErrorObject:
    """OpenAI's `error` object for an HTTP status."""
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return ErrorObject(message=message or HTTPStatus(status).phrase, type=kind, param=param, code=status)


def openai_problem(
    status: int,
    detail: str | None,
    headers: dict[str, str] | None = None,
    errors: list[FieldError] | None = None,
    param: str | None = None,
) -> Response:
    """A problem response (RFC 9457) that OpenAI's SDKs also understand."""
    problem = OpenAIProblem(
        title=HTTPStatus(status).phrase,
        status=status,
        detail=detail or None,
        errors=errors,
        error=error_object(status, detail, param),
    )
    return ModelResponse(problem, status_code=status, headers=headers, media_type=PROBLEM_MEDIA_TYPE)


def _refused_param(error: FieldError) -> str:
    # The field as the request writes it: without `body` and without pydantic's names of union members
    # (`list[ContentPart]`).
    return ".".join(str(part) for part in error.loc[1:] if "[" not in str(part))


def _refusal(error: FieldError) -> str:
    if error.type == UNRECOGNIZED_PARAMETER:
        return f"Unrecognized request argument supplied: {_refused_param(error)}"
    return f"{_refused_param(error)}: {error.msg}"


def _validation_problem(exc: RequestValidationError) -> Response:
    # The OpenAI routes have always named every part of `loc` as a string.
    errors = [
        FieldError(loc=[str(part) for part in e.loc], msg=e.msg, type=e.type)
        for e in field_errors(exc.errors())
    ]
    refused = [e for e in errors if e.type in REFUSAL_TYPES]
    if refused:
        # A parameter the server cannot honour, or one OpenAI's API does not have: a 400 naming it, as OpenAI
        # answers (and vLLM, for tool calls it does not serve), whatever else is wrong with the request.
        detail = "; ".join(_refusal(e) for e in refused[:3])
        return openai_problem(400, detail, errors=refused, param=_refused_param(refused[0]))
    # `param` names the field without where it was (body, query, header), as OpenAI does.
    param = next((".".join(str(part) for part in e.loc[1:]) for e in errors if len(e.loc) > 1), None)
    return openai_problem(422, describe(errors), errors=errors, param=param)


class OpenAIErrorRoute(APIRoute):
    """A route whose errors (auth, validation, downstream) also carry OpenAI's `error` object."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def handler(request: Request) -> Response:
            try:
                return await handle(request)
            except ProblemError as exc:
                return openai_problem(exc.status, exc.detail, exc.headers, param=exc.param)
            except RequestValidationError as exc:
                return _validation_problem(exc)
            except StarletteHTTPException as exc:
                detail = exc.detail if isinstance(exc.detail, str) else None
                return openai_problem(exc.status_code, detail, getattr(exc, "headers", None))

        return handler


router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIErrorRoute)

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {
        "model": OpenAIProblem,
        "description": "A parameter this server does not honour (`n` above 1, audio, ...; see REFUSED in "
        "edge/openai_protocol.py), one that the engine cannot honour (`logit_bias` on the simulated engine), or "
        "one that OpenAI's API does not have; `error.param` names it",
    },
    401: {"model": OpenAIProblem, "description": "Missing API key"},
    403: {"model": OpenAIProblem, "description": "Invalid API key"},
    404: {"model": OpenAIProblem, "description": "Unknown model"},
    422: {"model": OpenAIProblem, "description": "Invalid body or header"},
    429: {"model": OpenAIProblem, "description": "Over a rate limit; see Retry-After"},
    503: {"model": OpenAIProblem, "description": "A service is unavailable; see Retry-After"},
    504: {"model": OpenAIProblem, "description": "The answer took too long"},
}


def _message(m: ChatCompletionMessage) -> types_pb2.ChatMessage:
    message = types_pb2.ChatMessage(role=_role(m.role), content=m.text)
    for call in m.tool_calls or ():
        message.tool_calls.add(id=call.id, name=call.function.name, arguments=call.function.arguments)
    if m.role == "tool":
        message.tool_call_id = m.tool_call_id or ""
        message.name = m.name or ""
    return message


_TOOL_CHOICE_MODES = {
    "none": types_pb2.TOOL_CHOICE_MODE_NONE,
    "auto": types_pb2.TOOL_CHOICE_MODE_AUTO,
    "required": types_pb2.TOOL_CHOICE_MODE_REQUIRED,
}
_RESPONSE_FORMATS = {
    "json_object": types_pb2.RESPONSE_FORMAT_TYPE_JSON_OBJECT,
    "json_schema": types_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
}


def generation_options(body: ChatCompletionRequest) -> types_pb2.GenerationOptions:
    """What a request asks of the engine beyond sampling; empty when it asks nothing more. An empty `tools`
    asks for nothing, whatever `tool_choice` says (as vLLM reads `required` of no tools)."""
    options = types_pb2.GenerationOptions(
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        logit_bias=body.logit_bias or {},
        logprobs=bool(body.logprobs),
        top_logprobs=body.top_logprobs or 0,
    )
    if body.tools:
        for tool in body.tools:
            f = tool.function
            options.tools.add(
                name=f.name,
                description=f.description or "",
                parameters_json="" if f.parameters is None else orjson.dumps(f.parameters).decode(),
                strict=bool(f.strict),
            )
        choice = body.tool_choice
        if isinstance(choice, NamedToolChoice):
            options.tool_choice.mode = types_pb2.TOOL_CHOICE_MODE_FUNCTION
            options.tool_choice.function_name = choice.function.name
        elif choice is not None:
            options.tool_choice.mode = _TOOL_CHOICE_MODES[choice]
        if body.parallel_tool_calls is not None:
            options.parallel_tool_calls = body.parallel_tool_calls
    shape = body.response_format
    if shape is not None and shape.type != "text":
        options.response_format.type = _RESPONSE_FORMATS[shape.type]
        if shape.json_schema is not None:
            options.response_format.name = shape.json_schema.name
            options.response_format.schema_json = orjson.dumps(shape.json_schema.schema_).decode()
            options.response_format.strict = bool(shape.json_schema.strict)
    return options


def to_chat_turn(
    body: ChatCompletionRequest, settings: Settings, conversation_id: str | None
) -> chat_pb2.ChatTurn:
    """The chat turn of a completion request: its messages are the whole prompt. A prompt that ends with tool
    results is a tool turn, whose `message` is empty."""
    messages = [_message(m) for m in body.messages]
    last = "" if body.messages[-1].role == "tool" else messages[-1].content
    if body.messages[-1].role == "user" and not 1 <= len(last) <= settings.max_message_chars:
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
    options = generation_options(body)
    if options.ListFields():
        turn.options.CopyFrom(options)
    return turn


def _logprobs(logprobs: Sequence[types_pb2.TokenLogprob]) -> ChoiceLogprobs:
    return ChoiceLogprobs(
        content=[
            TokenLogprob(
                token=lp.token,
                logprob=max(lp.logprob, _MIN_LOGPROB),
                bytes=list(lp.bytes),
                top_logprobs=[
                    TopLogprob(token=top.token, logprob=max(top.logprob, _MIN_LOGPROB), bytes=list(top.bytes))
                    for top in lp.top_logprobs
                ],
            )
            for lp in logprobs
        ],
        refusal=None,
    )


@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    responses={
        **_ERRORS,
        400: {
            **_ERRORS[400],
            "description": f"{_ERRORS[400]['description']}; or a malformed Idempotency-Key (empty, over 255 "
            "characters, not printable ASCII), or one sent to an edge without Redis",
        },
        409: {
            "model": OpenAIProblem,
            "description": "A request with this Idempotency-Key is still running (a stream: at once; else past "
            "the stream deadline); see Retry-After",
        },
        422: {
            "model": OpenAIProblem,
            "description": "Invalid body or header, or an Idempotency-Key used with another request",
        },
        200: {
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
            "description": "The completion, or with `stream: true` `data:` events each holding a "
            "`chat.completion.chunk` (see ChatCompletionChunk in edge/openai_protocol.py), "
            "ending with `data: [DONE]`",
        },
    },
    openapi_extra=openapi_parameter(
        f"{IDEMPOTENCY_KEY_DESCRIPTION}. A stream is replayed as chunks ending in `[DONE]`; while it still "
        "runs, a retry is 409"
    ),
)
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    caller: Caller = Depends(require_key),
    client: ChatClient = Depends(chat_client),
    x_conversation_id: str | None = Header(
        None,
        pattern=wire.CONVERSATION_ID_PATTERN,
        description="Store the exchange in this conversation. Omitted: the stored conversation that `messages` "
        "continues (its user and assistant messages before the last are those of the conversation, answers "
        "included), else a new one; so resending a growing conversation keeps to one stored conversation",
    ),
) -> Response:
    """Generate the next assistant message of `messages` (OpenAI's chat completions API)."""
    settings: Settings = request.app.state.settings
    turn = to_chat_turn(body, settings, x_conversation_id)
    if caller.user_id and not body.user:
        turn.user_id = caller.user_id  # a user key speaks for its own user
    key = idempotency_key(request)
    if key is None:
        return await _completion(body, request, caller, client, turn)
    once = keyed(caller.principal.key_id, key, "/v1/chat/completions", body, x_conversation_id)
    turn.request_id = once.request_id
    log_correlation_id.set(once.request_id)  # X-Request-ID: the same for the first request and its retries

    async def run(claim: Claim) -> Response:
        if not body.stream:
            return await _completion(body, request, caller, client, turn)
        chunks = _renderer(body, turn, settings)
        record = claim.recorder(_is_error_event, _content_text, chunks.content)
        return await _completion(body, request, caller, client, turn, chunks, record)

    if body.stream:
        return await run_once(
            request,
            once,
            run,
            wait_seconds=None,
            replay=lambda stored: stored.stream(numbered=False),
            problem=_openai_problem,
        )
    # A retry waits for the first as long as the first may take: the stream deadline bounds it.
    return await run_once(
        request, once, run, wait_seconds=settings.stream_deadline_seconds, problem=_openai_problem
    )


def _renderer(body: ChatCompletionRequest, turn: chat_pb2.ChatTurn, settings: Settings) -> _ChunkRenderer:
    return _ChunkRenderer(
        f"chatcmpl-{turn.request_id}", int(time.time()), body.model or settings.model_name, body.include_usage
    )


async def _completion(
    body: ChatCompletionRequest,
    request: Request,
    caller: Caller,
    client: ChatClient,
    turn: chat_pb2.ChatTurn,
    chunks: _ChunkRenderer | None = None,
    record: Recorder | None = None,
) -> Response:
    """The completion of `turn`, whole or streamed (`chunks` renders the stream; `record`: see `_stream`)."""
    settings: Settings = request.app.state.settings
    await authorize_turn(request, caller, turn.user_id, turn.max_tokens)
    created = int(time.time())
    if body.stream:
        return await _stream(
            client,
            turn,
            metadata(caller),
            chunks or _renderer(body, turn, settings),
            settings.sse_keepalive_seconds,
            StreamMeter(request, "/v1/chat/completions"),
            record,
        )
    # A whole generation, as a stream would be: the stream deadline bounds it, not the unary one.
    reply: chat_pb2.ChatResponse = await downstream(
        unless_disconnected(
            request,
            client.call(
                client.stub.Chat,
                chat_pb2.ChatRequest(turn=turn),
                metadata=metadata(caller),
                timeout=settings.stream_deadline_seconds,
            ),
        )
    )
    calls = [
        ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments)) for c in reply.tool_calls
    ]
    completion = ChatCompletion(
        id=f"chatcmpl-{reply.request_id or turn.request_id}",
        created=created,
        model=reply.model or body.model or settings.model_name,
        choices=[
            ChatCompletionChoice(
                message=AssistantMessage(
                    content=reply.response if reply.response or not calls else None, tool_calls=calls or None
                ),
                logprobs=_logprobs(reply.logprobs) if body.logprobs else None,
                finish_reason=finish_reason(reply.finish_reason),
            )
        ],
        usage=Usage(**wire.usage_dict(reply.usage)),
    )
    return ModelResponse(completion, headers={"X-Conversation-Id": reply.conversation_id})


def _openai_problem(exc: ProblemError) -> Response:
    return openai_problem(exc.status, exc.detail, exc.headers, param=exc.param)


def _is_error_event(event: Mapping[str, str]) -> bool:
    # OpenAI's SDKs raise for an event that carries `error`; it is followed by `[DONE]`.
    return event.get("data", "").startswith('{"error"')


def _content_text(data: str) -> str | None:
    """The text of a chunk that carries text and nothing else, None for any other."""
    chunk = orjson.loads(data)
    choices = chunk.get("choices")
    if chunk.get("object") != "chat.completion.chunk" or not isinstance(choices, list) or len(choices) != 1:
        return None
    choice = choices[0]
    delta = choice.get("delta")
    plain = choice.get("finish_reason") is None and choice.get("logprobs") is None
    if (
        plain
        and isinstance(delta, dict)
        and delta.keys() == {"content"}
        and isinstance(delta["content"], str)
    ):
        return delta["content"]
    return None


def _piece(piece: types_pb2.ToolCallDelta) -> ChunkToolCall:
    if piece.id or piece.name:  # the first piece of a call
        return ChunkToolCall(
            index=piece.index,
            id=piece.id,
            type="function",
            function=ChunkFunctionCall(name=piece.name, arguments=piece.arguments),
        )
    return ChunkToolCall(index=piece.index, function=ChunkFunctionCall(arguments=piece.arguments))


class _ChunkRenderer:
    """The `chat.completion.chunk` bodies of one stream, built from ChatCompletionChunk: the content chunk is
    rendered once and filled per token, the others once each; a chunk with pieces of tool calls or log
    probabilities is rendered whole."""

    def __init__(self, completion_id: str, created: int, model: str, include_usage: bool) -> None:
        self.completion_id = completion_id
        self.created = created
        self.model = model
        self.include_usage = include_usage
        self.content = JSONTemplate(lambda text: self._chunk(ChunkDelta(content=text)), exclude_unset=True)

    def _chunk(
        self,
        delta: ChunkDelta,
        finish: FinishReason | None = None,
        model: str | None = None,
        logprobs: ChoiceLogprobs | None = None,
    ) -> ChatCompletionChunk:
        # Unset fields are left out: a delta holds only what it carries, and `usage: null` is sent only
        # when the client asked for a usage chunk.
        return ChatCompletionChunk(
            id=self.completion_id,
            object="chat.completion.chunk",
            created=self.created,
            model=model or self.model,
            choices=[ChunkChoice(index=0, delta=delta, logprobs=logprobs, finish_reason=finish)],
            **({"usage": None} if self.include_usage else {}),
        )

    def role(self) -> str:
        return self._chunk(ChunkDelta(role="assistant", content="")).model_dump_json(exclude_unset=True)

    def pieces(self, message: chat_pb2.StreamChatResponse) -> str:
        """The chunk of a message with pieces of tool calls or log probabilities (and maybe text)."""
        delta: dict[str, Any] = {}
        if message.text:
            delta["content"] = message.text
        if message.tool_calls:
            delta["tool_calls"] = [_piece(piece) for piece in message.tool_calls]
        logprobs = _logprobs(message.logprobs) if message.logprobs else None
        return self._chunk(ChunkDelta(**delta), logprobs=logprobs).model_dump_json(exclude_unset=True)

    def finish(self, reason: FinishReason, model: str) -> str:
        return self._chunk(ChunkDelta(), reason, model).model_dump_json(exclude_unset=True)

    def usage(self, usage: types_pb2.Usage, model: str) -> str:
        return ChatCompletionChunk(
            id=self.completion_id,
            created=self.created,
            model=model,
            choices=[],
            usage=Usage(**wire.usage_dict(usage)),
        ).model_dump_json()


def _error_event(problem: ProblemError) -> dict[str, str]:
    # OpenAI's SDKs raise an APIError for an event that carries `error`.
    error = error_object(problem.status, problem.detail, problem.param)
    return {"data": StreamErrorEvent(error=error).model_dump_json()}


async def _stream(
    client: ChatClient,
    turn: chat_pb2.ChatTurn,
    call_metadata: Metadata,
    chunks: _ChunkRenderer,
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
    except StopAsyncIteration:
        raise ProblemError(502, "the chat service ended the stream without an answer") from None
    except (CircuitOpenError, grpc.aio.AioRpcError) as exc:
        await close_iterator(stream)
        raise problem_for_downstream(exc) from None

    async def events() -> AsyncIterator[Burst]:
        # Events that are ready together leave together: the role chunk with the first piece, the finish with
        # usage and [DONE].
        ready: list[Mapping[str, str]] = [{"data": chunks.role()}]
        try:
            message = first
            while not message.finish_reason:
                if message.tool_calls or message.logprobs:
                    meter.token()
                    ready.append({"data": chunks.pieces(message)})
                elif message.text:
                    meter.token()
                    ready.append({"data": chunks.content(message.text)})
                if ready:
                    yield Burst(tuple(ready))
                    ready = []
                message = await anext(stream)
            answered_by = message.model or chunks.model
            ready.append({"data": chunks.finish(finish_reason(message.finish_reason), answered_by)})
            if chunks.include_usage:
                ready.append({"data": chunks.usage(message.usage, answered_by)})
        except (CircuitOpenError, grpc.aio.AioRpcError) as exc:
            ready.append(_error_event(problem_for_downstream(exc)))
        except StopAsyncIteration:
            ready.append(_error_event(ProblemError(502, "the answer ended early")))
        finally:
            meter.close()
            # Closing the guarded stream cancels the gRPC call, and with it the generation down to the engine.
            await close_iterator(stream)
        ready.append({"data": DONE})
        yield Burst(tuple(ready), last=True)

    source = events() if record is None else record(events())
    return EventStreamResponse(source, ping_seconds=keepalive_seconds)


async def _served_models(caller: Caller, client: ChatClient) -> ModelList:
    reply: chat_pb2.ChatServiceListModelsResponse = await downstream(
        client.call(
            client.stub.ListModels, chat_pb2.ChatServiceListModelsRequest(), metadata=metadata(caller)
        )
    )
    created = int(time.time())
    return ModelList(data=[ModelCard(id=m.id, created=created) for m in reply.models])


@router.get("/models", response_model=ModelList, responses={k: _ERRORS[k] for k in (401, 403, 429, 503, 504)})
async def list_models(
    caller: Caller = Depends(require_key), client: ChatClient = Depends(chat_client)
) -> Response:
    """The models the inference service serves (OpenAI's model list)."""
    return ModelResponse(await _served_models(caller, client))


# `:path`, since a served id may hold a slash (`org/model`), which the SDKs send percent-encoded.
@router.get(
    "/models/{model:path}",
    response_model=ModelCard,
    responses={k: _ERRORS[k] for k in (401, 403, 404, 429, 503, 504)},
)
async def retrieve_model(
    model: str, caller: Caller = Depends(require_key), client: ChatClient = Depends(chat_client)
) -> Response:
    """One model of `GET /v1/models` (OpenAI's model retrieval); another id is a 404."""
    for card in (await _served_models(caller, client)).data:
        if card.id == model:
            return ModelResponse(card)
    return openai_problem(404, f"The model {model!r} does not exist", param="model")
