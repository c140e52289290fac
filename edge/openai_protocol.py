"""The public contract of the OpenAI-compatible routes: request and response bodies of `/v1/chat/completions`
and `/v1/models`, shaped like OpenAI's chat API (the subset ChatterBot serves: tools, structured output, penalties
and log probabilities included).

Requests are validated here, every text the store keeps included (`StoredText`). Nothing a request says is
silently ignored: a parameter of OpenAI's API that this server cannot honour (`REFUSED`: `n` above 1, audio, the
deprecated functions API, ...) is refused unless its value asks for nothing, and one that is not OpenAI's at all is
refused too; the routes answer both with 400 and OpenAI's error object naming the parameter (as they answer an
engine that cannot honour one, such as `logit_bias` on the simulated engine). Responses are built from these
models; a stream's content chunks are rendered once per stream and filled per token (`edge.json_templates`), so
the hot path runs no validation. `tests/test_openai_api.py` and `tests/test_openai_tools.py` check them with the
official SDK.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args

import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from chatterbot import wire
from edge.protocol import FinishReason, FunctionCall, Problem, StoredText, ToolCall, Usage, storable

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

_FUNCTIONS = "the deprecated functions API is not served: send `tools` and `tool_choice`"
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
# (`messages.*.role` on any message). Each is a 400 naming it, unless its value is one of those accepted.
# (A parameter that only some engines cannot honour, such as `logit_bias` on the simulated engine, is not listed:
# the engine refuses it, and that too is a 400 naming it.)
REFUSED: dict[str, Refusal] = {
    "functions": Refusal(_FUNCTIONS, ([],)),
    "function_call": Refusal(_FUNCTIONS, ("none",)),
    "n": Refusal("this server generates one choice per request: send n requests for n choices", (1,)),
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
        "function messages belong to the deprecated functions API: answer a tool call with a tool message",
        ("system", "developer", "user", "assistant", "tool"),
    ),
    "messages.*.function_call": Refusal(_FUNCTIONS),
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


def _invalid_at(loc: tuple[str | int, ...], message: str, value: object) -> ValidationError:
    """A validation error about the field at `loc` (relative to the model being validated): how a check across
    fields still names the one at fault, as OpenAI's `param` does (`messages.3.tool_call_id`)."""
    error = PydanticCustomError("value_error", message)
    return ValidationError.from_exception_data(
        "request", [InitErrorDetails(type=error, loc=loc, input=value)]
    )


# OpenAI's rule for the name of a function (and of a JSON schema).
NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"
Name = Annotated[str, Field(pattern=NAME_PATTERN, description="a-z, A-Z, 0-9, `_` and `-`; up to 64")]
# OpenAI's bound on the tools of a request; the store's on the calls of an answer.
MAX_TOOLS = 128
# The store's bound on a tool call's id.
MAX_TOOL_CALL_ID = wire.TOOL_CALL_ID_MAX
MAX_TOP_LOGPROBS = wire.TOP_LOGPROBS_MAX
ToolCallId = Annotated[StoredText, Field(min_length=1, max_length=MAX_TOOL_CALL_ID)]
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]
Bias = Annotated[float, Field(ge=-100, le=100)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


def _sendable(value: dict[str, Any]) -> dict[str, Any]:
    # Sent on as JSON text (orjson's, which holds integers of 64 bits at most).
    try:
        orjson.dumps(value)
    except orjson.JSONEncodeError as exc:
        raise ValueError(f"cannot be sent on as JSON: {exc}") from None
    return value


# A JSON Schema.
Schema = Annotated[dict[str, Any], AfterValidator(_sendable)]


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


class SentFunctionCall(FunctionCall):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)


class SentToolCall(ToolCall):
    """A tool call of an assistant message of the prompt, as an answer carried it."""

    model_config = ConfigDict(extra="forbid")

    id: ToolCallId
    function: SentFunctionCall


class ChatCompletionMessage(BaseModel):
    """One message of the prompt. `developer` is OpenAI's newer name for `system`. An assistant message may
    carry the tool calls the model made (its content then null), and each `tool` message the result of one of
    them. `name` is sent to the model on tool messages (the function that was called); on others it is accepted
    but not sent (a prompt carries roles and contents only). Function messages are refused (REFUSED)."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = Field(
        None,
        description="A string or a list of text parts (joined by newlines); null only on assistant messages",
    )
    name: str | None = Field(
        None,
        description="On a tool message: the function called; elsewhere accepted, but not sent to the model",
    )
    tool_calls: list[SentToolCall] | None = Field(
        None, max_length=MAX_TOOLS, description="On an assistant message: the calls the model made"
    )
    tool_call_id: ToolCallId | None = Field(
        None, description="On a tool message: the id of the call (of the assistant message before) it answers"
    )
    # Refused unless they ask for nothing (REFUSED): what an assistant message that the SDK hands back may carry.
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
    def _fits_its_role(self) -> ChatCompletionMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        if self.tool_calls and self.role != "assistant":
            raise _invalid_at(("tool_calls",), "only assistant messages carry tool calls", self.tool_calls)
        if self.role != "tool" and self.tool_call_id is not None:
            raise _invalid_at(("tool_call_id",), "only tool messages answer a tool call", self.tool_call_id)
        if self.role == "tool" and self.tool_call_id is None:
            raise _invalid_at(("tool_call_id",), "a tool message needs the id of the call it answers", None)
        seen: set[str] = set()
        for i, call in enumerate(self.tool_calls or ()):
            if call.id in seen:
                raise _invalid_at(("tool_calls", i, "id"), f"two tool calls have the id {call.id!r}", call.id)
            seen.add(call.id)
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


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name
    description: str | None = Field(None, description="What the function does, for the model to choose it")
    parameters: Schema | None = Field(
        None, description="The JSON Schema of its arguments (an object schema); omitted: it takes none"
    )
    strict: bool | None = Field(None, description="Ask for arguments that follow the schema exactly")


class ChatCompletionTool(BaseModel):
    """A function the model may call."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionDefinition


class FunctionChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="One of the functions of `tools`")


class NamedToolChoice(BaseModel):
    """Call this function."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionChoice


ToolChoiceMode = Literal["none", "auto", "required"]
TOOL_CHOICE_MODES: tuple[str, ...] = get_args(ToolChoiceMode)


class JSONSchema(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name
    description: str | None = None
    schema_: Schema = Field(alias="schema", description="The JSON Schema the answer is valid against")
    strict: bool | None = Field(None, description="Ask for an answer that follows the schema exactly")


class ResponseFormat(BaseModel):
    """The shape of the answer: free text, any JSON object (`json_object`), or a JSON document valid against
    `json_schema.schema`."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchema | None = Field(
        None, description="With type `json_schema` only, and then required"
    )

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") is not (self.json_schema is not None):
            raise _invalid_at(("json_schema",), "is required with type json_schema, and only then", None)
        return self


class ChatCompletionRequest(BaseModel):
    """Body of `POST /v1/chat/completions`. A parameter of OpenAI's API that this server does not honour
    (REFUSED) is refused unless it asks for nothing; one that is not OpenAI's is refused; one that the engine
    cannot honour is refused by the engine. Each is a 400 naming it."""

    model_config = ConfigDict(extra="forbid")

    messages: list[ChatCompletionMessage] = Field(
        min_length=1,
        max_length=MAX_MESSAGES,
        description="The whole conversation so far, oldest first; the last one is the user's new message, or "
        "the results of the tool calls of the assistant message before them",
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
    presence_penalty: Penalty | None = Field(
        None, description="-2 to 2: lowers (or raises) the odds of tokens the answer already holds"
    )
    frequency_penalty: Penalty | None = Field(
        None, description="-2 to 2: lowers (or raises) the odds of tokens by how often the answer holds them"
    )
    logit_bias: dict[TokenId, Bias] | None = Field(
        None, description="Token ids of the model's vocabulary (as strings) to a bias from -100 to 100"
    )
    logprobs: bool | None = Field(None, description="Return the log probability of each generated token")
    top_logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_TOP_LOGPROBS,
        description=f"0 to {MAX_TOP_LOGPROBS}, with logprobs: also the likeliest tokens at each position",
    )
    user: StoredText | None = Field(
        None,
        min_length=wire.USER_ID_MIN,
        max_length=wire.USER_ID_MAX,
        description="Whose history the exchange is stored in (the seed API's user_id); omitted: the configured "
        "default user (CHATTERBOT_OPENAI_DEFAULT_USER)",
    )
    tools: list[ChatCompletionTool] | None = Field(
        None, max_length=MAX_TOOLS, description="Functions the model may call"
    )
    tool_choice: ToolChoiceMode | NamedToolChoice | None = Field(
        None,
        description="`auto` (the default with tools: the model decides), `none` (text only), `required` (at "
        "least one call), or a named function to call",
    )
    parallel_tool_calls: bool | None = Field(
        None, description="Whether the model may call several tools in one answer; omitted: it may"
    )
    response_format: ResponseFormat | None = None

    # OpenAI's parameters that this server does not honour: refused unless they ask for nothing (REFUSED).
    n: int | None = Field(None, description="1 only: one choice is generated")
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None
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

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _one_tool_choice(cls, choice: Any) -> Any:
        # Before the union, so that a wrong choice is one error naming `tool_choice`, not one per member.
        if isinstance(choice, dict):
            return NamedToolChoice.model_validate(choice)
        if choice is not None and choice not in TOOL_CHOICE_MODES:
            raise ValueError(
                "must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}"
            )
        return choice

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
        last = len(self.messages) - 1
        if self.messages[last].role not in ("user", "tool"):
            raise _invalid_at(
                ("messages", last, "role"),
                "the last message must be a user message, or the results of tool calls",
                self.messages[last].role,
            )
        calls: set[str] = set()  # the ids of the calls of the last assistant message so far
        for i, message in enumerate(self.messages):
            if message.role == "assistant":
                calls = {call.id for call in message.tool_calls or ()}
            elif message.role == "tool" and message.tool_call_id not in calls:
                raise _invalid_at(
                    ("messages", i, "tool_call_id"),
                    f"{message.tool_call_id!r} is not the id of a tool call of the assistant message before it",
                    message.tool_call_id,
                )
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP_SEQUENCES:
            raise ValueError(f"stop holds at most {MAX_STOP_SEQUENCES} sequences")
        self._check_tools()
        if self.top_logprobs is not None and not self.logprobs:
            raise _invalid_at(("top_logprobs",), "needs logprobs: true", self.top_logprobs)
        return self

    def _check_tools(self) -> None:
        # As vLLM's server checks them: a choice other than `none` needs `tools`, and a named one must be there.
        names = [tool.function.name for tool in self.tools or ()]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise _invalid_at(("tools", i, "function", "name"), f"names {name!r} twice", name)
        choice = self.tool_choice
        if choice is None or choice == "none":
            return
        if self.tools is None:
            raise _invalid_at(("tool_choice",), "needs tools", choice)
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise _invalid_at(
                ("tool_choice", "function", "name"),
                f"{choice.function.name!r} is not one of the functions of tools",
                choice.function.name,
            )

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


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = Field(
        description="The token's UTF-8 bytes (a token may hold part of a character)"
    )


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(
        description="The likeliest tokens at this position (`top_logprobs` of them), the chosen one included"
    )


class ChoiceLogprobs(BaseModel):
    """With `logprobs: true`: those of the answer's tokens (of the chunk's, when streamed)."""

    content: list[TokenLogprob] | None
    refusal: None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = Field(description="null when the answer is tool calls only")
    refusal: None = None
    tool_calls: list[ToolCall] | None = Field(
        None, description="The functions the model called (finish_reason `tool_calls`); null: none"
    )


class ChatCompletionChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    """The non-streamed answer. The `X-Conversation-Id` header names the conversation it was stored in."""

    id: str = Field(description="`chatcmpl-` and the turn's request id")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(description="Unix seconds")
    model: str = Field(description="The model that answered")
    choices: list[ChatCompletionChoice]
    usage: Usage


class ChunkFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = Field(None, description="More of the arguments' JSON text, to append")


class ChunkToolCall(BaseModel):
    """A piece of a tool call: the first piece of call `index` has its id, type and name, later ones more of
    its arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: ChunkFunctionCall


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ChunkToolCall] | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: ChunkDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    """One `data:` event of a streamed answer. The first carries the role, then content deltas (or pieces of tool
    calls, with the log probabilities of their tokens when asked), then one with the finish reason; with
    `stream_options.include_usage` a last one has empty `choices` and the usage (the others `usage: null`).
    `data: [DONE]` ends the stream."""

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
