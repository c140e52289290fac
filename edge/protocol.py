"""The public contract of the edge: request and response bodies of the seed API.

Every text a turn or a conversation stores is checked here (`StoredText`), so a body the store could not keep
(a NUL, a lone surrogate) is a 422 before any work runs.
"""

from __future__ import annotations

from typing import Annotated, Literal, cast, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError

from chatterbot import wire

# Written as types so that the bodies document them; they must be the wire's names.
FinishReason = Literal["stop", "length", "abort", "tool_calls"]
RoleName = Literal["system", "user", "assistant", "tool"]
assert set(get_args(FinishReason)) == set(wire.FINISH_NAMES.values())
assert set(get_args(RoleName)) == set(wire.ROLE_NAMES.values())


def finish_reason(reason: int) -> FinishReason:
    """The JSON name of a finished turn's FinishReason; `stop` where the mesh did not say."""
    return cast(FinishReason, wire.finish_name(reason) or "stop")


def role_name(role: int) -> RoleName:
    """The JSON name of a stored message's Role; `user` for one the edge does not know."""
    return cast(RoleName, wire.ROLE_NAMES.get(role, "user"))


# The validation error type of text the store cannot keep; its message reads after the field's name.
UNSTORABLE_TEXT = "unstorable_text"


def storable(text: str) -> str:
    """`text`, or a validation error saying why the store could not keep it."""
    problem = wire.text_problem(text)
    if problem is not None:
        raise PydanticCustomError(UNSTORABLE_TEXT, problem)
    return text


StoredText = Annotated[str, AfterValidator(storable)]
UserId = Annotated[StoredText, Field(min_length=wire.USER_ID_MIN, max_length=wire.USER_ID_MAX)]
ConversationId = Annotated[str, Field(pattern=wire.CONVERSATION_ID_PATTERN)]


class ChatRequest(BaseModel):
    """Body of `POST /chat` (and of the queued routes)."""

    model_config = ConfigDict(extra="ignore")

    message: StoredText = Field(
        min_length=1, max_length=2000, description="The user's message; the limit is configurable"
    )
    user_id: UserId
    context: list[StoredText] = Field(
        default_factory=list, max_length=10, description="Extra context for this turn only"
    )
    max_tokens: int = Field(256, ge=10, le=1024)
    temperature: float = Field(0.7, ge=0.1, le=1.0)
    conversation_id: ConversationId | None = None
    stream: bool = Field(False, description="Answer as a text/event-stream instead of one JSON body")
    model: str | None = Field(
        None, max_length=200, description="A model of GET /v1/models; null: the default model"
    )


class ChatResponse(BaseModel):
    response: str
    conversation_id: str
    processing_time: float = Field(description="Seconds the turn took")


class Usage(BaseModel):
    """Tokens of a turn; the total is the sum."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class StreamEvent(BaseModel):
    """One `data:` event of a chat stream; the last one has done=true and the turn's details. Fields that are
    not set are left out (a token event is `{"token", "done"}`)."""

    token: str
    done: bool
    restart: bool | None = Field(
        None, description="Queued streams: a retry begins, discard the tokens received so far"
    )
    conversation_id: str | None = None
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    processing_time: float | None = None


class StreamError(BaseModel):
    """The `event: error` of a `POST /chat` stream that failed after it began."""

    status: int
    detail: str | None


class JobStreamError(BaseModel):
    """The `event: error` of a queued stream whose job failed or was cancelled."""

    error: str
    done: bool = True


class Degradation(BaseModel):
    """chat_svc's rung of the degradation ladder: none, reduced_context, light_model, cache_only or shed."""

    rung: str
    reason: str = ""


class HealthResponse(BaseModel):
    status: Literal["healthy", "degraded"]
    components: dict[str, Literal["up", "down"]]
    timestamp: float = Field(description="Seconds since the epoch, as the seed API has it")
    time: str = Field(description="The same instant, RFC 3339")
    degradation: Degradation | None = None
    reasons: list[str] = Field(default_factory=list, description="Why the status is degraded")


class ProbeStatus(BaseModel):
    """Body of `/livez` and `/readyz`."""

    status: Literal["ok", "ready"]


def _is_none(value: object) -> bool:
    return value is None


class FieldError(BaseModel):
    """One reason a request is not valid."""

    loc: list[str | int] = Field(description="Where: body, query, path or header, then the field's path")
    msg: str
    type: str


class Problem(BaseModel):
    """RFC 9457 problem details, the body of every error response; `detail` and `errors` only when known."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str | None = Field(None, exclude_if=_is_none)
    errors: list[FieldError] | None = Field(None, exclude_if=_is_none)


class AsyncChatAccepted(BaseModel):
    status: Literal["processing"]
    message: str
    correlation_id: str
    check_endpoint: str
    stream_endpoint: str = Field(description="Watch the turn here; open it as it is (it carries a ticket)")


class StreamChatAccepted(BaseModel):
    status: Literal["streaming"]
    message: str
    correlation_id: str
    stream_endpoint: str


class CheckResponseDone(BaseModel):
    response: str
    conversation_id: str
    processing_time: float


class CheckResponsePending(BaseModel):
    status: Literal["pending"]
    correlation_id: str
    message: str


class CheckResponseFailed(BaseModel):
    status: Literal["failed"]
    correlation_id: str
    error: str


class StreamCancelled(BaseModel):
    """Body of `DELETE /stream/{correlation_id}`: the job's status after the cancel."""

    status: str = Field(description="e.g. cancelled, or succeeded/failed when it had already ended")
    correlation_id: str


class QueueCounts(BaseModel):
    message_count: int
    consumer_count: int


class ConsumerStats(BaseModel):
    """One priority's durable JetStream consumer."""

    pending: int
    ack_pending: int
    redelivered: int
    waiting_pulls: int


class JetStreamStats(BaseModel):
    consumers: dict[str, ConsumerStats] = Field(description="By priority: streaming, interactive, batch")
    events_retained: int
    dlq_size: int


class QueueStats(BaseModel):
    """The seed's queue view; `jetstream` has the figures it is derived from."""

    chat_queue: QueueCounts
    response_queue: QueueCounts
    batch_queue: QueueCounts
    jetstream: JetStreamStats


# --- conversations and history ---


class ConversationCreate(BaseModel):
    """Body of `POST /conversations`."""

    user_id: UserId
    title: StoredText = Field("", max_length=200, description="Empty gives the default title")


class ConversationTitle(BaseModel):
    """Body of `PUT /conversations/{conversation_id}/title`."""

    user_id: UserId
    title: StoredText = Field(min_length=1, max_length=200)


class SeedConversationTitle(ConversationTitle):
    """Body of the seed API's `PUT /conversations/title`."""

    conversation_id: ConversationId


class Conversation(BaseModel):
    conversation_id: str
    title: str
    created_at: str = Field(description="RFC 3339")
    updated_at: str = Field(description="RFC 3339; activity moves a conversation to the top of the list")
    message_count: int


class ConversationList(BaseModel):
    user_id: str
    conversations: list[Conversation] = Field(description="Most recently updated first")
    next_page_token: str | None = Field(
        None, description="Pass as page_token for the next page; null on the last"
    )


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(
        description="JSON text, as the model wrote it: it may not be valid JSON, or not follow the function's "
        "schema; check it before calling the function"
    )


class ToolCall(BaseModel):
    """A function call the model made (as OpenAI's chat API spells it)."""

    id: str = Field(description="Unique within the conversation; the tool message with its result names it")
    type: Literal["function"] = "function"
    function: FunctionCall


class HistoryMessage(BaseModel):
    message_id: int = Field(description="Increasing within a user; the `before` cursor")
    conversation_id: str | None = Field(None, description="Set when the history spans conversations")
    role: RoleName
    content: str
    token_count: int
    created_at: str = Field(description="RFC 3339")
    processing_time: float | None = Field(None, description="Seconds the answer took, on assistant messages")
    model: str | None = None
    tool_calls: list[ToolCall] | None = Field(
        None, description="On an assistant message that called tools: the calls (its content may be empty)"
    )
    tool_call_id: str | None = Field(
        None, description="On a tool message: the id of the call (of an assistant message before) it answers"
    )


class History(BaseModel):
    user_id: str
    conversation_id: str | None = Field(description="null: the latest messages across conversations")
    messages: list[HistoryMessage] = Field(
        description="Oldest first: the newest `limit` before the cursor. Across conversations: each one's "
        "newest `limit`, newest conversation first"
    )
    next_before: int | None = Field(None, description="Pass as `before` for the older page; null when none")
    next_page_token: str | None = Field(
        None,
        description="Across conversations: pass as `page_token` for older conversations; null on the last",
    )


class ConversationDeleted(BaseModel):
    conversation_id: str
    deleted_messages: int
