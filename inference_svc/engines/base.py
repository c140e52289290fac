"""The one seam between InferenceService and the engines."""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator
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


class UnknownModel(LookupError):
    """The request names a model this engine does not serve."""


class Engine(Protocol):
    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Stream deltas; closing the iterator early aborts the request inside the engine."""
        ...

    async def abort(self, request_id: str) -> None: ...

    def state(self) -> EngineState: ...

    def models(self) -> list[ModelInfo]: ...
