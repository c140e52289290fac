"""gRPC face of the engines: translates GenerateRequest into a GenerationRequest and deltas back."""

from __future__ import annotations

import uuid

import grpc

from chatterbot.v1 import inference_pb2, inference_pb2_grpc, types_pb2
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

_ROLES = {types_pb2.ROLE_SYSTEM: "system", types_pb2.ROLE_USER: "user", types_pb2.ROLE_ASSISTANT: "assistant"}
_FINISH = {
    "stop": types_pb2.FINISH_REASON_STOP,
    "length": types_pb2.FINISH_REASON_LENGTH,
    "abort": types_pb2.FINISH_REASON_ABORT,
}
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
        if m.role not in _ROLES:
            raise ValueError(f"messages[{i}].role must be system, user or assistant")
        messages.append(Message(_ROLES[m.role], m.content))
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
    )


_STATUS = {
    UnknownModel: grpc.StatusCode.NOT_FOUND,
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    EngineUnavailable: grpc.StatusCode.UNAVAILABLE,
    EngineTimeout: grpc.StatusCode.DEADLINE_EXCEEDED,
    UpstreamRejected: grpc.StatusCode.FAILED_PRECONDITION,
}


def status_for(exc: EngineError) -> grpc.StatusCode:
    for kind, code in _STATUS.items():
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, generator: Generator) -> None:
        self.generator = generator

    async def Generate(self, request, context):
        try:
            gen_request = to_generation_request(request)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            # Cancelling the RPC closes this chain down to the engine: that is the abort.
            deltas = self.generator.generate(gen_request, cache_only=request.cache_only)
            async for model, delta in whole(deltas) if request.whole else coalesce(deltas):
                response = inference_pb2.GenerateResponse(
                    text=delta.text, token_count=delta.token_count, model=model
                )
                if delta.finish_reason:
                    response.finish_reason = _FINISH[delta.finish_reason]
                    response.usage.prompt_tokens = delta.prompt_tokens
                    response.usage.completion_tokens = delta.completion_tokens
                    response.usage.total_tokens = delta.prompt_tokens + delta.completion_tokens
                yield response
        except EngineError as exc:
            metadata = (("retry-after", "1"),) if isinstance(exc, Overloaded) else ()
            await context.abort(status_for(exc), str(exc) or type(exc).__name__, trailing_metadata=metadata)

    async def ListModels(self, request, context):
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
