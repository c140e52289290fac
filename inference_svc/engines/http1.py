"""A small keep-alive HTTP/1.1 client for one upstream origin, on asyncio protocols and httptools' parser.

The `openai` engine sends every turn through it, so it is on the request path: per request it writes the
request in one `write`, hands body bytes over as llhttp parses them (Content-Length, chunked, or until close),
and puts a connection whose response was read to its end back in a LIFO pool for the next request. General
clients (aiohttp, httpx) spend several times more CPU per request on features an upstream call does not
use: cookies, redirects, proxies, content decoding (this client asks for identity encoding), multipart.

Failures are three exceptions: `ConnectFailed` (nothing was sent: safe to retry elsewhere), `ReadTimeout` (no
data within `read_timeout`), `Disconnected` (the connection ended or broke mid-response). A request on a
reused connection that the upstream closed before answering any byte (it timed out an idle keep-alive
connection as the request went out) is sent once more on a new connection, as browsers and Go's client do.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from types import TracebackType
from urllib.parse import urlsplit

import httptools

# Bytes parsed but not yet taken by the reader, past which the socket stops being read.
HIGH_WATER = 256 * 1024


class HttpError(Exception):
    """A request that got no complete response."""


class ConnectFailed(HttpError):
    """No connection to the upstream (refused, unresolvable, or not made within the connect timeout)."""


class ReadTimeout(HttpError, TimeoutError):
    """The upstream sent nothing for `read_timeout` seconds."""


class Disconnected(HttpError):
    """The connection closed, or broke the protocol, before the response ended."""


class _Connection(asyncio.Protocol):
    """One connection and the response being read on it (one request at a time)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.error: HttpError | None = None
        self.idle_since = 0.0
        self.reused = False
        self._parser: httptools.HttpResponseParser | None = None
        self._status = 0
        self._headers: dict[str, str] = {}
        self._headers_done = False
        self._keep_alive = False
        self._pieces: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._complete = False
        self._any_byte = False
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._parser is None:
            self._fail(Disconnected("the upstream sent bytes while no request was open"))
            return
        self._any_byte = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(Disconnected("the upstream switched protocols"))
        except httptools.HttpParserError as exc:
            self._fail(Disconnected(f"malformed response from the upstream: {exc}"))

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        if self._parser is not None and self._headers_done and not self._complete and self._until_close():
            # A body delimited by the end of the connection ends here.
            self._complete = True
            self._wake()
        if self.error is None:
            self.error = Disconnected(
                f"the upstream closed the connection: {exc!r}"
                if exc
                else "the upstream closed the connection"
            )
        self.transport = None
        self._wake()

    def pause_writing(self) -> None:  # requests are small; nothing to pause
        return None

    def resume_writing(self) -> None:
        return None

    # --- httptools callbacks ---

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        self._status = self._parser.get_status_code()
        # Asked now: once the message is complete the parser has moved on to the next one.
        self._keep_alive = self._parser.should_keep_alive()
        self._headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._pieces.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self._complete = True
        self._wake()

    # --- used by the client and the response ---

    @property
    def alive(self) -> bool:
        return self.transport is not None and self.error is None and not self.transport.is_closing()

    def send(self, head: bytes, body: bytes) -> None:
        """Start one request: `head` (request line and headers) and `body` in one write."""
        self._parser = httptools.HttpResponseParser(self)
        self._status, self._headers, self._headers_done, self._keep_alive = 0, {}, False, False
        self._pieces.clear()
        self._buffered, self._complete, self._any_byte = 0, False, False
        assert self.transport is not None
        self.transport.write(head + body)

    async def headers(self, timeout: float) -> tuple[int, dict[str, str]]:
        while not self._headers_done:
            if self.error is not None:
                raise self.error
            await self._wait(timeout)
        return self._status, self._headers

    async def piece(self, timeout: float) -> bytes | None:
        """The body bytes that have arrived since the last call (all of them, in one piece: a reader that fell
        behind catches up in one step); None at the end of the body."""
        while not self._pieces:
            if self._complete:
                return None
            if self.error is not None:
                raise self.error
            await self._wait(timeout)
        piece = b"".join(self._pieces)  # one piece is handed over as it is, not copied
        self._pieces.clear()
        self._buffered = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return piece

    @property
    def answered_nothing(self) -> bool:
        return not self._any_byte

    def reusable(self) -> bool:
        """Whether the response was read to its end and the connection may carry another request."""
        return self._complete and self._keep_alive and self.alive

    def done_with_response(self) -> None:
        self._parser = None

    def close(self) -> None:
        if self.error is None:
            self.error = Disconnected("the connection was closed by its client")
        if self.transport is not None:
            self.transport.abort()
        self._wake()

    def _until_close(self) -> bool:
        return "content-length" not in self._headers and "chunked" not in self._headers.get(
            "transfer-encoding", ""
        )

    def _fail(self, error: HttpError) -> None:
        self.error = error
        if self.transport is not None:
            self.transport.abort()
        self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self, timeout: float) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout):
                await self._waiter
        except TimeoutError:
            raise ReadTimeout(f"the upstream sent nothing for {timeout:g} s") from None


class Response:
    """A response whose status and headers have arrived; its body is read with `read()` or `async for`."""

    def __init__(self, client: Http1Client, connection: _Connection, status: int, headers: dict[str, str]):
        self._client = client
        self._connection: _Connection | None = connection
        self.status = status
        self.headers: Mapping[str, str] = headers

    @property
    def content_type(self) -> str:
        """The media type, without parameters, lower-cased ("" when none)."""
        return self.headers.get("content-type", "").split(";", 1)[0].strip().lower()

    async def read(self) -> bytes:
        return b"".join([piece async for piece in self])

    async def text(self) -> str:
        return (await self.read()).decode("utf-8", errors="replace")

    async def __aiter__(self) -> AsyncIterator[bytes]:
        connection = self._connection
        if connection is None:
            return
        while (piece := await connection.piece(self._client.read_timeout)) is not None:
            yield piece

    def close(self) -> None:
        """Drop the connection now: a read in progress fails at once, and the upstream sees the client go."""
        if self._connection is not None:
            self._connection.close()

    def release(self) -> None:
        """Hand the connection back to the pool if the response was read to its end, else close it."""
        connection, self._connection = self._connection, None
        if connection is not None:
            self._client._release(connection)

    async def __aenter__(self) -> Response:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class Http1Client:
    """Requests to one origin (`base_url`'s scheme, host and port) over pooled keep-alive connections."""

    def __init__(
        self,
        base_url: str,
        *,
        headers: Mapping[str, str] | None = None,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        keepalive_seconds: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.path = parts.path.rstrip("/")
        self.ssl = (ssl_context or ssl.create_default_context()) if parts.scheme == "https" else None
        default_port = self.port == (443 if self.ssl else 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        fixed = {
            "Host": host if default_port else f"{host}:{self.port}",
            "Accept-Encoding": "identity",
            **(headers or {}),
        }
        self._fixed = "".join(f"{name}: {value}\r\n" for name, value in fixed.items()).encode("latin-1")
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.keepalive_seconds = keepalive_seconds
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()
        self._closed = False

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: Mapping[str, str] | None = None
    ) -> Response:
        """Send a request for `path` (below the base URL's path) and wait for its status and headers."""
        head = self._head(method, path, body, headers)
        connection = await self._acquire()
        try:
            connection.send(head, body)
            status, response_headers = await connection.headers(self.read_timeout)
        except Disconnected:
            if not (connection.reused and connection.answered_nothing):
                self._discard(connection)
                raise
            # Closed by the upstream as this request went out: it never read it.
            self._discard(connection)
            connection = await self._connect()
            try:
                connection.send(head, body)
                status, response_headers = await connection.headers(self.read_timeout)
            except BaseException:
                self._discard(connection)
                raise
        except BaseException:
            self._discard(connection)
            raise
        return Response(self, connection, status, response_headers)

    async def close(self) -> None:
        self._closed = True
        for connection in list(self._open):
            connection.close()
        self._idle.clear()
        self._open.clear()

    def _head(self, method: str, path: str, body: bytes, headers: Mapping[str, str] | None) -> bytes:
        lines = [f"{method} {self.path}{path} HTTP/1.1\r\n".encode("latin-1"), self._fixed]
        if headers:
            lines.append("".join(f"{name}: {value}\r\n" for name, value in headers.items()).encode("latin-1"))
        if body or method in ("POST", "PUT", "PATCH"):
            lines.append(b"Content-Length: %d\r\n" % len(body))
        lines.append(b"\r\n")
        return b"".join(lines)

    async def _acquire(self) -> _Connection:
        if self._closed:
            raise ConnectFailed("the client is closed")
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()
            if connection.alive and now - connection.idle_since < self.keepalive_seconds:
                connection.reused = True
                return connection
            self._discard(connection)
        return await self._connect()

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, connection = await loop.create_connection(
                    _Connection,
                    self.host,
                    self.port,
                    ssl=self.ssl,
                    server_hostname=self.host if self.ssl else None,
                )
        except TimeoutError:
            raise ConnectFailed(
                f"no connection to {self.host}:{self.port} in {self.connect_timeout:g} s"
            ) from None
        except OSError as exc:
            raise ConnectFailed(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        self._open.add(connection)
        return connection

    def _release(self, connection: _Connection) -> None:
        if connection.reusable() and not self._closed:
            connection.done_with_response()
            connection.idle_since = time.monotonic()
            self._idle.append(connection)
        else:
            self._discard(connection)

    def _discard(self, connection: _Connection) -> None:
        connection.close()
        self._open.discard(connection)


__all__ = ["ConnectFailed", "Disconnected", "Http1Client", "HttpError", "ReadTimeout", "Response"]
