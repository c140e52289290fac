"""Server-sent events, lean enough for one edge process to hold ten thousand streams.

`EventStreamResponse` sends the events of an async iterator: a dict (`data`, optional `id` and `event`) is one
event, `None` a keep-alive comment, a `Burst` events that are ready together, written in one piece (a `last`
one ends the response with the same write). Per stream it costs the response's own task plus one that waits
for the client to hang up (then the iterator is closed at once: a gRPC stream behind it is cancelled, and with
it the generation). Keep-alives: with `ping_seconds`, a timer task of the response's own writes one whenever the
stream has been quiet that long, while the events pass from their iterator to the socket in the response's
task with no hand-over between tasks; the queued-stream fan-out (chatterbot.events) sends them itself to all
of its watchers from one timer, so an idle stream costs no timer of its own; it also ends them all when the
edge drains, so their clients resume on another replica with Last-Event-ID.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from edge.disconnects import ClientDisconnected, until_disconnected

_SEP = "\r\n"
PING = b": ping\r\n\r\n"
_HEADERS = {
    "Cache-Control": "no-store",
    "Connection": "keep-alive",
    "X-Accel-Buffering": "no",  # nginx: pass each event on at once
}


# The spec's line ends, and only those: str.splitlines() would also break at U+2028, U+2029, U+0085 and
# \x0b \x0c \x1c-\x1e, which JSON leaves raw inside strings, and so split one JSON body over two data lines.
_LINE_END = re.compile(r"\r\n|\r|\n")


def encode(event: Mapping[str, str]) -> bytes:
    """One event in the text/event-stream format; `data` with line ends becomes one `data:` line per line."""
    lines = []
    if "id" in event:
        lines.append(f"id: {event['id']}")
    if "event" in event:
        lines.append(f"event: {event['event']}")
    data = str(event.get("data", ""))
    if "\n" in data or "\r" in data:
        lines.extend(f"data: {line}" for line in _LINE_END.split(data))
    else:
        lines.append(f"data: {data}")  # JSON bodies: never a raw line end
    return (_SEP.join(lines) + _SEP + _SEP).encode()


@dataclass(frozen=True, slots=True)
class Burst:
    """Events ready at the same moment (an answer's first piece behind its role chunk, the finish behind the
    last piece): one body write, and one socket write, for all of them. `last`: they end the stream; the
    response writes its end with them and asks the iterator for nothing more."""

    events: tuple[Mapping[str, str], ...]
    last: bool = False


# What a stream's iterator yields: an event, a keep-alive (None), or a burst of events.
StreamItem: TypeAlias = Mapping[str, str] | Burst | None


async def close_iterator(source: AsyncIterator[Any]) -> None:
    """Close `source` if it can be closed (an async generator, a guarded gRPC stream): its resources go now."""
    aclose = getattr(source, "aclose", None)
    if aclose is not None:
        await aclose()


class EventStreamResponse(Response):
    """A `text/event-stream` response of `events` (dicts are events, None keep-alives, `Burst`s events
    written together)."""

    media_type = "text/event-stream"

    def __init__(
        self,
        events: AsyncIterator[StreamItem],
        *,
        headers: Mapping[str, str] | None = None,
        ping_seconds: float | None = None,
    ) -> None:
        """`ping_seconds`: a keep-alive whenever that long passes without an event (None: only the events')."""
        self.events = events
        self.ping_seconds = ping_seconds
        self.status_code = 200
        self.background = None
        self.init_headers({**_HEADERS, **(headers or {})})
        self._last_write = 0.0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send(
                {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
            )
            await until_disconnected(receive, self._pump(send))
        except ClientDisconnected:
            pass  # nobody to tell; the events' source is closed below
        finally:
            await close_iterator(self.events)

    async def _pump(self, send: Send) -> None:
        loop = asyncio.get_running_loop()
        self._last_write = loop.time()
        pinger = asyncio.ensure_future(self._pings(send)) if self.ping_seconds else None
        body = b""
        try:
            async for item in self.events:
                if item is None:
                    body = PING
                elif isinstance(item, Burst):
                    body = b"".join([encode(event) for event in item.events])
                    if item.last:
                        break
                else:
                    body = encode(item)
                self._last_write = loop.time()
                await send({"type": "http.response.body", "body": body, "more_body": True})
                body = b""
        finally:
            if pinger is not None:
                pinger.cancel()
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _pings(self, send: Send) -> None:
        # ASGI servers write a message before send() first waits, so a ping never lands inside an event.
        assert self.ping_seconds is not None
        loop = asyncio.get_running_loop()
        while True:
            quiet = loop.time() - self._last_write
            if quiet < self.ping_seconds:
                await asyncio.sleep(self.ping_seconds - quiet)
                continue
            self._last_write = loop.time()
            await send({"type": "http.response.body", "body": PING, "more_body": True})
