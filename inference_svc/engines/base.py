"""The one seam between InferenceService and the engines."""

from __future__ import annotations

import enum
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Protocol


class EngineState(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    messages: list[Message]
    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    model: str = ""
    # The caller takes the answer whole, not token by token: an engine may generate it in one piece.
    whole: bool = False


@dataclass(frozen=True)
class Delta:
    """Text produced since the previous delta; the last one has finish_reason and token counts."""

    text: str
    token_count: int
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class ModelInfo:
    id: str
    engine: str
    state: EngineState
    max_model_len: int
    is_default: bool


@dataclass(frozen=True)
class EngineLoad:
    """Sequences generating now and waiting for a slot."""

    running: int
    waiting: int


class EngineError(Exception):
    """Base of the errors an engine raises; `inference_svc.servicer.engine_status` maps each to a gRPC status."""


class UnknownModel(EngineError, LookupError):
    """The request names a model this service does not serve (NOT_FOUND)."""


class InvalidRequest(EngineError, ValueError):
    """The engine refuses the request as given, e.g. the prompt is longer than the model's window (INVALID_ARGUMENT)."""


class Overloaded(EngineError):
    """The waiting queue is past its bound: fail fast so callers degrade or shed (RESOURCE_EXHAUSTED)."""


class EngineUnavailable(EngineError):
    """The engine or its upstream cannot serve now: not ready, refused, 5xx (UNAVAILABLE)."""


class EngineTimeout(EngineError):
    """The engine or its upstream did not answer in time (DEADLINE_EXCEEDED)."""


class UpstreamRejected(EngineError):
    """An upstream refused the call for a reason the caller cannot fix, e.g. a wrong API key (FAILED_PRECONDITION)."""


class Engine(Protocol):
    """One model behind InferenceService. `name` is the engine kind: sim, vllm or openai."""

    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def generate(self, request: GenerationRequest) -> AsyncGenerator[Delta, None]:
        """Stream deltas; closing the iterator early aborts the request inside the engine."""
        ...

    async def abort(self, request_id: str) -> None: ...

    def state(self) -> EngineState: ...

    def models(self) -> list[ModelInfo]: ...

    def load(self) -> EngineLoad: ...
