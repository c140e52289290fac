"""The JetStream layout of queued chats: streams, consumers, subjects and the wire form of jobs and events.

- `CHAT_JOBS` (work queue, file storage): one subject per priority. One durable pull consumer per subject;
  workers pull streaming jobs first, then interactive, then batch. Publishes are deduplicated on the
  correlation id (`Nats-Msg-Id`).
- `CHAT_EVENTS` (limits, short max age): the token events of each job on `chat.events.<correlation id>`,
  replayable by sequence, so a dropped stream resumes where it left off.
- `CHAT_DLQ`: jobs that failed their last try, with the error, for `chatterbot dlq list|replay`.
- `chat.cancel.<correlation id>` (core NATS, not stored): tells the worker running a job to stop.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import nats.js.errors
import orjson
from nats.js import JetStreamContext, api

from chatterbot.settings import Settings

log = logging.getLogger(__name__)

JOBS_STREAM = "CHAT_JOBS"
EVENTS_STREAM = "CHAT_EVENTS"
DLQ_STREAM = "CHAT_DLQ"
EVENTS_SUBJECT_PREFIX = "chat.events."
CANCEL_SUBJECT_PREFIX = "chat.cancel."
DLQ_SUBJECT_PREFIX = "chat.dlq."

# Priority name → (subject, durable consumer), highest priority first.
PRIORITIES = {
    "streaming": ("chat.jobs.streaming", "chat-workers-streaming"),
    "interactive": ("chat.jobs.interactive", "chat-workers-interactive"),
    "batch": ("chat.jobs.batch", "chat-workers-batch"),
}


def events_subject(correlation_id: str) -> str:
    return EVENTS_SUBJECT_PREFIX + correlation_id


def cancel_subject(correlation_id: str) -> str:
    return CANCEL_SUBJECT_PREFIX + correlation_id


@dataclass
class Job:
    """A queued chat turn, as published on CHAT_JOBS."""

    correlation_id: str
    priority: str
    user_id: str
    message: str
    context: list[str] = field(default_factory=list)
    max_tokens: int = 256
    temperature: float = 0.7
    conversation_id: str = ""
    model: str = ""
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def encode(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def decode(cls, data: bytes) -> Job:
        return cls(**orjson.loads(data))


async def ensure_streams(js: JetStreamContext, settings: Settings) -> None:
    """Create or update the streams and consumers; safe to run from every process at every start."""
    await _ensure_stream(
        js,
        api.StreamConfig(
            name=JOBS_STREAM,
            subjects=[subject for subject, _ in PRIORITIES.values()],
            retention=api.RetentionPolicy.WORK_QUEUE,
            storage=api.StorageType.FILE,
            duplicate_window=120.0,
        ),
    )
    await _ensure_stream(
        js,
        api.StreamConfig(
            name=EVENTS_STREAM,
            subjects=[EVENTS_SUBJECT_PREFIX + ">"],
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            max_age=float(settings.events_max_age_seconds),
            duplicate_window=60.0,
            allow_direct=True,
        ),
    )
    await _ensure_stream(
        js,
        api.StreamConfig(
            name=DLQ_STREAM,
            subjects=[DLQ_SUBJECT_PREFIX + ">"],
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            max_age=float(30 * 86400),
        ),
    )
    for subject, durable in PRIORITIES.values():
        config = api.ConsumerConfig(
            durable_name=durable,
            filter_subject=subject,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=settings.jobs_ack_wait_seconds,
            max_deliver=settings.jobs_max_deliver,
            max_ack_pending=-1,
        )
        await js.add_consumer(JOBS_STREAM, config)


async def _ensure_stream(js: JetStreamContext, config: api.StreamConfig) -> None:
    try:
        await js.add_stream(config)
    except nats.js.errors.BadRequestError:
        # Exists with other settings (an upgrade changed them): bring it up to date.
        await js.update_stream(config)


async def connect(settings: Settings, name: str):
    """The process's one NATS connection; reconnects forever, so a NATS restart is ridden out."""
    import nats

    if not settings.nats_url:
        raise SystemExit("CHATTERBOT_NATS_URL is not set")
    return await nats.connect(
        settings.nats_url,
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=5,
    )


async def disconnect(nc) -> None:
    """Flush what was published, then close. (drain() can hang on pull subscriptions with fetches pending.)"""
    import asyncio
    import contextlib

    import nats.errors

    with contextlib.suppress(nats.errors.Error, TimeoutError):
        await nc.flush(timeout=2)
    # close() can wait on a reconnect loop when the server is gone for good; do not let it hold shutdown.
    with contextlib.suppress(nats.errors.Error, TimeoutError):
        await asyncio.wait_for(nc.close(), timeout=5)
