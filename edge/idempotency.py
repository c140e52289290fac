"""`Idempotency-Key` on the chat routes: a retried `POST /chat`, `/async-chat`, `/stream-chat` or
`/v1/chat/completions` that carries the key of an earlier request runs nothing new.

Records live in Redis, shared by every edge replica, under the API key's id and the idempotency key, so two
API keys may use the same idempotency key independently:
- the first request takes the key with `SET NX` of a *running* record held for
  `CHATTERBOT_IDEMPOTENCY_LEASE_SECONDS`, which its edge renews while the request runs; its answer replaces
  the record and is kept `CHATTERBOT_IDEMPOTENCY_TTL_SECONDS`;
- a retry finds the answer and gets it again, marked `Idempotent-Replayed: true`. One that arrives while the
  first runs waits for it, up to the route's deadline (409 with `Retry-After` past that); a stream is refused
  with 409 at once, since a generation is never run twice and a stream in flight cannot be shared. One with
  another body (or on another route) is 422;
- a first request that ended in a 5xx, a "later" 4xx (408, 409, 425, 429) or whose client went away frees
  the key, and so, once its hold lapses, does one whose edge died: the retry runs it again. It runs with the
  same turn request id, derived from the API key's id, the idempotency key and the body, so the store's
  `AppendExchange` (idempotent on the request id) keeps one exchange and answers with the stored one, and a
  queued turn gets the same correlation id (JetStream drops the repeated publish; a worker skips a job whose
  result is in).

Requests refused before they start (a malformed body, a missing or invalid API key, a rate limit) keep
nothing. Redis unreachable: 503 with `Retry-After` (a keyed request is never run unguarded); no Redis
configured: 400. A request without the header costs nothing here: the routes only look at whether it is there.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

import orjson
import redis.exceptions
from fastapi import Request
from pydantic import BaseModel
from redis.asyncio import Redis
from starlette.responses import Response

from chatterbot.redis_client import redis_client
from chatterbot.settings import Settings
from edge.disconnects import unless_disconnected
from edge.problems import ProblemError, problem_response
from edge.protocol import Problem
from edge.sse import Burst, EventStreamResponse, StreamItem, close_iterator

log = logging.getLogger(__name__)

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
MAX_KEY_CHARS = 255
KEY_PREFIX = "chatterbot-idempotency"
REDIS_TIMEOUT_SECONDS = 1.0
# A waiting retry looks again this soon, then less and less often.
POLL_FIRST_SECONDS = 0.02
POLL_MAX_SECONDS = 0.25
DONE = "[DONE]"
# 4xx answers that say "later" rather than "never": not kept, so that the retry runs.
_NOT_KEPT = frozenset({408, 409, 425, 429})
_KEY_RULE = re.compile(rf"[\x20-\x7e]{{1,{MAX_KEY_CHARS}}}")
_REDIS_FAILURES = (redis.exceptions.RedisError, OSError, TimeoutError)

KEY_DESCRIPTION = (
    "Run this request once: a retry with the same key and body gets the first answer (`Idempotent-Replayed: "
    "true`); with another body, 422. 1 to 255 printable ASCII characters, scoped to the API key, kept "
    "CHATTERBOT_IDEMPOTENCY_TTL_SECONDS (a day). Needs Redis"
)


def openapi_parameter(description: str = KEY_DESCRIPTION) -> dict[str, Any]:
    """The header in a route's OpenAPI document (`openapi_extra`): the route reads it with `idempotency_key`
    rather than as a FastAPI parameter, which would cost every request a validation of its own."""
    return {
        "parameters": [
            {
                "name": HEADER,
                "in": "header",
                "required": False,
                "description": description,
                "schema": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": MAX_KEY_CHARS,
                    "pattern": "^[ -~]+$",
                },
            }
        ]
    }


def idempotency_key(request: Request) -> str | None:
    """The request's Idempotency-Key; None without one (a lookup in headers the API key check has read)."""
    return request.headers.get(HEADER)


RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {
        "model": Problem,
        "description": "A malformed Idempotency-Key (empty, over 255 characters, not printable ASCII), or one "
        "sent to an edge without Redis",
    },
    409: {
        "model": Problem,
        "description": "A request with this Idempotency-Key is still running (a stream: at once; else past the "
        "route's deadline); see Retry-After",
    },
    422: {"model": Problem, "description": "Invalid body, or an Idempotency-Key used with another request"},
}

Event: TypeAlias = StreamItem
Events: TypeAlias = AsyncIterator[Event]
Recorder: TypeAlias = Callable[[Events], Events]
# One kept event of a stream: (event name or None, data).
KeptEvent: TypeAlias = tuple[str | None, str]

# Each of these acts only while the record is still the caller's own running record (its value).
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
# Also when the record is gone (the hold lapsed and nobody took over): the answer is still the answer.
_FINISH = """
local current = redis.call('GET', KEYS[1])
if current == false or current == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


@dataclass(frozen=True, slots=True)
class Keyed:
    """A request that carries an Idempotency-Key: where its record is, what it asks, the turn id it runs with."""

    record_key: str
    fingerprint: str
    request_id: str


def keyed(key_id: str, key: str, route: str, body: BaseModel, *extra: str | None) -> Keyed:
    """The keyed request of API key `key_id`; 400 for a malformed `key`. Its fingerprint hashes the route, the
    validated body (keys sorted, defaults filled in) and `extra` (headers that change what it does)."""
    if not _KEY_RULE.fullmatch(key):
        raise ProblemError(400, f"{HEADER} must be 1 to {MAX_KEY_CHARS} printable ASCII characters")
    canonical = orjson.dumps([route, body.model_dump(mode="json"), list(extra)], option=orjson.OPT_SORT_KEYS)
    fingerprint = hashlib.sha256(canonical).hexdigest()
    scope = f"{key_id}\0{key}"
    return Keyed(
        record_key=f"{KEY_PREFIX}:{hashlib.sha256(scope.encode()).hexdigest()[:40]}",
        fingerprint=fingerprint,
        # The body is part of it: a key reused for another request after its record expired starts a new turn.
        request_id=hashlib.sha256(f"{scope}\0{fingerprint}".encode()).hexdigest()[:32],
    )


@dataclass(frozen=True, slots=True)
class Stored:
    """The first answer to a keyed request, as its retries get it."""

    status: int
    body: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    # A stream's events in order; None for a whole answer.
    events: tuple[KeptEvent, ...] | None = None

    @classmethod
    def of(cls, response: Response) -> Stored:
        headers = tuple((k, v) for k, v in response.headers.items() if k != "content-length")
        return cls(response.status_code, bytes(response.body).decode(), headers)

    def response(self) -> Response:
        """The whole answer again."""
        return Response(self.body, self.status, headers=dict(self.headers))

    def stream(self, numbered: bool) -> Response:
        """The stream again, its events whole (`numbered`: with ids from 1, as `POST /chat` streams them); the
        answer of one refused before it streamed (a 4xx) as it was."""
        if self.events is None:
            return self.response()
        kept = self.events

        async def events() -> Events:
            for seq, (name, data) in enumerate(kept, 1):
                event = {"id": str(seq)} if numbered else {}
                if name is not None:
                    event["event"] = name
                event["data"] = data
                yield event

        return EventStreamResponse(events())

    def encode(self, fingerprint: str) -> bytes:
        return orjson.dumps(
            {
                "state": "done",
                "fingerprint": fingerprint,
                "status": self.status,
                "body": self.body,
                "headers": self.headers,
                "events": self.events,
            }
        )

    @classmethod
    def decode(cls, record: dict[str, Any]) -> Stored:
        events = record.get("events")
        return cls(
            status=record["status"],
            body=record["body"],
            headers=tuple((k, v) for k, v in record["headers"]),
            events=None if events is None else tuple((name, data) for name, data in events),
        )


def merge_text(
    events: list[KeptEvent], text_of: Callable[[str], str | None], render: Callable[[str], str]
) -> list[KeptEvent]:
    """`events` with each run of plain text events (those `text_of` reads a text from) made one event, so a
    kept stream holds its answer in a few events rather than one per token."""
    merged: list[KeptEvent] = []
    run: list[str] = []
    for name, data in events:
        text = text_of(data) if name is None and data.startswith("{") else None
        if text is not None:
            run.append(text)
            continue
        if run:
            merged.append((None, render("".join(run))))
            run = []
        merged.append((name, data))
    if run:
        merged.append((None, render("".join(run))))
    return merged


class IdempotencyStore:
    """The edge's idempotency records in Redis; one per edge process, created at startup."""

    def __init__(
        self, client: Redis | None, ttl_seconds: int, lease_seconds: float, max_hold_seconds: float
    ) -> None:
        """`max_hold_seconds`: the longest a request may hold its key (the longest a turn may run)."""
        self.redis = client
        self.ttl_ms = ttl_seconds * 1000
        self.lease_seconds = lease_seconds
        self.lease_ms = max(1, round(lease_seconds * 1000))
        self.max_hold_seconds = max_hold_seconds
        if client is not None:
            self._renew = client.register_script(_RENEW)
            self._finish = client.register_script(_FINISH)
            self._release = client.register_script(_RELEASE)

    @classmethod
    def from_settings(cls, settings: Settings) -> IdempotencyStore:
        # The one place the client is made (directly or through Sentinel, as for the rate limits).
        client = (
            redis_client(settings, timeout=REDIS_TIMEOUT_SECONDS) if settings.redis_configured() else None
        )
        return cls(
            client,
            settings.idempotency_ttl_seconds,
            settings.idempotency_lease_seconds,
            settings.stream_deadline_seconds + settings.idempotency_lease_seconds,
        )

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()

    async def claim(self, keyed: Keyed, wait_seconds: float | None) -> Claim | Stored:
        """The key for this request to run with, or the first request's answer. While the first runs, wait
        for it for up to `wait_seconds` (None: not at all).

        Raises ProblemError: 400 without Redis, 422 when the key was used with another request, 409 while the
        first still runs, 503 when Redis cannot be reached."""
        if self.redis is None:
            raise ProblemError(
                400, f"{HEADER} needs Redis, and this server has none (CHATTERBOT_REDIS_URL is not set)"
            )
        loop = asyncio.get_running_loop()
        until = loop.time() + (wait_seconds or 0.0)
        delay = POLL_FIRST_SECONDS
        mine = orjson.dumps(
            {"state": "running", "fingerprint": keyed.fingerprint, "owner": secrets.token_hex(8)}
        )
        while True:
            try:
                current = await self.redis.set(keyed.record_key, mine, nx=True, px=self.lease_ms, get=True)
            except _REDIS_FAILURES as exc:
                log.warning("idempotency records unavailable: %s", exc)
                raise ProblemError(
                    503, f"cannot check the {HEADER} right now; retry later", {"Retry-After": "1"}
                ) from None
            # Our own value: a retried SET whose first reply was lost.
            if current is None or current == mine:
                return Claim(self, keyed, mine)
            assert isinstance(current, bytes)  # SET ... GET answers the value it found
            record = orjson.loads(current)
            if record.get("fingerprint") != keyed.fingerprint:
                raise ProblemError(
                    422, f"this {HEADER} was used with another request (body or route); send a new key"
                )
            if record.get("state") == "done":
                return Stored.decode(record)
            if wait_seconds is None or loop.time() + delay > until:
                raise ProblemError(
                    409, f"a request with this {HEADER} is still running; retry later", {"Retry-After": "1"}
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, POLL_MAX_SECONDS)


class Claim:
    """The hold of the request that runs: renewed while it runs, then replaced by its answer or let go."""

    def __init__(self, store: IdempotencyStore, keyed: Keyed, value: bytes) -> None:
        self.store = store
        self.keyed = keyed
        self.value = value
        # Set once a stream carries the claim on: the stream ends it, not the route.
        self.streaming = False
        self._ended = False
        self._renewer = asyncio.ensure_future(self._keep())

    @property
    def request_id(self) -> str:
        return self.keyed.request_id

    async def _keep(self) -> None:
        store = self.store
        assert store.redis is not None
        loop = asyncio.get_running_loop()
        # Bounded, so that a request that never ended its claim cannot hold the key for ever.
        until = loop.time() + store.max_hold_seconds
        while loop.time() < until:
            await asyncio.sleep(store.lease_seconds / 3)
            try:
                if not await store._renew(keys=[self.keyed.record_key], args=[self.value, store.lease_ms]):
                    return  # taken over after a lapse; the request that took it records the answer
            except _REDIS_FAILURES as exc:
                log.warning("could not renew an idempotency hold: %s", exc)

    def _end(self) -> bool:
        if self._ended:
            return False
        self._ended = True
        self._renewer.cancel()
        return True

    async def finish(self, stored: Stored) -> None:
        """Keep `stored` as the answer for the retries."""
        if not self._end():
            return
        try:
            await self.store._finish(
                keys=[self.keyed.record_key],
                args=[self.value, stored.encode(self.keyed.fingerprint), self.store.ttl_ms],
            )
        except _REDIS_FAILURES as exc:
            # The client still gets its answer; a retry runs the turn again, with the same request id.
            log.warning("could not keep an idempotent answer: %s", exc)

    async def release(self) -> None:
        """Let the key go: the next retry runs the request."""
        if not self._end():
            return
        try:
            await self.store._release(keys=[self.keyed.record_key], args=[self.value])
        except _REDIS_FAILURES as exc:
            log.warning("could not release an idempotency hold (it lapses on its own): %s", exc)

    def recorder(
        self,
        is_error: Callable[[Mapping[str, str]], bool],
        text_of: Callable[[str], str | None],
        render: Callable[[str], str],
    ) -> Recorder:
        """What a stream route wraps its events in: they pass as they come and are kept (text merged by
        `merge_text`); the claim ends with the stream."""

        def record(events: Events) -> Events:
            self.streaming = True
            return _RecordedStream(self, events, is_error, lambda kept: merge_text(kept, text_of, render))

        return record


class _RecordedStream:
    """A keyed stream's events. Kept as the answer when `[DONE]` comes after no error event, before the client
    sees it (so a retry right after finds the answer); any other end lets the key go."""

    def __init__(
        self,
        claim: Claim,
        events: Events,
        is_error: Callable[[Mapping[str, str]], bool],
        merge: Callable[[list[KeptEvent]], list[KeptEvent]],
    ) -> None:
        self._claim = claim
        self._events = events
        self._is_error = is_error
        self._merge = merge
        self._kept: list[KeptEvent] = []
        self._failed = False

    def __aiter__(self) -> _RecordedStream:
        return self

    async def __anext__(self) -> Event:
        try:
            item = await anext(self._events)
        except BaseException:  # the end (StopAsyncIteration) included
            await self._claim.release()
            raise
        for one in _events_of(item):
            data = one.get("data", "")
            self._failed = self._failed or self._is_error(one)
            self._kept.append((one.get("event"), data))
            if data == DONE and not self._failed:
                await self._claim.finish(Stored(200, events=tuple(self._merge(self._kept))))
        return item

    async def aclose(self) -> None:
        try:
            await close_iterator(self._events)
        finally:
            await self._claim.release()


def _events_of(item: Event) -> tuple[Mapping[str, str], ...]:
    if item is None:
        return ()
    if isinstance(item, Burst):
        return item.events
    return (item,)


def _problem(exc: ProblemError) -> Response:
    return problem_response(exc.status, exc.detail, exc.headers)


async def run_once(
    request: Request,
    keyed: Keyed,
    run: Callable[[Claim], Awaitable[Response]],
    *,
    wait_seconds: float | None,
    replay: Callable[[Stored], Response] = Stored.response,
    problem: Callable[[ProblemError], Response] = _problem,
) -> Response:
    """Answer a keyed request: the first answer again (`replay`), or `run` it holding the key and keep its
    answer. `wait_seconds`: how long a retry waits for a first request still running (None: 409 at once).
    `problem` renders the route's 4xx answers, which are kept like any other."""
    store: IdempotencyStore = request.app.state.idempotency
    if wait_seconds is None:
        outcome = await store.claim(keyed, None)
    else:
        outcome = await unless_disconnected(request, store.claim(keyed, wait_seconds))
    if isinstance(outcome, Stored):
        replayed = replay(outcome)
        replayed.headers[REPLAYED_HEADER] = "true"
        return replayed
    claim = outcome
    try:
        response = await run(claim)
    except ProblemError as exc:
        if exc.status >= 500 or exc.status in _NOT_KEPT:
            await claim.release()
            raise
        answer = problem(exc)
        await claim.finish(Stored.of(answer))
        return answer
    except BaseException:
        await claim.release()
        raise
    if claim.streaming:
        return response
    if response.status_code >= 500 or response.status_code in _NOT_KEPT:
        await claim.release()
    else:
        await claim.finish(Stored.of(response))
    return response
