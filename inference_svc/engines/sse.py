"""Reading a server-sent event stream, as the HTML standard's "event stream interpretation" says.

Small and bytes-based, for the upstream client's hot path: lines end at CRLF, LF or CR only (never at
U+2028, U+2029 or U+0085, which JSON carries unescaped inside a chunk's content), a line may arrive split
across reads (even between CR and LF), `:` starts a comment, one space after the colon is dropped, `data`
lines join with LF, and a blank line dispatches the event. Events with no data are not dispatched.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Event:
    data: str
    event: str = "message"
    id: str = ""


class EventDecoder:
    """Feed it the bytes of a stream as they arrive; it returns the events completed so far."""

    def __init__(self) -> None:
        self._pending = b""
        # A read that ended with CR: an LF at the start of the next one belongs to the same line end.
        self._after_cr = False
        self._data: list[str] = []
        self._event = ""
        self._id = ""

    def feed(self, chunk: bytes) -> list[Event]:
        if self._after_cr and chunk[:1] == b"\n":
            chunk = chunk[1:]
        self._after_cr = False
        buffer = self._pending + chunk
        events: list[Event] = []
        start = 0
        size = len(buffer)
        while start < size:
            lf = buffer.find(b"\n", start)
            cr = buffer.find(b"\r", start, lf if lf >= 0 else size)
            if cr >= 0:
                end, after = cr, cr + 1
                if after < size and buffer[after] == 0x0A:
                    after += 1
                elif after == size:
                    self._after_cr = True
            elif lf >= 0:
                end, after = lf, lf + 1
            else:
                break
            event = self._line(buffer[start:end].decode("utf-8", "replace"))
            if event is not None:
                events.append(event)
            start = after
        self._pending = buffer[start:]
        return events

    def _line(self, line: str) -> Event | None:
        if not line:
            return self._dispatch()
        if line[0] == ":":
            return None
        name, colon, value = line.partition(":")
        if colon and value[:1] == " ":
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        # `retry` and unknown fields change nothing a reader of this stream uses.
        return None

    def _dispatch(self) -> Event | None:
        data, self._data = self._data, []
        event, self._event = self._event, ""
        if not data:
            return None
        return Event("\n".join(data), event or "message", self._id)
