"""The public contract of the edge: request and response bodies of the seed API."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

CONVERSATION_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"


class ChatRequest(BaseModel):
    """Body of `POST /chat` (and of the queued routes)."""

    model_config = ConfigDict(extra="ignore")

    message: str = Field(
        min_length=1, max_length=2000, description="The user's message; the limit is configurable"
    )
    user_id: str = Field(min_length=3, max_length=50)
    context: list[str] = Field(
        default_factory=list, max_length=10, description="Extra context for this turn only"
    )
    max_tokens: int = Field(256, ge=10, le=1024)
    temperature: float = Field(0.7, ge=0.1, le=1.0)
    conversation_id: str | None = Field(None, pattern=CONVERSATION_ID_PATTERN)
    stream: bool = Field(False, description="Answer as a text/event-stream instead of one JSON body")


class ChatResponse(BaseModel):
    response: str
    conversation_id: str
    processing_time: float = Field(description="Seconds the turn took")


class StreamEvent(BaseModel):
    """One `data:` event of a chat stream; the last one has done=true and the turn's details."""

    token: str
    done: bool
    conversation_id: str | None = None
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    processing_time: float | None = None


class Degradation(BaseModel):
    """chat_svc's rung of the degradation ladder: none, reduced_context, light_model, cache_only or shed."""

    rung: str
    reason: str = ""


class HealthResponse(BaseModel):
    status: Literal["healthy", "degraded"]
    components: dict[str, Literal["up", "down"]]
    timestamp: str
    degradation: Degradation | None = None
    reasons: list[str] = Field(default_factory=list, description="Why the status is degraded")


class Problem(BaseModel):
    """RFC 9457 problem details, the body of every error response."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str | None = None
    errors: list[dict] | None = None


class AsyncChatAccepted(BaseModel):
    status: Literal["processing"]
    message: str
    correlation_id: str
    check_endpoint: str


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


class QueueCounts(BaseModel):
    message_count: int
    consumer_count: int


class QueueStats(BaseModel):
    """The seed's queue view; `jetstream` has the figures it is derived from."""

    chat_queue: QueueCounts
    response_queue: QueueCounts
    batch_queue: QueueCounts
    jetstream: dict


# --- conversations and history ---


class ConversationCreate(BaseModel):
    """Body of `POST /conversations`."""

    user_id: str = Field(min_length=3, max_length=50)
    title: str = Field("", max_length=200, description="Empty gives the default title")


class ConversationTitle(BaseModel):
    """Body of `PUT /conversations/{conversation_id}/title`."""

    user_id: str = Field(min_length=3, max_length=50)
    title: str = Field(min_length=1, max_length=200)


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


class HistoryMessage(BaseModel):
    message_id: int = Field(description="Increasing within a user; the `before` cursor")
    role: Literal["system", "user", "assistant"]
    content: str
    token_count: int
    created_at: str = Field(description="RFC 3339")
    processing_time: float | None = Field(None, description="Seconds the answer took, on assistant messages")
    model: str | None = None


class History(BaseModel):
    user_id: str
    conversation_id: str
    messages: list[HistoryMessage] = Field(description="Oldest first: the newest `limit` before the cursor")
    next_before: int | None = Field(None, description="Pass as `before` for the older page; null when none")


class ConversationDeleted(BaseModel):
    conversation_id: str
    deleted_messages: int
