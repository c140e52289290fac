"""A well-behaved client under faults: sync chats, polled async chats and resumed streams, each with an
`Idempotency-Key`, retried with the same key (bounded backoff) on 5xx, connection errors and timeouts.

Every request the cluster accepted (a 200 on submit) is recorded with its key, user, and request id (sync:
`X-Request-ID`) or correlation id (queued), and the fault phase it was submitted in, for the reconciliation.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field

import httpx

from tests.chaos.cluster import API_KEY

KINDS = ("chat", "async", "stream")
USERS = [f"chaos-user-{i}" for i in range(12)]
# What a well-behaved client waits for one answer, retries included, before it gives up.
REQUEST_BUDGET_SECONDS = 90.0
# A generation lasts about a second; a stream with nothing but pings for this long has stalled.
STALL_SECONDS = 15.0
RETRYABLE_STATUSES = {408, 409, 425, 429, 500, 502, 503, 504}


@dataclass
class Record:
    """One logical request and what the client saw of it."""

    kind: str
    key: str
    user: str
    message: str
    phase: str
    submitted: float
    accepted: bool = False
    request_id: str = ""
    correlation_id: str = ""
    answered: bool = False
    failed: str = ""  # a failure the client was told of (a `failed` result, an error event, a 4xx)
    gave_up: bool = False
    attempts: int = 0
    server_errors: int = 0  # 5xx answers the client got
    transport_errors: int = 0  # connection errors and timeouts
    restarts: int = 0  # `restart: true` events on a stream
    stalls: int = 0  # streams that went quiet (pings only) and were resumed from the last event id
    events: int = 0  # stream events received
    finished: float = 0.0
    notes: list[str] = field(default_factory=list)


class Backoff:
    """Full-jitter exponential backoff, capped, within one request's budget."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.n = 0

    async def wait(self, retry_after: str | None = None) -> bool:
        """Sleep before the next try; False when the budget is spent."""
        delay = random.uniform(0, min(2.0, 0.2 * 2**self.n))
        if retry_after is not None:
            with contextlib.suppress(ValueError):
                delay = max(delay, min(5.0, float(retry_after)))
        self.n += 1
        if time.monotonic() + delay >= self.deadline:
            return False
        await asyncio.sleep(delay)
        return True


class LoadClient:
    """`concurrency` virtual users in a loop, on an event loop of its own thread, through `base_url`."""

    def __init__(self, base_url: str, concurrency: int, phase: list[str]) -> None:
        self.base_url = base_url
        self.concurrency = concurrency
        self.phase = phase  # phase[0]: the fault under way, read at each submission
        self.records: list[Record] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._n = 0

    def start(self) -> None:
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._main()), name="chaos-load", daemon=True
        )
        self._thread.start()

    def stop(self, drain_timeout: float = REQUEST_BUDGET_SECONDS + 10) -> None:
        """No new requests; wait for those under way to end (answered, failed or given up)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(drain_timeout)

    async def _main(self) -> None:
        limits = httpx.Limits(
            max_connections=self.concurrency * 2, max_keepalive_connections=self.concurrency
        )
        timeout = httpx.Timeout(15.0, connect=3.0)
        async with httpx.AsyncClient(
            base_url=self.base_url, headers={"X-API-Key": API_KEY}, timeout=timeout, limits=limits
        ) as client:
            await asyncio.gather(*(self._user(client, i) for i in range(self.concurrency)))

    async def _user(self, client: httpx.AsyncClient, worker: int) -> None:
        while not self._stop.is_set():
            self._n += 1
            key = uuid.uuid4().hex
            record = Record(
                kind=KINDS[(worker + self._n) % len(KINDS)],
                key=key,
                user=random.choice(USERS),
                message=f"chaos {key}",
                phase=self.phase[0],
                submitted=time.time(),
            )
            self.records.append(record)
            deadline = time.monotonic() + REQUEST_BUDGET_SECONDS
            try:
                if record.kind == "chat":
                    await self._chat(client, record, deadline)
                else:
                    await self._queued(client, record, deadline)
            except Exception as exc:  # a client bug must show in the report, not stop the load
                record.notes.append(f"client error: {exc!r}")
                record.gave_up = True
            record.finished = time.time()
            await asyncio.sleep(random.uniform(0.05, 0.3))

    async def _post(
        self, client: httpx.AsyncClient, record: Record, path: str, deadline: float
    ) -> httpx.Response | None:
        """POST with the record's key until a non-retryable answer; None when the budget is spent."""
        body = {"message": record.message, "user_id": record.user}
        backoff = Backoff(deadline)
        while True:
            record.attempts += 1
            retry_after = None
            try:
                response = await client.post(path, json=body, headers={"Idempotency-Key": record.key})
            except httpx.TransportError as exc:
                record.transport_errors += 1
                record.notes.append(f"{path}: {type(exc).__name__}")
            else:
                if response.status_code >= 500:
                    record.server_errors += 1
                    record.notes.append(f"{path}: {response.status_code} {response.text[:120]}")
                if response.status_code not in RETRYABLE_STATUSES:
                    return response
                retry_after = response.headers.get("retry-after")
            if not await backoff.wait(retry_after):
                record.gave_up = True
                return None

    async def _chat(self, client: httpx.AsyncClient, record: Record, deadline: float) -> None:
        response = await self._post(client, record, "/chat", deadline)
        if response is None:
            return
        if response.status_code == 200:
            record.accepted = record.answered = True
            record.request_id = response.headers.get("x-request-id", "")
        else:
            record.failed = f"{response.status_code} {response.text[:200]}"

    async def _queued(self, client: httpx.AsyncClient, record: Record, deadline: float) -> None:
        path = "/async-chat" if record.kind == "async" else "/stream-chat"
        response = await self._post(client, record, path, deadline)
        if response is None:
            return
        if response.status_code != 200:
            record.failed = f"{response.status_code} {response.text[:200]}"
            return
        record.accepted = True
        record.correlation_id = response.json()["correlation_id"]
        if record.kind == "async":
            await self._poll(client, record, deadline)
        else:
            await self._stream(client, record, deadline)

    async def _poll(self, client: httpx.AsyncClient, record: Record, deadline: float) -> None:
        while time.monotonic() < deadline:
            await asyncio.sleep(0.3)
            try:
                response = await client.get(f"/check-response/{record.correlation_id}")
            except httpx.TransportError as exc:
                record.transport_errors += 1
                record.notes.append(f"poll: {type(exc).__name__}")
                continue
            if response.status_code >= 500:
                record.server_errors += 1
                record.notes.append(f"poll: {response.status_code}")
                continue
            if response.status_code != 200:
                record.notes.append(f"poll: {response.status_code} {response.text[:120]}")
                continue
            body = response.json()
            if "response" in body:
                record.answered = True
                return
            if body.get("status") == "failed":
                record.failed = f"failed: {body.get('error', '')}"
                return
        record.gave_up = True

    async def _stream(self, client: httpx.AsyncClient, record: Record, deadline: float) -> None:
        """Read `/stream/{id}` to `[DONE]`, resuming after the last event id on any break."""
        last_id = ""
        backoff = Backoff(deadline)
        while True:
            headers = {"Last-Event-ID": last_id} if last_id else {}
            try:
                async with client.stream(
                    "GET",
                    f"/stream/{record.correlation_id}",
                    headers=headers,
                    timeout=httpx.Timeout(20.0, connect=3.0),
                ) as response:
                    if response.status_code >= 500:
                        record.server_errors += 1
                        record.notes.append(f"stream: {response.status_code}")
                    elif response.status_code != 200:
                        record.notes.append(f"stream: {response.status_code}")
                    else:
                        event = ""
                        # Keep-alive pings hold a stalled stream open forever: a client that sees no
                        # event for a while reconnects from its last event id.
                        async with asyncio.timeout(STALL_SECONDS) as stall:
                            async for line in response.aiter_lines():
                                if line.startswith(("id:", "data:")):
                                    stall.reschedule(asyncio.get_running_loop().time() + STALL_SECONDS)
                                if line.startswith("id:"):
                                    last_id = line[3:].strip()
                                elif line.startswith("event:"):
                                    event = line[6:].strip()
                                elif line.startswith("data:"):
                                    data = line[5:].strip()
                                    record.events += 1
                                    if data == "[DONE]":
                                        record.answered = True
                                        return
                                    if event == "error":
                                        record.failed = f"error event: {data[:200]}"
                                        return
                                    if json.loads(data).get("restart"):
                                        record.restarts += 1
                                elif not line:
                                    event = ""
                        record.notes.append("stream: ended before [DONE]")
            except TimeoutError:
                record.stalls += 1
                record.notes.append(f"stream: no event for {STALL_SECONDS:g} s after event {last_id or 0}")
            except httpx.TransportError as exc:
                record.transport_errors += 1
                record.notes.append(f"stream: {type(exc).__name__}")
            if not await backoff.wait():
                record.gave_up = True
                return

    def snapshot(self) -> list[dict]:
        return [asdict(r) for r in self.records]
