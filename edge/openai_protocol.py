"""The public contract of the OpenAI-compatible routes: request and response bodies of `/v1/chat/completions`
and `/v1/models`, shaped like OpenAI's chat API (the subset ChatterBot serves).

Requests are validated here, every text the store keeps included (`StoredText`). Nothing a request says is
silently ignored: a parameter of OpenAI's API that this server cannot honour (`REFUSED`: tools, structured output,
penalties, ...) is refused unless its value asks for nothing, and one that is not OpenAI's at all is refused too;
the routes answer both with 400 and OpenAI's error object naming the parameter. Responses are built from these
models; a stream's chunks are rendered once per stream and filled per token (`edge.json_templates`), so the hot
path runs no validation. `tests/test_openai_api.py` checks them with the official SDK.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from chatterbot import wire
from edge.protocol import FinishReason, Problem, StoredText, Usage, storable

# The most a turn may generate, as for POST /chat.
MAX_COMPLETION_TOKENS = 1024
# OpenAI's own limit on stop sequences.
MAX_STOP_SEQUENCES = 4
MAX_MESSAGES = 256


# --- parameters this server does not honour ---

# The validation error types of a parameter the server refuses: one of OpenAI's it cannot honour, and one that is
# not part of OpenAI's chat completions API at all (pydantic's, for a field no model declares). The routes answer
# them with 400, as OpenAI does, where other invalid input is a 422.
UNSUPPORTED_PARAMETER = "unsupported_parameter"
UNRECOGNIZED_PARAMETER = "extra_forbidden"
REFUSAL_TYPES = frozenset({UNSUPPORTED_PARAMETER, UNRECOGNIZED_PARAMETER})

_TOOL_CALLING = "tool calling is not supported by this server"
_LOGPROBS = "log probabilities are not returned by this server"
_PENALTIES = "presence and frequency penalties are not supported by this server"
_PROMPT_CACHE = "prompt caching is not steered by this server"


@dataclass(frozen=True)
class Refusal:
    """Why a parameter is refused, and the values that ask for nothing (OpenAI's defaults; null always does),
    which are accepted."""

    reason: str
    accepted: tuple[object, ...] = ()

    def allows(self, value: object) -> bool:
        # `True == 1`, so a boolean matches booleans only.
        return value is None or any(
            value == ok and isinstance(value, bool) is isinstance(ok, bool) for ok in self.accepted
        )


# Every parameter of OpenAI's chat completions API that this server does not honour, by where a request writes it
# (`messages.*.tool_calls` on any message). Each is a 400 naming it, unless its value is one of those accepted.
# Tool calling and structured output are to be served later; until then they are refused, never ignored.
REFUSED: dict[str, Refusal] = {
    "tools": Refusal(_TOOL_CALLING, ([],)),
    "tool_choice": Refusal(_TOOL_CALLING, ("none",)),
    "functions": Refusal(_TOOL_CALLING, ([],)),
    "function_call": Refusal(_TOOL_CALLING, ("none",)),
    "response_format": Refusal(
        "structured output (JSON mode, JSON schemas) is not supported by this server", ({"type": "text"},)
    ),
    "logprobs": Refusal(_LOGPROBS, (False,)),
    "top_logprobs": Refusal(_LOGPROBS),
    "logit_bias": Refusal("logit bias is not supported by this server", ({},)),
    "presence_penalty": Refusal(_PENALTIES, (0,)),
    "frequency_penalty": Refusal(_PENALTIES, (0,)),
    "n": Refusal("this server generates one choice", (1,)),
    "modalities": Refusal("this server generates text only", (["text"],)),
    "audio": Refusal("audio output is not supported by this server"),
    "prediction": Refusal("predicted outputs are not supported by this server"),
    "web_search_options": Refusal("web search is not supported by this server"),
    "reasoning_effort": Refusal("the models of this server do not take a reasoning effort"),
    "verbosity": Refusal("the models of this server do not take a verbosity", ("medium",)),
    "service_tier": Refusal("this server has one service tier", ("auto", "default")),
    "store": Refusal(
        "stored completions are not served (the exchange is kept as chat history, as every completion is)",
        (False,),
    ),
    "metadata": Refusal("metadata is not stored: stored completions are not served", ({},)),
    "moderation": Refusal("moderation is not run by this server"),
    "prompt_cache_key": Refusal(_PROMPT_CACHE),
    "prompt_cache_options": Refusal(_PROMPT_CACHE),
    "prompt_cache_retention": Refusal(_PROMPT_CACHE),
    "safety_identifier": Refusal("this server runs no abuse monitoring; `user` names whose history it is"),
    "stream_options.include_obfuscation": Refusal("this server's chunks carry no obfuscation", (False,)),
    "messages.*.role": Refusal(
        f"{_TOOL_CALLING}: tool and function messages answer tool calls",
        ("system", "developer", "user", "assistant"),
    ),
    "messages.*.tool_calls": Refusal(_TOOL_CALLING, ([],)),
    "messages.*.tool_call_id": Refusal(_TOOL_CALLING),
    "messages.*.function_call": Refusal(_TOOL_CALLING),
    "messages.*.audio": Refusal("audio is not supported by this server"),
    "messages.*.refusal": Refusal("a refusal cannot be shown to the model; send it as content"),
}


def _refusing(prefix: str) -> Any:
    """The field validator of a model reached at `prefix` (`""`, `"messages.*."`, ...): it refuses the values of
    REFUSED's fields there that ask for something."""
    rests = (name.removeprefix(prefix) for name in REFUSED if name.startswith(prefix))

    def refuse(cls: type[BaseModel], value: Any, info: ValidationInfo) -> Any:
        refusal = REFUSED[prefix + (info.field_name or "")]
        if not refusal.allows(value):
            raise PydanticCustomError(UNSUPPORTED_PARAMETER, "{reason}", {"reason": refusal.reason})
        return value

    return field_validator(*(rest for rest in rests if "." not in rest))(classmethod(refuse))


# --- requests ---


class ContentPart(BaseModel):
    """One part of a message's content; only text parts are served."""

    model_config = ConfigDict(extra="forbid")

    type: str
    text: str = ""

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data: Any) -> Any:
        # Before the fields: a part of another type is refused for its type, not for the fields that come with it.
        if isinstance(data, dict) and data.get("type", "text") != "text":
            raise ValueError(f"content parts of type {data['type']!r} are not supported; only 'text'")
        return data


class ChatCompletionMessage(BaseModel):
    """One message of the prompt. `developer` is OpenAI's newer name for `system`. `name` is accepted, but not
    sent to the model (a prompt carries roles and contents only). Tool and function messages, and an assistant's
    tool calls, are refused (REFUSED)."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = Field(
        None,
        description="A string or a list of text parts (joined by newlines); null only on assistant messages",
    )
    name: str | None = Field(None, description="Accepted, but not sent to the model")
    # Refused unless they ask for nothing (REFUSED): what an assistant message that the SDK hands back may carry.
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None
    function_call: dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    refusal: str | None = None

    _refuse = _refusing("messages.*.")

    @field_validator("content")
    @classmethod
    def _storable_content(cls, content: str | list[ContentPart] | None) -> str | list[ContentPart] | None:
        # Checked after the union is resolved, so an error names `content`, not a member of the union.
        if isinstance(content, str):
            storable(content)
        elif content is not None:
            for part in content:
                storable(part.text)
        return content

    @model_validator(mode="after")
    def _content_present(self) -> ChatCompletionMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        return self

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = Field(False, description="Send a last chunk with empty choices and the usage")
    include_obfuscation: bool | None = Field(
        None, description="Refused unless false: chunks carry no obfuscation"
    )

    _refuse = _refusing("stream_options.")


class ChatCompletionRequest(BaseModel):
    """Body of `POST /v1/chat/completions`. A parameter of OpenAI's API that this server does not honour
    (REFUSED) is refused unless it asks for nothing; one that is not OpenAI's is refused."""

    model_config = ConfigDict(extra="forbid")

    messages: list[ChatCompletionMessage] = Field(
        min_length=1,
        max_length=MAX_MESSAGES,
        description="The whole conversation so far, oldest first; the last one is the user's new message",
    )
    model: StoredText = Field(
        "", max_length=256, description="An id from GET /v1/models; empty: the default model"
    )
    stream: bool = Field(False, description="Answer as `chat.completion.chunk` server-sent events")
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(
        None,
        ge=1,
        le=MAX_COMPLETION_TOKENS,
        description="Deprecated by OpenAI; max_completion_tokens wins when both are given",
    )
    max_completion_tokens: int | None = Field(
        None, ge=1, le=MAX_COMPLETION_TOKENS, description=f"Omitted: up to {MAX_COMPLETION_TOKENS}"
    )
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="Omitted: 1; 0 samples greedily")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Omitted: 1")
    stop: str | list[str] | None = Field(None, description=f"Up to {MAX_STOP_SEQUENCES} stop sequences")
    seed: int | None = Field(
        None, ge=0, le=2**64 - 1, description="Reproducible sampling; such answers may be cached"
    )
    user: StoredText | None = Field(
        None,
        min_length=wire.USER_ID_MIN,
        max_length=wire.USER_ID_MAX,
        description="Whose history the exchange is stored in (the seed API's user_id); omitted: the configured "
        "default user (CHATTERBOT_OPENAI_DEFAULT_USER)",
    )
    # Accepted: it shapes only tool calls, and with `tools` refused there are none.
    parallel_tool_calls: bool | None = Field(
        None, description="Accepted: there are no tool calls to run in parallel"
    )

    # OpenAI's parameters that this server does not honour: refused unless they ask for nothing (REFUSED).
    n: int | None = Field(None, description="1 only: one choice is generated")
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    logit_bias: dict[str, Any] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    service_tier: str | None = None
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    moderation: dict[str, Any] | None = None
    prompt_cache_key: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    prompt_cache_retention: str | None = None
    safety_identifier: str | None = None

    _refuse = _refusing("")

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(
        cls, options: StreamOptions | None, info: ValidationInfo
    ) -> StreamOptions | None:
        # Options of a stream that is not asked for would go unused: refused, as OpenAI refuses them.
        if options is not None and not info.data.get("stream"):
            raise PydanticCustomError(UNSUPPORTED_PARAMETER, "only allowed when stream is true")
        return options

    @field_validator("stop")
    @classmethod
    def _storable_stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        for sequence in [stop] if isinstance(stop, str) else stop or []:
            storable(sequence)
        return stop

    @model_validator(mode="after")
    def _valid_prompt(self) -> ChatCompletionRequest:
        if self.messages[-1].role != "user":
            raise ValueError("the last message must be a user message")
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP_SEQUENCES:
            raise ValueError(f"stop holds at most {MAX_STOP_SEQUENCES} sequences")
        return self

    @property
    def stop_sequences(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def completion_tokens_limit(self) -> int:
        return self.max_completion_tokens or self.max_tokens or MAX_COMPLETION_TOKENS

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


# --- responses ---


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class ChatCompletionChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    """The non-streamed answer. The `X-Conversation-Id` header names the conversation it was stored in."""

    id: str = Field(description="`chatcmpl-` and the turn's request id")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(description="Unix seconds")
    model: str = Field(description="The model that answered")
    choices: list[ChatCompletionChoice]
    usage: Usage


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: ChunkDelta
    logprobs: None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    """One `data:` event of a streamed answer. The first carries the role, then content deltas, then one with
    the finish reason; with `stream_options.include_usage` a last one has empty `choices` and the usage (the
    others `usage: null`). `data: [DONE]` ends the stream."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="Unix seconds (the time of the listing: models carry no creation time)")
    owned_by: str = "chatterbot"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorObject(BaseModel):
    message: str
    type: str = Field(
        description="e.g. invalid_request_error, authentication_error, rate_limit_error, server_error"
    )
    param: str | None = Field(None, description="The offending request field, when one is to blame")
    code: int = Field(description="The HTTP status")


class StreamErrorEvent(BaseModel):
    """A `data:` event of a stream that failed after it began; OpenAI's SDKs raise an APIError for it."""

    error: ErrorObject


class OpenAIProblem(Problem):
    """An error of the OpenAI routes: an RFC 9457 problem (as on every route) that also carries OpenAI's
    `error` object, which OpenAI's SDKs read their error message from. (Only the edge's own guards, which answer
    before any route, send a plain problem: 503 when too many requests are in flight, 413 for a body too large.)"""

    error: ErrorObject | None = None
