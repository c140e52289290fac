"""GuardedClient against real in-process grpc.aio servers: deadlines, safe retries, breaker, cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time

import grpc
import pybreaker
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate
from prometheus_client import REGISTRY

from chatterbot import tracing
from chatterbot.breaker import CircuitOpenError
from chatterbot.guarded_client import (
    GuardedClient,
    dependency_of,
    dependency_unavailable_metadata,
    retry_after_of,
)
from chatterbot.settings import Settings

SERVICE = "chatterbot.test.Echo"
RESET = 0.2
_targets = itertools.count()


def make_settings(**overrides) -> Settings:
    values = {
        "deadline_seconds": 2.0,
        "stream_deadline_seconds": 3.0,
        "breaker_fail_max": 3,
        "breaker_reset_seconds": RESET,
        "retry_attempts": 3,
        "retry_initial_backoff": 0.01,
        "retry_max_backoff": 0.05,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


class EchoStub:
    """Bytes-in, bytes-out stub for the generic test service."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.Unary = channel.unary_unary(f"/{SERVICE}/Unary")
        self.Stream = channel.unary_stream(f"/{SERVICE}/Stream")


class Echo:
    """Handlers whose behaviour each test sets; counts the calls that reach them."""

    def __init__(self) -> None:
        self.unary_calls = 0
        self.stream_calls = 0
        self.unary_behaviour = self.echo
        self.stream_behaviour = self.count_to_three
        self.stream_cancelled = asyncio.Event()

    async def unary(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.unary_calls += 1
        return await self.unary_behaviour(request, context)

    async def stream(self, request: bytes, context: grpc.aio.ServicerContext):
        self.stream_calls += 1
        try:
            async for message in self.stream_behaviour(request, context):
                yield message
        except (asyncio.CancelledError, GeneratorExit):
            # CancelledError when the server cancels the handler inside this generator; GeneratorExit
            # when it did so while awaiting its own write and then closed the abandoned generator.
            self.stream_cancelled.set()
            raise

    @staticmethod
    async def echo(request: bytes, context) -> bytes:
        return request

    @staticmethod
    async def count_to_three(request: bytes, context):
        for i in range(3):
            yield b"%d" % i

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Unary": grpc.unary_unary_rpc_method_handler(self.unary),
                "Stream": grpc.unary_stream_rpc_method_handler(self.stream),
            },
        )


async def start_server(echo: Echo, port: int = 0) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((echo.handler(),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, bound


@pytest.fixture
async def echo():
    return Echo()


@pytest.fixture
async def server(echo):
    server, port = await start_server(echo)
    yield port
    await server.stop(None)


@contextlib.asynccontextmanager
async def guarded(port: int, stub_factory=EchoStub, **settings):
    client = GuardedClient(
        f"test-target-{next(_targets)}", f"127.0.0.1:{port}", stub_factory, make_settings(**settings)
    )
    try:
        yield client
    finally:
        await client.close()


def calls_with_code(client: GuardedClient, method: str, code: str) -> float:
    value = REGISTRY.get_sample_value(
        "chatterbot_client_calls_total", {"target": client.target, "method": method, "code": code}
    )
    return value or 0.0


class Recorder(pybreaker.CircuitBreakerListener):
    def __init__(self) -> None:
        self.states: list[str] = []

    def state_change(self, cb, old_state, new_state) -> None:
        self.states.append(new_state.name)


async def test_stopped_target_opens_the_breaker_then_recovers_end_to_end(echo):
    server, port = await start_server(echo)
    async with guarded(port, stub_factory=health_pb2_grpc.HealthStub) as client:
        recorder = Recorder()
        client.breaker.circuit.add_listener(recorder)
        reply = await client.call(client.stub.Check, health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

        await server.stop(None)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.call(client.stub.Check, health_pb2.HealthCheckRequest())
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert calls_with_code(client, "Check", "UNAVAILABLE") == 3  # retry_attempts tries
        assert client.breaker.state == "open"

        started = time.perf_counter()
        with pytest.raises(CircuitOpenError) as open_err:
            await client.call(client.stub.Check, health_pb2.HealthCheckRequest())
        assert time.perf_counter() - started < 0.25  # no call made: far below any deadline
        assert open_err.value.target == client.target
        assert 0 < retry_after_of(open_err.value) <= RESET
        assert calls_with_code(client, "Check", "UNAVAILABLE") == 3

        server, _ = await start_server(echo, port)
        try:
            # The channel reconnects on its own backoff (capped at the breaker's reset time), so the
            # first trial may still find it down; the breaker must close within a few reset periods.
            deadline = time.monotonic() + 5
            while True:
                await asyncio.sleep(client.breaker.retry_after + 0.01)
                try:
                    reply = await client.call(client.stub.Check, health_pb2.HealthCheckRequest())
                    break
                except (CircuitOpenError, grpc.aio.AioRpcError):
                    assert time.monotonic() < deadline, recorder.states
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            assert client.breaker.state == "closed"
            assert recorder.states[:2] == ["open", "half-open"]
            assert recorder.states[-2:] == ["half-open", "closed"]
        finally:
            await server.stop(None)


async def test_an_opening_breaker_stops_the_retries(echo):
    server, port = await start_server(echo)
    await server.stop(None)
    async with guarded(port, breaker_fail_max=2, retry_attempts=5) as client:
        with pytest.raises(CircuitOpenError):
            await client.call(client.stub.Unary, b"hi")
        assert calls_with_code(client, "Unary", "UNAVAILABLE") == 2
        assert calls_with_code(client, "Unary", "CIRCUIT_OPEN") == 1


async def test_unavailable_on_first_attempt_is_retried(echo, server):
    async def flaky(request, context):
        if echo.unary_calls == 1:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        return b"second try: " + request

    echo.unary_behaviour = flaky
    async with guarded(server) as client:
        assert await client.call(client.stub.Unary, b"hi") == b"second try: hi"
        assert echo.unary_calls == 2
        assert client.breaker.fail_counter == 0


async def test_retry_false_tries_once(echo, server):
    async def down(request, context):
        await context.abort(grpc.StatusCode.UNAVAILABLE, "down")

    echo.unary_behaviour = down
    async with guarded(server) as client:
        with pytest.raises(grpc.aio.AioRpcError):
            await client.call(client.stub.Unary, b"hi", retry=False)
        assert echo.unary_calls == 1
        assert client.breaker.fail_counter == 1


async def test_invalid_argument_is_neither_retried_nor_counted(echo, server):
    async def reject(request, context):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad prompt")

    echo.unary_behaviour = reject
    async with guarded(server) as client:
        for _ in range(client.breaker.circuit.fail_max + 1):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.call(client.stub.Unary, b"hi")
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert echo.unary_calls == client.breaker.circuit.fail_max + 1
        assert client.breaker.state == "closed" and client.breaker.fail_counter == 0


async def test_unavailable_dependency_is_passed_through_neither_retried_nor_counted(echo, server):
    async def redis_down(request, context):
        await context.abort(
            grpc.StatusCode.UNAVAILABLE,
            "redis is unavailable",
            trailing_metadata=dependency_unavailable_metadata("redis", 1.5),
        )

    echo.unary_behaviour = redis_down
    async with guarded(server) as client:
        for _ in range(client.breaker.circuit.fail_max + 1):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.call(client.stub.Unary, b"hi")
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert err.value.details() == "redis is unavailable"
            assert dependency_of(err.value) == "redis"
            assert retry_after_of(err.value) == pytest.approx(1.5)
        assert echo.unary_calls == client.breaker.circuit.fail_max + 1
        assert client.breaker.state == "closed" and client.breaker.fail_counter == 0


async def test_stream_is_never_retried_after_it_yielded(echo, server):
    async def one_then_unavailable(request, context):
        yield b"first"
        await context.abort(grpc.StatusCode.UNAVAILABLE, "engine died")

    echo.stream_behaviour = one_then_unavailable
    async with guarded(server) as client:
        received = []
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for message in client.stream(client.stub.Stream, b"go"):
                received.append(message)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert received == [b"first"]
        assert echo.stream_calls == 1
        assert client.breaker.fail_counter == 1  # the breaker saw the failure mid-stream


async def test_stream_is_retried_while_nothing_was_received(echo, server):
    async def unavailable_once(request, context):
        if echo.stream_calls == 1:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        yield b"hello"

    echo.stream_behaviour = unavailable_once
    async with guarded(server) as client:
        assert [m async for m in client.stream(client.stub.Stream, b"go")] == [b"hello"]
        assert echo.stream_calls == 2
        assert client.breaker.fail_counter == 0


async def test_empty_stream_ends_cleanly_and_counts_as_success(echo, server):
    async def nothing(request, context):
        return
        yield

    echo.stream_behaviour = nothing
    async with guarded(server) as client:
        assert [m async for m in client.stream(client.stub.Stream, b"go")] == []
        assert echo.stream_calls == 1
        assert calls_with_code(client, "Stream", "OK") == 1


async def test_consumer_leaving_a_stream_early_cancels_the_server_call(echo, server):
    async def endless(request, context):
        while True:
            yield b"token"
            await asyncio.sleep(0.01)

    echo.stream_behaviour = endless
    async with guarded(server) as client:
        async for _ in client.stream(client.stub.Stream, b"go"):
            break
        await asyncio.wait_for(echo.stream_cancelled.wait(), 2)
        assert client.breaker.state == "closed" and client.breaker.fail_counter == 0

        echo.stream_cancelled.clear()
        async with contextlib.aclosing(client.stream(client.stub.Stream, b"go")) as tokens:
            assert await anext(tokens) == b"token"
        await asyncio.wait_for(echo.stream_cancelled.wait(), 2)
        assert calls_with_code(client, "Stream", "CANCELLED") == 2
        assert client.breaker.fail_counter == 0


async def test_cancelled_consumer_cancels_the_server_call(echo, server):
    async def endless(request, context):
        while True:
            yield b"token"
            await asyncio.sleep(0.01)

    echo.stream_behaviour = endless
    async with guarded(server) as client:
        started = asyncio.Event()

        async def consume() -> None:
            async with contextlib.aclosing(client.stream(client.stub.Stream, b"go")) as tokens:
                async for _ in tokens:
                    started.set()

        consumer = asyncio.create_task(consume())
        await asyncio.wait_for(started.wait(), 2)
        consumer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await consumer
        await asyncio.wait_for(echo.stream_cancelled.wait(), 2)
        assert client.breaker.fail_counter == 0


async def test_a_cancelled_unary_caller_cancels_the_server_call(echo, server):
    entered, cancelled = asyncio.Event(), asyncio.Event()

    async def forever(request, context):
        entered.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return request

    echo.unary_behaviour = forever
    async with guarded(server) as client:
        caller = asyncio.create_task(client.call(client.stub.Unary, b"go"))
        await asyncio.wait_for(entered.wait(), 2)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        # The RPC itself ends, not only the caller's wait for it: the server stops working for nobody.
        await asyncio.wait_for(cancelled.wait(), 2)
        assert calls_with_code(client, "Unary", "CANCELLED") == 1
        assert client.breaker.fail_counter == 0


async def test_every_call_carries_the_callers_trace_context(echo, server, monkeypatch):
    # As in a process that exports spans (an OTLP endpoint is set).
    monkeypatch.setattr(tracing, "_exporting", True)
    seen: list[str] = []

    async def record(request, context):
        seen.append(dict(context.invocation_metadata()).get("traceparent", ""))
        return request

    async def record_stream(request, context):
        seen.append(dict(context.invocation_metadata()).get("traceparent", ""))
        yield request

    echo.unary_behaviour = record
    echo.stream_behaviour = record_stream
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    parent = propagate.extract({"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
    token = otel_context.attach(parent)
    try:
        async with guarded(server) as client:
            await client.call(client.stub.Unary, b"hi", metadata=(("x-api-key", "k"),))
            async for _ in client.stream(client.stub.Stream, b"hi"):
                pass
    finally:
        otel_context.detach(token)
    assert len(seen) == 2 and all(tp.startswith(f"00-{trace_id}-") for tp in seen), seen


async def test_every_call_gets_a_deadline(echo, server):
    async def slow(request, context):
        await asyncio.sleep(5)
        return request

    async def slow_stream(request, context):
        await asyncio.sleep(5)
        yield request

    echo.unary_behaviour = slow
    echo.stream_behaviour = slow_stream
    async with guarded(server, deadline_seconds=0.3, stream_deadline_seconds=0.3) as client:
        for call in (
            lambda: client.call(client.stub.Unary, b"hi"),
            lambda: client.call(client.stub.Unary, b"hi", timeout=0.1),
            lambda: anext(client.stream(client.stub.Stream, b"hi")),
        ):
            started = time.perf_counter()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call()
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.perf_counter() - started < 2  # the deadline, not the 5 s handler
        assert echo.unary_calls == 2 and echo.stream_calls == 1  # DEADLINE_EXCEEDED is not retried
        assert client.breaker.fail_counter == 3
