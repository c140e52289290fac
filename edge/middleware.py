"""ASGI middleware of the edge: a cap on requests in flight, a body size limit, request and stream metrics."""

from __future__ import annotations

import time

import prometheus_client
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatterbot.labelled import series
from edge.protocol import Problem

# Cheap probes and scrapes are never shed or counted against the cap.
EXEMPT_PATHS = frozenset({"/livez", "/readyz", "/health", "/metrics"})

REQUESTS = prometheus_client.Counter(
    "chatterbot_edge_requests_total",
    "HTTP requests by route, method and status",
    ["route", "method", "status"],
)
LATENCY = prometheus_client.Histogram(
    "chatterbot_edge_request_seconds",
    "Time to the end of the response (a whole stream for streaming routes)",
    ["route", "method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
_requests, _latency = series(REQUESTS), series(LATENCY)
IN_FLIGHT = prometheus_client.Gauge("chatterbot_edge_in_flight", "Requests being served, streams included")
SHED = prometheus_client.Counter(
    "chatterbot_edge_shed_total", "Requests refused because too many were in flight"
)


# Where EdgeGuard leaves a request's arrival time (perf_counter) in its ASGI scope.
ARRIVED_KEY = "chatterbot.arrived"


# RFC 9110's names (Python's HTTPStatus still calls 413 "Request Entity Too Large").
_TITLES = {413: "Content Too Large", 503: "Service Unavailable"}


async def _problem(send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]]) -> None:
    body = Problem(title=_TITLES[status], status=status, detail=detail).model_dump_json().encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/problem+json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class EdgeGuard:
    """Sheds past `max_in_flight` (503 + Retry-After), refuses bodies over `max_body_bytes` (413), and
    records each request's route, status and duration."""

    def __init__(self, app: ASGIApp, max_in_flight: int, max_body_bytes: int) -> None:
        self.app = app
        self.max_in_flight = max_in_flight
        self.max_body_bytes = max_body_bytes
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if path in EXEMPT_PATHS:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_in_flight:
            SHED.inc()
            await _problem(send, 503, "too many requests in flight; retry later", [(b"retry-after", b"1")])
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await _problem(send, 413, f"the body may be at most {self.max_body_bytes} bytes", [])
            return
        self.in_flight += 1
        IN_FLIGHT.inc()
        started = time.perf_counter()
        scope[ARRIVED_KEY] = started
        status = 500
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLarge()
            return message

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, limited_receive, recording_send)
        except BodyTooLarge:
            status = 413
            await _problem(send, 413, f"the body may be at most {self.max_body_bytes} bytes", [])
        finally:
            self.in_flight -= 1
            IN_FLIGHT.dec()
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            _requests(template, scope["method"], str(status)).inc()
            _latency(template, scope["method"]).observe(time.perf_counter() - started)


class BodyTooLarge(Exception):
    """A chunked body grew past the limit while it was being read."""


STREAM_TTFT = prometheus_client.Histogram(
    "chatterbot_edge_time_to_first_token_seconds",
    "From a streaming request's arrival to its first token event",
    ["route"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
TOKENS_STREAMED = prometheus_client.Counter(
    "chatterbot_edge_stream_events_total", "Token events sent to streaming clients", ["route"]
)


class StreamMeter:
    """STREAM_TTFT and TOKENS_STREAMED of one stream, at the cost of one observation at its first token event
    and one addition when it ends (not a locked increment per token)."""

    __slots__ = ("_arrived", "_route", "tokens")

    def __init__(self, request: Request, route: str) -> None:
        self._route = route
        self._arrived: float = request.scope.get(ARRIVED_KEY) or time.perf_counter()
        self.tokens = 0

    def token(self) -> None:
        """A token event is about to be sent."""
        if not self.tokens:
            STREAM_TTFT.labels(self._route).observe(time.perf_counter() - self._arrived)
        self.tokens += 1

    def close(self) -> None:
        """The stream ended (however it ended)."""
        if self.tokens:
            TOKENS_STREAMED.labels(self._route).inc(self.tokens)
            self.tokens = 0
