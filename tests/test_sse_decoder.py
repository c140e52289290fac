"""inference_svc.engines.sse against the HTML standard's event stream rules, and against httpx-sse's decoder
on the same bytes fed in every possible split."""

from __future__ import annotations

import httpx_sse
import pytest
from httpx_sse._decoders import SSEDecoder, SSELineDecoder

from inference_svc.engines.sse import Event, EventDecoder


def reference(stream: bytes) -> list[tuple[str, str, str]]:
    """(event, data, id) of each event httpx-sse dispatches."""
    lines, decoder, events = SSELineDecoder(), SSEDecoder(), []
    for line in [*lines.decode(stream.decode()), *lines.flush()]:
        event: httpx_sse.ServerSentEvent | None = decoder.decode(line.rstrip("\n"))
        if event is not None and event.data:
            events.append((event.event, event.data, event.id))
    return events


def decoded(*chunks: bytes) -> list[tuple[str, str, str]]:
    decoder = EventDecoder()
    return [(e.event, e.data, e.id) for chunk in chunks for e in decoder.feed(chunk)]


STREAMS = {
    "lf": b'data: {"a":1}\n\ndata: two\n\n',
    "crlf": b"data: one\r\n\r\ndata: two\r\n\r\n",
    "cr": b"data: one\r\rdata: two\r\r",
    "mixed": b"data: one\r\n\ndata: two\r\r\ndata: three\n\r\n",
    "multiline": b"data: first\ndata: second\ndata\ndata:\n\n",
    "fields": b"event: update\nid: 42\nretry: 1000\ndata: x\n\nevent: other\ndata: y\n\n",
    "comments": b": keep-alive\n\n:\ndata: after comment\n: inside\n\n",
    "no-space": b"data:tight\n\ndata:  two spaces\n\n",
    "unicode": "data: caf\u00e9 \u2028 line \u2029 para \u0085 nel \U0001f600\n\n".encode(),
    "no-data": b"event: ping\n\nid: 3\n\ndata: real\n\n",
    "unknown-field": b"foo: bar\ndata: kept\n\n",
    "unterminated": b"data: done\n\ndata: never dispatched",
}


@pytest.mark.parametrize("name", STREAMS)
def test_whole_streams_decode_as_the_reference_does(name: str) -> None:
    assert decoded(STREAMS[name]) == reference(STREAMS[name])


@pytest.mark.parametrize("name", STREAMS)
def test_every_split_into_two_reads_decodes_the_same(name: str) -> None:
    stream = STREAMS[name]
    whole = decoded(stream)
    for cut in range(1, len(stream)):
        assert decoded(stream[:cut], stream[cut:]) == whole, cut


def test_byte_by_byte_reads_decode_the_same() -> None:
    stream = b"".join(STREAMS.values())
    assert decoded(*(stream[i : i + 1] for i in range(len(stream)))) == decoded(stream)


def test_the_spec_examples() -> None:
    # "data: YHOO\ndata: +2\ndata: 10" is one event whose data holds two line feeds.
    assert decoded(b"data: YHOO\ndata: +2\ndata: 10\n\n") == [("message", "YHOO\n+2\n10", "")]
    # The spec's second example: the first block fires an event with empty data, the middle one with a single
    # line feed, and the last is never dispatched (no blank line follows it).
    assert decoded(b"data\n\ndata\ndata\n\ndata:\n") == [("message", "", ""), ("message", "\n", "")]
    # One leading space is dropped, not two.
    assert decoded(b"data:test\n\ndata: test\n\n") == [("message", "test", "")] * 2


def test_an_id_with_nul_is_ignored_and_the_last_id_is_kept() -> None:
    assert decoded(b"id: 1\ndata: a\n\nid: 2\x00x\ndata: b\n\n") == [
        ("message", "a", "1"),
        ("message", "b", "1"),
    ]


def test_events_are_plain_values() -> None:
    assert EventDecoder().feed(b"event: e\ndata: d\nid: i\n\n") == [Event("d", "e", "i")]
