"""gRPC face of the engines: translates GenerateRequest into a GenerationRequest, deltas back, and engine
errors into status (`engine_status`, registered with the server's StatusInterceptor by inference_svc.main)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import grpc

from chatterbot.status import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    StatusError,
    Unavailable,
)
from chatterbot.v1 import inference_pb2, inference_pb2_grpc
from chatterbot.wire import finish_value, role_name, usage_pb
from inference_svc.engines.base import (
    EngineError,
    EngineState,
    EngineTimeout,
    EngineUnavailable,
    GenerationRequest,
    InvalidRequest,
    Message,
    Overloaded,
    UnknownModel,
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
            raise ValueError(f"messages[{i}].role must be system, user or assistant") from None
        messages.append(Message(role, m.content))
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
    )


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
            response = inference_pb2.GenerateResponse(
                text=delta.text, token_count=delta.token_count, model=model
            )
            if delta.finish_reason:
                response.finish_reason = finish_value(delta.finish_reason)
                response.usage.CopyFrom(usage_pb(delta.prompt_tokens, delta.completion_tokens))
            yield response

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
