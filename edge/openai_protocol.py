"""The public contract of the OpenAI-compatible routes: request and response bodies of `/v1/chat/completions`
and `/v1/models`, shaped like OpenAI's chat API (the subset ChatterBot serves).

Requests are validated here, every text the store keeps included (`StoredText`). Responses are built from these
models; a stream's chunks are rendered once per stream and filled per token (`edge.json_templates`), so the hot
path runs no validation. `tests/test_openai_api.py` checks them with the official SDK.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from chatterbot import wire
from edge.protocol import FinishReason, Problem, StoredText, Usage, storable

# The most a turn may generate, as for POST /chat.
MAX_COMPLETION_TOKENS = 1024
# OpenAI's own limit on stop sequences.
MAX_STOP_SEQUENCES = 4
MAX_MESSAGES = 256


# --- requests ---


class ContentPart(BaseModel):
    """One part of a message's content; only text parts are served."""

    model_config = ConfigDict(extra="ignore")

    type: str
    text: str = ""

    @model_validator(mode="after")
    def _text_only(self) -> ContentPart:
        if self.type != "text":
            raise ValueError(f"content parts of type {self.type!r} are not supported; only 'text'")
        return self


class ChatCompletionMessage(BaseModel):
    """One message of the prompt. `developer` is OpenAI's newer name for `system`; `name` is accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = Field(
        None,
        description="A string or a list of text parts (joined by newlines); null only on assistant messages",
    )
    name: str | None = None

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
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = Field(False, description="Send a last chunk with empty choices and the usage")


class ChatCompletionRequest(BaseModel):
    """Body of `POST /v1/chat/completions`. Fields of OpenAI's API not listed here are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

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
    n: int = Field(1, ge=1, le=1, description="Only one choice is generated")

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
