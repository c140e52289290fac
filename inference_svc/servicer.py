"""gRPC face of the engines: translates GenerateRequest into a GenerationRequest, deltas back, and engine
errors into status (`engine_status`, registered with the server's StatusInterceptor by inference_svc.main)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

import grpc
import orjson

from chatterbot.status import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    StatusError,
    Unavailable,
)
from chatterbot.v1 import inference_pb2, inference_pb2_grpc, types_pb2
from chatterbot.wire import PARAM_TRAILER, TOP_LOGPROBS_MAX, finish_value, role_name, usage_pb
from inference_svc.engines.base import (
    TOOL_CHOICE_MODES,
    Delta,
    EngineError,
    EngineState,
    EngineTimeout,
    EngineUnavailable,
    GenerationRequest,
    InvalidRequest,
    Message,
    Overloaded,
    ResponseFormat,
    Tool,
    ToolCall,
    UnknownModel,
    Unsupported,
    UpstreamRejected,
)
from inference_svc.generation import Generator, coalesce, whole

_MODEL_STATE = {
    EngineState.LOADING: inference_pb2.MODEL_STATE_LOADING,
    EngineState.READY: inference_pb2.MODEL_STATE_READY,
    EngineState.FAILED: inference_pb2.MODEL_STATE_FAILED,
}
MAX_TOKENS_LIMIT = 32768


def to_generation_request(request: inference_pb2.GenerateRequest) -> GenerationRequest:
    """Validate and translate; raises ValueError with a message fit for INVALID_ARGUMENT."""
    if not request.messages:
        raise ValueError("messages must not be empty")
    messages = []
    for i, m in enumerate(request.messages):
        try:
            role = role_name(m.role)
        except KeyError:
            raise ValueError(f"messages[{i}].role must be system, user, assistant or tool") from None
        calls = tuple(ToolCall(c.id, c.name, c.arguments) for c in m.tool_calls)
        messages.append(Message(role, m.content, calls, m.tool_call_id, m.name))
    s = request.sampling
    max_tokens = s.max_tokens or 256
    if max_tokens > MAX_TOKENS_LIMIT:
        raise ValueError(f"sampling.max_tokens must be at most {MAX_TOKENS_LIMIT}")
    if not 0.0 <= s.temperature <= 2.0:
        raise ValueError("sampling.temperature must be between 0 and 2")
    if not 0.0 <= s.top_p <= 1.0:
        raise ValueError("sampling.top_p must be between 0 and 1")
    return GenerationRequest(
        request_id=request.request_id or uuid.uuid4().hex,
        messages=messages,
        max_tokens=max_tokens,
        temperature=s.temperature,
        top_p=s.top_p or 1.0,
        seed=s.seed if s.HasField("seed") else None,
        stop=list(s.stop),
        model=request.model,
        whole=request.whole,
        **(_options(request.options) if request.HasField("options") else {}),
    )


def _json_object(text: str, what: str) -> dict[str, Any] | None:
    if not text:
        return None
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"{what} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a JSON object")
    return value


_TOOL_CHOICE = {
    types_pb2.TOOL_CHOICE_MODE_UNSPECIFIED: "",
    types_pb2.TOOL_CHOICE_MODE_AUTO: "auto",
    types_pb2.TOOL_CHOICE_MODE_NONE: "none",
    types_pb2.TOOL_CHOICE_MODE_REQUIRED: "required",
}
_RESPONSE_FORMAT: dict[int, Literal["json_object", "json_schema"]] = {
    types_pb2.RESPONSE_FORMAT_TYPE_JSON_OBJECT: "json_object",
    types_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA: "json_schema",
}
MAX_TOP_LOGPROBS = TOP_LOGPROBS_MAX


def _options(o: types_pb2.GenerationOptions) -> dict[str, Any]:
    """The GenerationRequest fields of GenerationOptions, validated; raises ValueError."""
    tools = []
    for i, t in enumerate(o.tools):
        if not t.name:
            raise ValueError(f"options.tools[{i}].name is required")
        tools.append(
            Tool(t.name, t.description, _json_object(t.parameters_json, f"options.tools[{i}]"), t.strict)
        )
    names = {t.name for t in tools}
    if len(names) != len(tools):
        raise ValueError("options.tools must not name a function twice")
    mode = o.tool_choice.mode
    if mode == types_pb2.TOOL_CHOICE_MODE_FUNCTION:
        choice = o.tool_choice.function_name
        if choice not in names:
            raise ValueError(f"options.tool_choice names {choice!r}, which is not one of options.tools")
        if choice in TOOL_CHOICE_MODES:
            # The engine seam spells a forced function by its name, so this one would read as the mode.
            raise ValueError(f"options.tool_choice cannot force a function named {choice!r} by name")
    elif mode in _TOOL_CHOICE:
        choice = _TOOL_CHOICE[mode]
    else:
        raise ValueError("options.tool_choice.mode is unknown")
    if choice in ("required",) and not tools:
        raise ValueError("options.tool_choice is required, but options.tools is empty")
    response_format: ResponseFormat | None = None
    kind = o.response_format.type
    if kind in _RESPONSE_FORMAT:
        schema = _json_object(o.response_format.schema_json, "options.response_format.schema_json")
        if kind == types_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA and schema is None:
            raise ValueError("options.response_format needs a schema")
        response_format = ResponseFormat(
            _RESPONSE_FORMAT[kind], schema, o.response_format.name, o.response_format.strict
        )
    elif kind not in (types_pb2.RESPONSE_FORMAT_TYPE_UNSPECIFIED, types_pb2.RESPONSE_FORMAT_TYPE_TEXT):
        raise ValueError("options.response_format.type is unknown")
    for name in ("presence_penalty", "frequency_penalty"):
        if not -2.0 <= getattr(o, name) <= 2.0:
            raise ValueError(f"options.{name} must be between -2 and 2")
    for token, bias in o.logit_bias.items():
        if token < 0 or not -100.0 <= bias <= 100.0:
            raise ValueError("options.logit_bias maps token ids to biases between -100 and 100")
    if o.top_logprobs > MAX_TOP_LOGPROBS:
        raise ValueError(f"options.top_logprobs must be at most {MAX_TOP_LOGPROBS}")
    if o.top_logprobs and not o.logprobs:
        raise ValueError("options.top_logprobs needs options.logprobs")
    return {
        "tools": tuple(tools),
        "tool_choice": choice,
        "parallel_tool_calls": o.parallel_tool_calls if o.HasField("parallel_tool_calls") else None,
        "response_format": response_format,
        "presence_penalty": o.presence_penalty,
        "frequency_penalty": o.frequency_penalty,
        "logit_bias": dict(o.logit_bias),
        "logprobs": o.logprobs,
        "top_logprobs": o.top_logprobs,
    }


def to_generate_response(model: str, delta: Delta) -> inference_pb2.GenerateResponse:
    """A delta on the wire."""
    response = inference_pb2.GenerateResponse(text=delta.text, token_count=delta.token_count, model=model)
    for piece in delta.tool_calls:
        response.tool_calls.add(index=piece.index, id=piece.id, name=piece.name, arguments=piece.arguments)
    for lp in delta.logprobs:
        response.logprobs.append(
            types_pb2.TokenLogprob(
                token=lp.token,
                logprob=lp.logprob,
                bytes=lp.bytes,
                top_logprobs=[
                    types_pb2.TopLogprob(token=t.token, logprob=t.logprob, bytes=t.bytes)
                    for t in lp.top_logprobs
                ],
            )
        )
    if delta.finish_reason:
        response.finish_reason = finish_value(delta.finish_reason)
        response.usage.CopyFrom(usage_pb(delta.prompt_tokens, delta.completion_tokens))
    return response


# First match wins; Overloaded also says when to come back (see engine_status).
_STATUS: dict[type[EngineError], type[StatusError]] = {
    UnknownModel: NotFound,
    InvalidRequest: InvalidArgument,
    Overloaded: ResourceExhausted,
    EngineUnavailable: Unavailable,
    EngineTimeout: DeadlineExceeded,
    UpstreamRejected: FailedPrecondition,
}


def engine_status(exc: BaseException) -> StatusError | None:
    """The status an engine error ends the call with (INTERNAL for an unknown kind); None for anything else."""
    if not isinstance(exc, EngineError):
        return None
    details = str(exc) or type(exc).__name__
    if isinstance(exc, Overloaded):
        return ResourceExhausted(details, metadata=(("retry-after", "1"),))
    if isinstance(exc, Unsupported):
        return InvalidArgument(details, metadata=((PARAM_TRAILER, exc.param),))
    for kind, status in _STATUS.items():
        if isinstance(exc, kind):
            return status(details)
    error = StatusError(details)
    error.code = grpc.StatusCode.INTERNAL
    return error


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, generator: Generator) -> None:
        self.generator = generator

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        try:
            gen_request = to_generation_request(request)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from exc
        # Cancelling the RPC closes this chain down to the engine: that is the abort. Engine errors propagate
        # to the StatusInterceptor, which answers them with engine_status.
        deltas = self.generator.generate(gen_request, cache_only=request.cache_only)
        async for model, delta in whole(deltas) if request.whole else coalesce(deltas):
            yield to_generate_response(model, delta)

    async def ListModels(
        self, request: inference_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ListModelsResponse:
        models = []
        for m in self.generator.models.models():
            load = self.generator.models.engines[m.id].load()
            models.append(
                inference_pb2.Model(
                    id=m.id,
                    engine=m.engine,
                    state=_MODEL_STATE[m.state],
                    max_model_len=m.max_model_len,
                    is_default=m.is_default,
                    running=load.running,
                    waiting=load.waiting,
                )
            )
        return inference_pb2.ListModelsResponse(models=models)
