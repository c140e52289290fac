"""The openai engine's HTTP/1.1 client against a server that writes exact bytes (RFC 9112's framing rules)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from inference_svc.engines.http1 import ConnectFailed, Disconnected, Http1Client, ReadTimeout

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "Server"], Awaitable[None]]


class Server:
    """A TCP server on 127.0.0.1 whose handler reads requests and writes raw responses."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Server:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            with contextlib.suppress(ConnectionError):
                await self.handler(reader, writer, self)
            writer.close()

        self._server = await asyncio.start_server(serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def read_request(self, reader: asyncio.StreamReader) -> bytes | None:
        """One request (head and Content-Length body); None when the client closed the connection."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        request = head + await reader.readexactly(length)
        self.requests.append(request)
        return request


def fixed(body: bytes, extra: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n"
        % (
            len(body),
            extra,
        )
        + body
    )


async def answer_each(reply: bytes) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        while await server.read_request(reader) is not None:
            writer.write(reply)
            await writer.drain()

    return handler


@contextlib.asynccontextmanager
async def client_for(server: Server, **kwargs: float) -> AsyncIterator[Http1Client]:
    client = Http1Client(server.url, headers={"Authorization": "Bearer k"}, **kwargs)
    try:
        yield client
    finally:
        await client.close()


async def test_a_request_is_written_with_its_headers_and_length() -> None:
    async with Server(await answer_each(fixed(b"{}"))) as server, client_for(server) as client:
        r = await client.request("POST", "/chat/completions", b'{"a":1}', {"X-Request-Id": "r1"})
        assert (r.status, await r.read()) == (200, b"{}")
        r.release()
    head, _, body = server.requests[0].partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /v1/chat/completions HTTP/1.1"
    assert {b"Host: 127.0.0.1:%d" % server.port, b"Authorization: Bearer k", b"X-Request-Id: r1"} <= set(
        lines
    )
    assert b"Content-Length: 7" in lines and b"Accept-Encoding: identity" in lines
    assert body == b'{"a":1}'


async def test_kept_alive_connections_carry_the_next_requests() -> None:
    async with Server(await answer_each(fixed(b"{}"))) as server, client_for(server) as client:
        for _ in range(5):
            async with await client.request("POST", "/x", b"{}") as r:
                await r.read()
    assert server.connections == 1 and len(server.requests) == 5


async def test_a_chunked_body_arrives_piece_by_piece_and_ends_at_the_last_chunk() -> None:
    gate = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        while await server.read_request(reader) is not None:
            writer.write(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/event-stream\r\n\r\n"
            )
            writer.write(b"5\r\nhello\r\n")
            await writer.drain()
            await gate.wait()
            writer.write(b"6\r\n world\r\n0\r\n\r\n")
            await writer.drain()

    async with Server(handler) as server, client_for(server) as client:
        for _ in range(2):
            gate.clear()
            async with await client.request("POST", "/x", b"{}") as r:
                assert r.content_type == "text/event-stream"
                pieces = aiter(r)
                assert await anext(pieces) == b"hello"  # before the rest is even written
                gate.set()
                assert b"".join([p async for p in pieces]) == b" world"
    assert server.connections == 1


async def test_chunks_that_arrived_together_are_read_as_one_piece() -> None:
    """A reader that fell behind gets everything that has arrived, in order, in one step."""
    written = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        await writer.drain()
        writer.write(b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (b"one", b" two", b" three")))
        await writer.drain()
        written.set()
        await asyncio.sleep(0.05)
        writer.write(b"5\r\n four\r\n0\r\n\r\n")
        await writer.drain()

    async with (
        Server(handler) as server,
        client_for(server) as client,
        await client.request("POST", "/x", b"{}") as r,
    ):
        await written.wait()
        await asyncio.sleep(0.02)  # the three chunks are in; the reader comes late
        assert [p async for p in r] == [b"one two three", b" four"]


async def test_a_body_delimited_by_close_ends_with_the_connection() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
        await writer.drain()

    async with Server(handler) as server, client_for(server) as client:
        for _ in range(2):
            async with await client.request("GET", "/models") as r:
                assert await r.read() == b"all of it"
    assert server.connections == 2


async def test_a_response_that_says_close_does_not_give_its_connection_back() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        # Says "close" but keeps the connection open (and would answer on it): the client must not reuse it.
        while await server.read_request(reader) is not None:
            writer.write(fixed(b"{}", b"Connection: close\r\n"))
            await writer.drain()

    async with Server(handler) as server, client_for(server) as client:
        for _ in range(2):
            async with await client.request("POST", "/x", b"{}") as r:
                assert await r.read() == b"{}"
    assert server.connections == 2


async def test_an_idle_connection_the_upstream_closed_is_not_reused() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await server.read_request(reader)
        writer.write(fixed(b"{}"))
        await writer.drain()  # then closes: an upstream's idle timeout, right away

    async with Server(handler) as server, client_for(server) as client:
        for _ in range(3):
            async with await client.request("POST", "/x", b"{}") as r:
                assert await r.read() == b"{}"
            await asyncio.sleep(0.05)
    assert server.connections == 3


async def test_a_reused_connection_closed_before_any_answer_is_retried_once_on_a_new_one() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        first = server.connections == 1
        await server.read_request(reader)
        writer.write(fixed(b"{}"))
        await writer.drain()
        if first:
            # Reads the next request and closes without a byte: the race with an idle timeout.
            await server.read_request(reader)
            return
        while await server.read_request(reader) is not None:
            writer.write(fixed(b"{}"))
            await writer.drain()

    async with Server(handler) as server, client_for(server) as client:
        for _ in range(2):
            async with await client.request("POST", "/x", b"{}") as r:
                assert await r.read() == b"{}"
    assert server.connections == 2


async def test_a_connection_closed_mid_body_is_a_disconnect() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
        await writer.drain()

    async with Server(handler) as server, client_for(server) as client:
        r = await client.request("POST", "/x", b"{}")
        with pytest.raises(Disconnected):
            await r.read()
        r.release()
    assert not client._idle


async def test_a_malformed_response_is_a_disconnect() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await server.read_request(reader)
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(1)

    async with Server(handler) as server, client_for(server) as client:
        with pytest.raises(Disconnected, match="malformed"):
            await client.request("POST", "/x", b"{}")


async def test_silence_past_the_read_timeout_is_a_read_timeout() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await writer.drain()
        await asyncio.sleep(5)

    async with Server(handler) as server, client_for(server, read_timeout=0.2) as client:
        r = await client.request("POST", "/x", b"{}")
        pieces = aiter(r)
        assert await anext(pieces) == b"abc"
        with pytest.raises(ReadTimeout):
            await anext(pieces)
        r.release()


async def test_a_refused_connection_is_a_connect_failure() -> None:
    async with Server(await answer_each(fixed(b"{}"))) as server:
        url = server.url
    client = Http1Client(url)
    with pytest.raises(ConnectFailed):
        await client.request("GET", "/models")


async def test_closing_a_response_fails_a_waiting_read_at_once_and_drops_the_connection() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        await writer.drain()
        assert await reader.read() == b""  # the client went away
        server.requests.append(b"closed")

    async with Server(handler) as server, client_for(server) as client:
        r = await client.request("POST", "/x", b"{}")
        reading = asyncio.ensure_future(r.read())
        await asyncio.sleep(0.05)
        r.close()
        with pytest.raises(Disconnected):
            await asyncio.wait_for(reading, 1)
        r.release()
        for _ in range(50):
            if server.requests[-1] == b"closed":
                break
            await asyncio.sleep(0.02)
        assert server.requests[-1] == b"closed"


async def test_a_large_body_is_read_whole_through_flow_control() -> None:
    body = bytes(range(256)) * 8192  # 2 MiB: past the high-water mark many times over
    async with Server(await answer_each(fixed(body))) as server, client_for(server) as client:
        async with await client.request("GET", "/big") as r:
            received = bytearray()
            async for piece in r:
                received += piece
                await asyncio.sleep(0)  # a slow reader
        assert bytes(received) == body
        async with await client.request("GET", "/big") as r:
            assert await r.read() == body
    assert server.connections == 1
