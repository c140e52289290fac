"""The guarded client every caller in the mesh uses to reach another service.

One `GuardedClient` per target service per process owns one long-lived channel (mutual TLS when
CHATTERBOT_GRPC_TLS_* are set, keepalive pings, calls spread round-robin over every address of the target's
name) and puts every call behind a deadline, a circuit breaker and a retry policy that only retries what is
safe:

- Retried: UNAVAILABLE before any response arrived (the request never reached a handler that answered),
  with full-jitter exponential backoff, within the call's deadline. A stream is never retried once it
  yielded a message, and each attempt goes through the breaker, so an opening breaker ends the retries.
- Counted against the target's breaker: UNAVAILABLE, DEADLINE_EXCEEDED, UNKNOWN, INTERNAL, DATA_LOSS.
  Business codes (INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED, CANCELLED, ...) are not.
- UNAVAILABLE that carries the trailing metadata key `cb-dependency` means the target is healthy but one
  of *its* dependencies is not: it is neither counted nor retried, and reaches the caller unchanged.
- An open breaker raises `CircuitOpenError` (target, retry_after) without touching the network; servers
  turn it into UNAVAILABLE with `dependency_unavailable_metadata(...)`, the edge into 503 + Retry-After.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Generic, TypeVar

import grpc
from prometheus_client import Counter, Histogram
from tenacity import (
    AsyncRetrying,
    before_sleep_log,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    wait_random_exponential,
)

from chatterbot import local, tls
from chatterbot.breaker import AsyncCircuitBreaker, CircuitOpenError
from chatterbot.labelled import series
from chatterbot.settings import Settings
from chatterbot.tracing import client_tracing_interceptors

logger = logging.getLogger(__name__)

StubT = TypeVar("StubT")
RequestT = TypeVar("RequestT")
ResponseT = TypeVar("ResponseT")
Metadata = Sequence[tuple[str, str | bytes]]

DEPENDENCY_KEY = "cb-dependency"
RETRY_AFTER_KEY = "retry-after"
# Set on the AioRpcError a guarded call raises, so a server passing it on can name the failing dependency.
_TARGET_ATTRIBUTE = "chatterbot_target"

FAILURE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.DATA_LOSS,
    }
)

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# gRPC's own default, and how long a client waits between re-resolutions of a name when its connections go
# away more often (a DNS server is not asked again for every GOAWAY of a busy mesh).
DNS_MIN_RESOLUTION_INTERVAL_MS = 30_000


def keepalive_ms(settings: Settings) -> int:
    """How often a client pings an idle connection (CHATTERBOT_GRPC_KEEPALIVE_SECONDS)."""
    return int(settings.grpc_keepalive_seconds * 1000)


def server_keepalive_options(settings: Settings) -> list[tuple[str, int]]:
    """What a server must allow so that clients' keepalive pings (idle channels included) are never answered
    with GOAWAY "too_many_pings" (gRPC servers by default refuse pings without calls more often than every 5
    minutes): pings without calls, as often as every third of the keepalive, so clients configured with a
    keepalive down to a third of this server's are served too."""
    return [
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", keepalive_ms(settings) // 3),
    ]


CLIENT_LATENCY = Histogram(
    "chatterbot_client_latency_seconds",
    "Duration of one attempt of an outbound call (a whole stream for streaming calls)",
    ["target", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
CLIENT_CALLS = Counter(
    "chatterbot_client_calls_total",
    "Outbound call attempts by final status code; CIRCUIT_OPEN when the breaker refused the attempt",
    ["target", "method", "code"],
)
_latency, _calls = series(CLIENT_LATENCY), series(CLIENT_CALLS)


def dependency_unavailable_metadata(dependency: str, retry_after: float) -> tuple[tuple[str, str], ...]:
    """Trailing metadata for an UNAVAILABLE that blames `dependency`, not the server that returns it."""
    return ((DEPENDENCY_KEY, dependency), (RETRY_AFTER_KEY, f"{max(0.0, retry_after):.3f}"))


def _trailer(exc: grpc.aio.AioRpcError, key: str) -> str | None:
    for name, value in exc.trailing_metadata() or ():
        if name == key:
            return value.decode() if isinstance(value, bytes) else value
    return None


def dependency_of(exc: BaseException) -> str | None:
    """The failing dependency named by an UNAVAILABLE error's `cb-dependency` trailer, if any."""
    if isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.UNAVAILABLE:
        return _trailer(exc, DEPENDENCY_KEY)
    return None


def retry_after_of(exc: BaseException) -> float | None:
    """Seconds the caller should wait, from a CircuitOpenError or an AioRpcError's `retry-after` trailer."""
    if isinstance(exc, CircuitOpenError):
        return exc.retry_after
    if isinstance(exc, grpc.aio.AioRpcError):
        value = _trailer(exc, RETRY_AFTER_KEY)
        if value is not None:
            try:
                return max(0.0, float(value))
            except ValueError:
                return None
    return None


def target_of(exc: BaseException) -> str | None:
    """The target a guarded client's failed call went to, if `exc` came from one."""
    target = getattr(exc, _TARGET_ATTRIBUTE, None)
    return target if isinstance(target, str) else None


def method_name(rpc: object) -> str:
    """The method name of a stub's multicallable (`Chat` for `/chatterbot.v1.ChatService/Chat`)."""
    path = getattr(rpc, "_method", b"")
    return (path.decode() if isinstance(path, bytes) else str(path)).rpartition("/")[2] or "unknown"


def is_target_failure(exc: BaseException) -> bool:
    """Whether `exc` says the target itself is failing (what the breaker counts)."""
    return (
        isinstance(exc, grpc.aio.AioRpcError) and exc.code() in FAILURE_CODES and dependency_of(exc) is None
    )


def _is_retryable(exc: BaseException) -> bool:
    # UNAVAILABLE is the one code where the server never produced an answer, so a retry cannot repeat work.
    return (
        isinstance(exc, grpc.aio.AioRpcError)
        and exc.code() == grpc.StatusCode.UNAVAILABLE
        and dependency_of(exc) is None
    )


def _code_of(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code().name
    if isinstance(exc, CircuitOpenError):
        return "CIRCUIT_OPEN"
    if isinstance(exc, (GeneratorExit, asyncio.CancelledError)):
        # The caller gave up (cancelled, or left a stream early).
        return grpc.StatusCode.CANCELLED.name
    return grpc.StatusCode.UNKNOWN.name


def channel_options(settings: Settings) -> list[tuple[str, Any]]:
    """Options of a guarded client's channel."""
    # Reconnect at least as often as the breaker tries again, or a recovered target would keep failing
    # its trial calls while the channel sits out gRPC's default backoff (up to 120 s).
    reconnect_ms = max(100, int(settings.breaker_reset_seconds * 1000))
    keepalive = keepalive_ms(settings)
    # Servers end connections after CHATTERBOT_GRPC_MAX_CONNECTION_AGE_SECONDS, and each end asks for the name
    # to be resolved again: allowed that often (at most gRPC's default), a new replica is found within about
    # one connection age.
    age_ms = int(settings.grpc_max_connection_age_seconds * 1000)
    resolution_ms = min(DNS_MIN_RESOLUTION_INTERVAL_MS, age_ms) if age_ms else DNS_MIN_RESOLUTION_INTERVAL_MS
    return [
        # Retries are ours (tenacity), counted by the breaker; gRPC's own would hide failures from it.
        ("grpc.enable_retries", 0),
        ("grpc.keepalive_time_ms", keepalive),
        ("grpc.keepalive_timeout_ms", min(10_000, keepalive)),
        # Idle channels are pinged too, so a dead peer is found before the next call rather than by its
        # deadline; servers allow that (server_keepalive_options).
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.initial_reconnect_backoff_ms", min(1000, reconnect_ms)),
        ("grpc.max_reconnect_backoff_ms", reconnect_ms),
        # Spread calls over every address a name resolves to (headless Kubernetes Services list each pod).
        ("grpc.lb_policy_name", "round_robin"),
        ("grpc.dns_min_time_between_resolutions_ms", max(1000, resolution_ms)),
    ]


def open_channel(
    address: str,
    settings: Settings,
    *,
    options: Sequence[tuple[str, Any]] | None = None,
    interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
) -> grpc.aio.Channel:
    """A channel to a service of the mesh: mutual TLS when CHATTERBOT_GRPC_TLS_* are set (chatterbot.tls),
    plaintext when they are not."""
    credentials = tls.mesh_channel_credentials(settings)
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(address, credentials, options=options, interceptors=interceptors)


class GuardedClient(Generic[StubT]):
    """Deadline, circuit breaker and safe retries around one target service's stub.

    Calls name the stub's method itself, so they are typed end to end:
    `await client.call(client.stub.Chat, request)`, `client.stream(client.stub.Generate, request)`.
    Create it inside the running event loop (grpc.aio binds the channel to it) and `close()` it at
    shutdown. `breaker`, when given, should be named after `target`.
    """

    def __init__(
        self,
        target: str,
        address: str,
        stub_factory: Callable[[grpc.aio.Channel], StubT],
        settings: Settings,
        *,
        breaker: AsyncCircuitBreaker | None = None,
    ) -> None:
        self.target = target
        self.address = address
        self._settings = settings
        self.breaker = breaker or AsyncCircuitBreaker(
            target,
            fail_max=settings.breaker_fail_max,
            reset_timeout=settings.breaker_reset_seconds,
            is_failure=is_target_failure,
        )
        served_here = local.local_server(target)
        # A target this process runs is called in process (chatterbot.local), with the same stub.
        self.channel: grpc.aio.Channel | local.LocalChannel = (
            local.LocalChannel(served_here)
            if served_here is not None
            else open_channel(
                address,
                settings,
                options=channel_options(settings),
                interceptors=client_tracing_interceptors(),
            )
        )
        self.stub: StubT = stub_factory(self.channel)  # type: ignore[arg-type]

    async def close(self) -> None:
        """Close the channel, cancelling calls still in flight."""
        await self.channel.close()

    async def call(
        self,
        rpc: grpc.aio.UnaryUnaryMultiCallable[RequestT, ResponseT],
        request: RequestT,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        retry: bool = True,
    ) -> ResponseT:
        """Call unary `rpc` (a method of `self.stub`) with a deadline, through the breaker, retrying UNAVAILABLE.

        `timeout` (default `settings.deadline_seconds`) bounds the whole call, retries included. Pass
        `retry=False` for calls that must be tried once only.
        """
        method = method_name(rpc)
        budget = self._settings.deadline_seconds if timeout is None else timeout
        deadline = time.monotonic() + budget

        async def attempt() -> ResponseT:
            try:
                return await self.breaker.call(self._unary_attempt, method, rpc, request, deadline, metadata)
            except CircuitOpenError:
                CLIENT_CALLS.labels(self.target, method, "CIRCUIT_OPEN").inc()
                raise

        if not retry or self._settings.retry_attempts <= 1:
            return await attempt()
        # The first attempt runs as is; only a call that must be retried pays for the retry machinery.
        try:
            return await attempt()
        except Exception as exc:
            if not _is_retryable(exc) or time.monotonic() >= deadline:
                raise
            logger.debug("retrying %s.%s after %s", self.target, method, _code_of(exc))
        await self._sleep_before_retry(deadline)
        return await self._retrying(deadline - time.monotonic(), attempts=self._settings.retry_attempts - 1)(
            attempt
        )

    async def stream(
        self,
        rpc: grpc.aio.UnaryStreamMultiCallable[RequestT, ResponseT],
        request: RequestT,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> AsyncIterator[ResponseT]:
        """Iterate server-streaming `rpc` (a method of `self.stub`) with a deadline, through the breaker.

        UNAVAILABLE is retried only until the first message arrives, never after. The breaker sees the
        whole stream, so an error mid-stream counts against the target. Leaving early cancels the call on
        the server: `contextlib.aclosing(...)` does it at once, a dropped iterator when the event loop
        finalizes it. `timeout` defaults to `settings.stream_deadline_seconds` and bounds the whole stream.
        """
        method = method_name(rpc)
        budget = self._settings.stream_deadline_seconds if timeout is None else timeout
        deadline = time.monotonic() + budget

        async def attempt() -> tuple[AsyncIterator[ResponseT], ResponseT] | None:
            """The open stream and its first message; None for a stream that ended without one."""
            responses = self.breaker.stream(self._stream_attempt, method, rpc, request, deadline, metadata)
            try:
                return responses, await anext(responses)
            except StopAsyncIteration:
                return None
            except CircuitOpenError:
                CLIENT_CALLS.labels(self.target, method, "CIRCUIT_OPEN").inc()
                raise

        # The first attempt runs as is; only a stream that must be retried pays for the retry machinery.
        try:
            opened = await attempt()
        except Exception as exc:
            if self._settings.retry_attempts <= 1 or not _is_retryable(exc) or time.monotonic() >= deadline:
                raise
            logger.debug("retrying %s.%s after %s", self.target, method, _code_of(exc))
            await self._sleep_before_retry(deadline)
            retrying = self._retrying(deadline - time.monotonic(), self._settings.retry_attempts - 1)
            opened = await retrying(attempt)
        if opened is None:
            return
        responses, first = opened
        try:
            yield first
            async for response in responses:
                yield response
        finally:
            await responses.aclose()  # type: ignore[attr-defined]

    async def _sleep_before_retry(self, deadline: float) -> None:
        # Full-jitter exponential backoff before the first retry, as `_retrying` waits before later ones.
        settings = self._settings
        cap = min(settings.retry_max_backoff, settings.retry_initial_backoff)
        await asyncio.sleep(min(max(0.0, deadline - time.monotonic()), random.uniform(0, cap)))

    def _retrying(self, budget: float, attempts: int | None = None) -> AsyncRetrying:
        settings = self._settings
        return AsyncRetrying(
            retry=retry_if_exception(_is_retryable),
            stop=stop_after_attempt(max(1, settings.retry_attempts if attempts is None else attempts))
            | stop_before_delay(budget),
            wait=wait_random_exponential(
                multiplier=settings.retry_initial_backoff, max=settings.retry_max_backoff
            ),
            before_sleep=before_sleep_log(logger, logging.DEBUG),
            reraise=True,
        )

    async def _unary_attempt(
        self, method: str, rpc: Any, request: Any, deadline: float, metadata: Any
    ) -> Any:
        started = time.perf_counter()
        code = grpc.StatusCode.OK.name
        try:
            return await rpc(request, timeout=_time_left(deadline), metadata=metadata)
        except BaseException as exc:
            code = _code_of(exc)
            _tag(exc, self.target)
            raise
        finally:
            self._observe(method, code, started)

    async def _stream_attempt(
        self, method: str, rpc: Any, request: Any, deadline: float, metadata: Any
    ) -> AsyncIterator[Any]:
        started = time.perf_counter()
        code = grpc.StatusCode.OK.name
        call = rpc(request, timeout=_time_left(deadline), metadata=metadata)
        try:
            async for response in call:
                yield response
        except BaseException as exc:
            code = _code_of(exc)
            _tag(exc, self.target)
            raise
        finally:
            # A no-op for a finished call; for a consumer that left early it tells the server to stop.
            call.cancel()
            if isinstance(call, local.LocalStreamCall):
                await call.aclose()
            self._observe(method, code, started)

    def _observe(self, method: str, code: str, started: float) -> None:
        _latency(self.target, method).observe(time.perf_counter() - started)
        _calls(self.target, method, code).inc()


def _tag(exc: BaseException, target: str) -> None:
    if isinstance(exc, grpc.aio.AioRpcError):
        setattr(exc, _TARGET_ATTRIBUTE, target)


def _time_left(deadline: float) -> float:
    # A budget spent on earlier attempts still gets a (tiny) deadline: the attempt ends DEADLINE_EXCEEDED.
    return max(0.001, deadline - time.monotonic())


__all__ = [
    "CLIENT_CALLS",
    "CLIENT_LATENCY",
    "DEPENDENCY_KEY",
    "FAILURE_CODES",
    "RETRY_AFTER_KEY",
    "CircuitOpenError",
    "GuardedClient",
    "channel_options",
    "dependency_of",
    "dependency_unavailable_metadata",
    "is_target_failure",
    "method_name",
    "open_channel",
    "retry_after_of",
    "server_keepalive_options",
    "target_of",
]
