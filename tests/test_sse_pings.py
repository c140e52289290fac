"""EventStreamResponse over ASGI: keep-alives between a stream's events (ping_seconds=...), and bursts of
events written in one piece."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping

from starlette.types import Message

from edge.sse import PING, Burst, EventStreamResponse, StreamItem, encode

SCOPE = {"type": "http", "method": "GET", "path": "/stream", "headers": []}


async def respond(events: AsyncIterator[Mapping[str, str] | None], ping_seconds: float | None) -> list[bytes]:
    """The body messages the response sends, to a client that stays."""
    sent: list[Message] = []
    stay = asyncio.Event()

    async def receive() -> Message:
        await stay.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    await EventStreamResponse(events, ping_seconds=ping_seconds)(SCOPE, receive, send)
    assert sent[0]["type"] == "http.response.start" and sent[-1] == {
        "type": "http.response.body",
        "body": b"",
        "more_body": False,
    }
    return [m["body"] for m in sent[1:-1]]


async def test_quiet_stretches_get_pings_and_busy_ones_none() -> None:
    async def events() -> AsyncIterator[Mapping[str, str]]:
        for i in range(5):
            yield {"data": str(i)}
        await asyncio.sleep(0.35)
        yield {"data": "late"}

    bodies = await respond(events(), 0.1)
    assert bodies[:5] == [f"data: {i}\r\n\r\n".encode() for i in range(5)]  # no ping between busy events
    assert bodies[-1] == b"data: late\r\n\r\n"
    assert 2 <= len(bodies[5:-1]) <= 4 and set(bodies[5:-1]) == {PING}


async def test_no_ping_seconds_means_only_the_events_own_keep_alives() -> None:
    async def events() -> AsyncIterator[Mapping[str, str] | None]:
        yield None
        await asyncio.sleep(0.2)
        yield {"data": "x"}

    assert await respond(events(), None) == [PING, b"data: x\r\n\r\n"]


async def test_no_ping_follows_the_end_of_the_stream() -> None:
    async def events() -> AsyncIterator[Mapping[str, str]]:
        await asyncio.sleep(0.05)
        yield {"data": "only"}

    bodies = await respond(events(), 0.05)
    assert bodies[-1] == b"data: only\r\n\r\n"
    await asyncio.sleep(0.2)  # a pinger left running would have failed the response or written after its end


async def test_a_client_that_leaves_closes_the_events_and_stops_the_pings() -> None:
    closed = asyncio.Event()
    sent: list[Message] = []

    async def events() -> AsyncIterator[Mapping[str, str]]:
        try:
            yield {"data": "first"}
            await asyncio.sleep(60)
        finally:
            closed.set()

    async def receive() -> Message:
        await asyncio.sleep(0.25)
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    await asyncio.wait_for(EventStreamResponse(events(), ping_seconds=0.1)(SCOPE, receive, send), 5)
    assert closed.is_set()
    count = len(sent)
    await asyncio.sleep(0.3)
    assert len(sent) == count and PING in [m.get("body") for m in sent]


async def body_messages(events: AsyncIterator[StreamItem]) -> list[Message]:
    """Every body message the response sends, the last (`more_body` false) included."""
    sent: list[Message] = []

    async def receive() -> Message:
        await asyncio.Event().wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    await EventStreamResponse(events)(SCOPE, receive, send)
    assert sent[0]["type"] == "http.response.start"
    return sent[1:]


async def test_a_burst_is_one_body_write_of_its_events_in_order() -> None:
    async def events() -> AsyncIterator[StreamItem]:
        yield Burst(({"data": "role"}, {"data": "first", "id": "1"}))
        yield {"data": "second"}

    messages = await body_messages(events())
    assert [m["body"] for m in messages] == [
        encode({"data": "role"}) + encode({"data": "first", "id": "1"}),
        b"data: second\r\n\r\n",
        b"",
    ]
    assert [m["more_body"] for m in messages] == [True, True, False]


async def test_a_last_burst_ends_the_body_in_the_same_write_and_nothing_more_is_asked() -> None:
    asked_after_last = False
    closed = False

    async def events() -> AsyncIterator[StreamItem]:
        nonlocal asked_after_last, closed
        try:
            yield {"data": "piece"}
            yield Burst(({"data": "finish"}, {"data": "[DONE]"}), last=True)
            asked_after_last = True
            yield {"data": "never sent"}
        finally:
            closed = True

    messages = await body_messages(events())
    assert messages == [
        {"type": "http.response.body", "body": b"data: piece\r\n\r\n", "more_body": True},
        {
            "type": "http.response.body",
            "body": b"data: finish\r\n\r\ndata: [DONE]\r\n\r\n",
            "more_body": False,
        },
    ]
    assert not asked_after_last and closed
