"""The one seam between InferenceService and the engines."""

from __future__ import annotations

import enum
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol


class EngineState(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


@dataclass(frozen=True)
class ToolCall:
    """A function call the model made: `arguments` is JSON text as the model wrote it."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant" | "tool"
    content: str
    # On assistant messages: the calls the model made.
    tool_calls: tuple[ToolCall, ...] = ()
    # On tool messages: the call answered, and the function's name when the client gave it.
    tool_call_id: str = ""
    name: str = ""


@dataclass(frozen=True)
class Tool:
    """A function the model may call; `parameters` is its arguments' JSON Schema (None: it takes none)."""

    name: str
    description: str = ""
    parameters: dict[str, Any] | None = None
    strict: bool = False


@dataclass(frozen=True)
class ResponseFormat:
    """`json_object` (any JSON object) or `json_schema` (a document valid against `schema`)."""

    type: Literal["json_object", "json_schema"]
    schema: dict[str, Any] | None = None
    name: str = ""
    strict: bool = False


# "auto", "none", "required", or the name of the one function to call.
ToolChoice = str
TOOL_CHOICE_MODES = frozenset({"auto", "none", "required"})


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
    tools: tuple[Tool, ...] = ()
    # "auto", "none", "required" or a function's name; "" is the default ("auto" with tools, else "none").
    tool_choice: ToolChoice = ""
    # None: the engine's default (parallel calls allowed).
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # Token id to bias.
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: bool = False
    top_logprobs: int = 0

    @property
    def effective_tool_choice(self) -> ToolChoice:
        """The choice in force: "none" without tools; "auto" when tools are offered with no choice."""
        if not self.tools:
            return "none"
        return self.tool_choice or "auto"


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of a tool call: the first piece of call `index` has its id and name, later ones more
    arguments to append."""

    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass(frozen=True)
class TopLogprob:
    token: str
    logprob: float
    bytes: bytes = b""


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    bytes: bytes = b""
    top_logprobs: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class Delta:
    """Text produced since the previous delta; the last one has finish_reason and token counts."""

    text: str
    token_count: int
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "tool_calls"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Pieces of tool calls generated since the previous delta.
    tool_calls: tuple[ToolCallDelta, ...] = ()
    # With GenerationRequest.logprobs: one per token of `text`.
    logprobs: tuple[TokenLogprob, ...] = ()


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


class Unsupported(InvalidRequest):
    """The engine cannot honour a parameter the request sets (INVALID_ARGUMENT, with a `param` trailer naming
    it as the OpenAI API does: `logit_bias`, `response_format`, `tools`, ...)."""

    def __init__(self, param: str, reason: str) -> None:
        super().__init__(f"{param}: {reason}")
        self.param = param


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
