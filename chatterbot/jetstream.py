"""The JetStream layout of queued chats: streams, consumers, subjects and the wire form of jobs and events.

- `CHAT_JOBS` (work queue, file storage): one subject per priority. One durable pull consumer per subject;
  workers pull streaming jobs first, then interactive, then batch. Publishes are deduplicated on the
  correlation id (`Nats-Msg-Id`).
- `CHAT_EVENTS` (limits, short max age): the token events of each job on `chat.events.<correlation id>`,
  replayable by sequence, so a dropped stream resumes where it left off.
- `CHAT_DLQ`: jobs that failed their last try, with the error, for `chatterbot dlq list|replay`.
- `chat.cancel.<correlation id>` (core NATS, not stored): tells the worker running a job to stop.

The streams and job consumers are created with `CHATTERBOT_JETSTREAM_REPLICAS` replicas (3 on a cluster). One
that already exists keeps the replicas, retention and storage its operator gave it: a process logs where its
settings differ and never lowers them.

`Job` and `JobEvent` are the one definition of what travels on those subjects, encoded and decoded here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any, TypeVar

import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext, api

from chatterbot import wire
from chatterbot.settings import Settings
from chatterbot.v1 import types_pb2

log = logging.getLogger(__name__)

T = TypeVar("T")

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


@dataclass(frozen=True, kw_only=True)
class QueuedTurn:
    """What a chat turn carries through the job queue: the message and how to answer it.

    The one definition of these fields: chat_svc's turn input extends it, and a `Job` is one with its
    correlation id and priority, so a turn becomes a job (and a job a turn) without naming each field.
    """

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


def queued_fields(turn: QueuedTurn) -> dict[str, Any]:
    """The `QueuedTurn` fields of `turn` (a job, or anything extending it), by name."""
    return {f.name: getattr(turn, f.name) for f in fields(QueuedTurn)}


@dataclass(frozen=True, kw_only=True)
class Job(QueuedTurn):
    """A queued chat turn, as published on CHAT_JOBS: a flat JSON object of its fields."""

    correlation_id: str
    priority: str

    @classmethod
    def of(cls, turn: QueuedTurn, *, correlation_id: str, priority: str, **changes: Any) -> Job:
        """The job of `turn`, with `changes` to its turn fields."""
        return cls(**{**queued_fields(turn), **changes}, correlation_id=correlation_id, priority=priority)

    def encode(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def decode(cls, data: bytes) -> Job:
        return cls(**orjson.loads(data))


# Not frozen, though never changed once built: a frozen dataclass's __init__ costs five times as much, and an
# event is built per token, by the worker that publishes it and by every process that reads it.
@dataclass(slots=True)
class JobEvent:
    """One event of a job on `chat.events.<correlation id>`: a token, a restart marker, the end, or an error.

    On the wire it is the JSON object published since the first release: `seq`, `token` and `done` always,
    `restart` only when true, `error` only when set, and the turn's details (`conversation_id`,
    `finish_reason`, `usage`, `processing_time`) on the final `done` event. Built and read per token: no
    validation beyond what decoding needs.
    """

    seq: int
    token: str = ""
    done: bool = False
    error: str = ""
    restart: bool = False
    conversation_id: str = ""
    finish_reason: str = ""
    usage: types_pb2.Usage | None = None
    processing_time: float = 0.0

    @property
    def final(self) -> bool:
        """Whether the job's stream ends here (done, failed or cancelled)."""
        return self.done or bool(self.error)

    def wire(self) -> dict[str, Any]:
        """The event as its JSON object."""
        body: dict[str, Any] = {"seq": self.seq, "token": self.token, "done": self.done}
        if self.restart:
            body["restart"] = True
        if self.error:
            body["error"] = self.error
        if self.done:
            body["conversation_id"] = self.conversation_id
            body["finish_reason"] = self.finish_reason
            if self.usage is not None:
                body["usage"] = wire.usage_dict(self.usage)
            body["processing_time"] = self.processing_time
        return body

    def encode(self) -> bytes:
        return orjson.dumps(self.wire())

    @classmethod
    def decode(cls, data: bytes | str) -> JobEvent:
        body = orjson.loads(data)
        if len(body) == 3 and "token" in body:
            return cls(body["seq"], body["token"], body["done"])  # the hot path: a token
        usage = body.get("usage")
        return cls(
            seq=body["seq"],
            token=body.get("token", ""),
            done=bool(body.get("done")),
            error=body.get("error") or "",
            restart=bool(body.get("restart")),
            conversation_id=body.get("conversation_id", ""),
            finish_reason=body.get("finish_reason", ""),
            usage=wire.usage_from_dict(usage) if usage is not None else None,
            processing_time=float(body.get("processing_time", 0.0)),
        )


# An existing stream keeps these as its operator set them: a process never lowers the replicas, and JetStream
# cannot change retention or storage in place. Everything else this process sets, it keeps up to date.
OPERATOR_STREAM_FIELDS = ("num_replicas", "retention", "storage")
# Neither can a consumer's ack policy change, and a work-queue stream's consumers follow its replicas.
OPERATOR_CONSUMER_FIELDS = ("num_replicas", "ack_policy")
_DEFAULT_STREAM = api.StreamConfig()
_DEFAULT_CONSUMER = api.ConsumerConfig()
# JetStream's error code for "stream name already in use with a different configuration".
_STREAM_NAME_IN_USE = 10058


async def ensure_streams(js: JetStreamContext, settings: Settings) -> None:
    """Create or update the streams and consumers; safe to run from every process at every start.

    Missing streams and consumers are created with `settings.jetstream_replicas` replicas. One that exists
    keeps its replicas, retention and storage (a difference is logged) and gets only the fields this process
    sets (subjects, max age, duplicate window, ack wait...) brought up to date.
    """
    replicas = settings.jetstream_replicas
    jobs = await _ensure_stream(
        js,
        api.StreamConfig(
            name=JOBS_STREAM,
            subjects=[subject for subject, _ in PRIORITIES.values()],
            retention=api.RetentionPolicy.WORK_QUEUE,
            storage=api.StorageType.FILE,
            num_replicas=replicas,
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
            num_replicas=replicas,
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
            num_replicas=replicas,
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
            # The stream's own count, not the setting: consumers of a work-queue stream must match it.
            num_replicas=jobs.num_replicas,
        )
        await _ensure_consumer(js, JOBS_STREAM, config)


def _owned(config: Any, default: Any, operator_fields: tuple[str, ...]) -> dict[str, Any]:
    """The fields `config` sets (to other than the default) that are not the operator's, by name."""
    return {
        f.name: getattr(config, f.name)
        for f in fields(config)
        if f.name not in operator_fields and getattr(config, f.name) != getattr(default, f.name)
    }


def _warn_kept(kind: str, name: str, current: Any, wanted: Any, operator_fields: tuple[str, ...]) -> None:
    """One warning naming every operator's field where `current` (kept) differs from what would be set."""
    kept = [
        f"{field}={_shown(getattr(current, field))} (this process would set {_shown(getattr(wanted, field))})"
        for field in operator_fields
        if getattr(wanted, field) is not None and getattr(current, field) != getattr(wanted, field)
    ]
    if kept:
        log.warning("JetStream %s %s exists with %s; left as it is", kind, name, ", ".join(kept))


def _shown(value: object) -> object:
    return getattr(value, "value", value)


# A cluster busy placing new streams (processes starting together, a leader election) may answer the JetStream
# API late; every step of ensure_streams reads before it writes, so it is repeated, a few times, with backoff.
_API_ATTEMPTS = 5
_API_BACKOFF_SECONDS = 0.5


async def _repeated(what: str, step: Callable[[], Awaitable[T]]) -> T:
    for attempt in range(1, _API_ATTEMPTS + 1):
        try:
            return await step()
        except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError) as exc:
            if attempt == _API_ATTEMPTS:
                raise
            delay = _API_BACKOFF_SECONDS * 2 ** (attempt - 1)
            log.warning("JetStream %s: %s; retrying in %.1fs", what, type(exc).__name__, delay)
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


async def _ensure_stream(js: JetStreamContext, config: api.StreamConfig) -> api.StreamConfig:
    """Create the stream, or bring what this process owns of the existing one up to date; its config."""
    assert config.name is not None
    return await _repeated(f"stream {config.name}", lambda: _ensure_stream_once(js, config))


async def _ensure_stream_once(js: JetStreamContext, config: api.StreamConfig) -> api.StreamConfig:
    assert config.name is not None
    try:
        current = (await js.stream_info(config.name)).config
    except nats.js.errors.NotFoundError:
        try:
            return (await js.add_stream(config)).config
        except nats.js.errors.APIError as exc:
            if exc.err_code != _STREAM_NAME_IN_USE:
                raise RuntimeError(
                    f"JetStream stream {config.name} could not be created with {config.num_replicas} "
                    f"replica(s) (CHATTERBOT_JETSTREAM_REPLICAS): {exc.description}"
                ) from exc
            # Another process created it in between.
            current = (await js.stream_info(config.name)).config
    _warn_kept("stream", config.name, current, config, OPERATOR_STREAM_FIELDS)
    updated = current.evolve(**_owned(config, _DEFAULT_STREAM, OPERATOR_STREAM_FIELDS))
    if updated == current:
        return current
    log.info("JetStream stream %s: updating its configuration", config.name)
    return (await js.update_stream(updated)).config


async def _ensure_consumer(js: JetStreamContext, stream: str, config: api.ConsumerConfig) -> None:
    """Create the durable consumer, or bring what this process owns of the existing one up to date."""
    assert config.durable_name is not None
    await _repeated(
        f"consumer {stream}/{config.durable_name}", lambda: _ensure_consumer_once(js, stream, config)
    )


async def _ensure_consumer_once(js: JetStreamContext, stream: str, config: api.ConsumerConfig) -> None:
    assert config.durable_name is not None
    try:
        current = (await js.consumer_info(stream, config.durable_name)).config
    except nats.js.errors.NotFoundError:
        await js.add_consumer(stream, config)
        return
    _warn_kept("consumer", f"{stream}/{config.durable_name}", current, config, OPERATOR_CONSUMER_FIELDS)
    updated = current.evolve(**_owned(config, _DEFAULT_CONSUMER, OPERATOR_CONSUMER_FIELDS))
    if updated != current:
        log.info("JetStream consumer %s/%s: updating its configuration", stream, config.durable_name)
        await js.add_consumer(stream, updated)


def nats_servers(url: str) -> list[str]:
    """The servers of a NATS URL setting: one URL, or the nodes of a cluster, comma-separated."""
    return [server.strip() for server in url.split(",") if server.strip()]


async def connect(settings: Settings, name: str) -> NATS:
    """The process's one NATS connection; reconnects forever, so a NATS restart is ridden out."""
    import nats

    if not settings.nats_url:
        raise SystemExit("CHATTERBOT_NATS_URL is not set")
    return await nats.connect(
        nats_servers(settings.nats_url),
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=5,
    )


async def disconnect(nc: NATS) -> None:
    """Flush what was published, then close. (drain() can hang on pull subscriptions with fetches pending.)"""
    import asyncio
    import contextlib

    import nats.errors

    with contextlib.suppress(nats.errors.Error, TimeoutError):
        await nc.flush(timeout=2)
    # close() can wait on a reconnect loop when the server is gone for good; do not let it hold shutdown.
    with contextlib.suppress(nats.errors.Error, TimeoutError):
        await asyncio.wait_for(nc.close(), timeout=5)
