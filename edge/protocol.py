"""The public contract of the edge: request and response bodies of the seed API."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

CONVERSATION_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"


class ChatRequest(BaseModel):
    """Body of `POST /chat` (and of the queued routes)."""

    model_config = ConfigDict(extra="ignore")

    message: str = Field(min_length=1, max_length=2000, description="The user's message; the limit is configurable")
    user_id: str = Field(min_length=3, max_length=50)
    context: list[str] = Field(default_factory=list, max_length=10, description="Extra context for this turn only")
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


class HealthResponse(BaseModel):
    status: Literal["healthy", "degraded"]
    components: dict[str, Literal["up", "down"]]
    timestamp: str


class Problem(BaseModel):
    """RFC 9457 problem details, the body of every error response."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str | None = None
    errors: list[dict] | None = None
