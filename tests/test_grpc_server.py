"""The shared gRPC bootstrap: health, reflection and graceful drain seen from outside a real service process,
and the one status interceptor on a real in-process server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client import REGISTRY

from chatterbot import status
from chatterbot.breaker import CircuitOpenError
from chatterbot.grpc_server import GrpcApp, build_server
from chatterbot.guarded_client import GuardedClient, dependency_of, retry_after_of
from chatterbot.settings import Settings
from chatterbot.v1 import inference_pb2, inference_pb2_grpc, types_pb2
from ops.embedded import free_port
from ops.launcher import ServiceProcess


@pytest.fixture
def slow_inference(tmp_path):
    """inference_svc alone, generating one token every 20 ms."""
    port = free_port()
    settings = Settings(
        _env_file=None,
        inference_addr=f"127.0.0.1:{port}",
        sim_ttft_ms=10,
        sim_itl_ms=20,
        sim_mean_output_tokens=10_000,
        shutdown_grace_seconds=10,
    )
    service = ServiceProcess("inference", tmp_path, port, settings.to_env())
    service.start()
    try:
        yield service
    finally:
        service.stop()


def _generate_request(max_tokens: int) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        messages=[types_pb2.ChatMessage(role=types_pb2.ROLE_USER, content="count slowly")],
        sampling=types_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, seed=7),
    )


def test_health_and_reflection_answer_without_proto_files(slow_inference):
    with grpc.insecure_channel(slow_inference.url) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "chatterbot.v1.InferenceService", "liveness", "dependency.engine"):
            status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING, name
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
        assert {"chatterbot.v1.InferenceService", "grpc.health.v1.Health"} <= services


def test_sigterm_drains_in_flight_calls_and_refuses_new_ones(slow_inference):
    with grpc.insecure_channel(slow_inference.url) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        stream = stub.Generate(_generate_request(max_tokens=60), timeout=30)
        chunks = [next(stream)]
        started = time.monotonic()
        slow_inference._proc.send_signal(signal.SIGTERM)
        chunks.extend(stream)  # the in-flight stream runs to its end
        assert time.monotonic() - started > 0.5, "the stream should have outlived the signal"
        assert chunks[-1].finish_reason in (types_pb2.FINISH_REASON_STOP, types_pb2.FINISH_REASON_LENGTH)
        assert sum(c.token_count for c in chunks) == chunks[-1].usage.completion_tokens

    with grpc.insecure_channel(slow_inference.url) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            list(inference_pb2_grpc.InferenceServiceStub(channel).Generate(_generate_request(10), timeout=5))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert slow_inference._proc.wait(timeout=15) == 0


def test_generate_rejects_invalid_requests(slow_inference):
    with grpc.insecure_channel(slow_inference.url) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as empty:
            list(stub.Generate(inference_pb2.GenerateRequest(), timeout=5))
        assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as unknown:
            request = _generate_request(10)
            request.model = "no-such-model"
            list(stub.Generate(request, timeout=5))
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        models = stub.ListModels(inference_pb2.ListModelsRequest(), timeout=5).models
        assert [(m.engine, m.state, m.is_default) for m in models] == [
            ("sim", inference_pb2.MODEL_STATE_READY, True)
        ]


# --- one way to answer failures: the status interceptor on a real in-process server -------------------------

FAULTS_SERVICE = "chatterbot.test.Faults"
# Sent by a handler (or by Relay's downstream) before it fails, in every streaming flavour.
STREAMED = [b"first", b"second"]


class LibraryError(Exception):
    """Stands for a library's own exception that a service's translator knows."""


def library_status(exc: BaseException) -> status.StatusError | None:
    return status.ResourceExhausted(f"the library says: {exc}") if isinstance(exc, LibraryError) else None


# Request name -> the exception the handler raises, and the status the caller should get for it.
FAULTS: dict[str, tuple[Callable[[], BaseException], grpc.StatusCode, str]] = {
    "invalid": (lambda: status.InvalidArgument("bad field"), grpc.StatusCode.INVALID_ARGUMENT, "bad field"),
    "not-found": (lambda: status.NotFound("no such row"), grpc.StatusCode.NOT_FOUND, "no such row"),
    "exists": (lambda: status.AlreadyExists("taken"), grpc.StatusCode.ALREADY_EXISTS, "taken"),
    "denied": (lambda: status.PermissionDenied("not yours"), grpc.StatusCode.PERMISSION_DENIED, "not yours"),
    "unauthenticated": (lambda: status.Unauthenticated("who?"), grpc.StatusCode.UNAUTHENTICATED, "who?"),
    "precondition": (
        lambda: status.FailedPrecondition("not yet"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "not yet",
    ),
    "exhausted": (
        lambda: status.ResourceExhausted("slow down"),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "slow down",
    ),
    "deadline": (
        lambda: status.DeadlineExceeded("took too long"),
        grpc.StatusCode.DEADLINE_EXCEEDED,
        "took too long",
    ),
    "unavailable": (
        lambda: status.Unavailable("come back later"),
        grpc.StatusCode.UNAVAILABLE,
        "come back later",
    ),
    "out-of-range": (lambda: status.OutOfRange("page 9 of 3"), grpc.StatusCode.OUT_OF_RANGE, "page 9 of 3"),
    "circuit-open": (
        lambda: CircuitOpenError("inference", 2.5),
        grpc.StatusCode.UNAVAILABLE,
        "inference is unavailable (circuit open)",
    ),
    "library": (
        lambda: LibraryError("quota"),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "the library says: quota",
    ),
    "not-implemented": (
        lambda: NotImplementedError(),
        grpc.StatusCode.UNIMPLEMENTED,
        "method not implemented",
    ),
    "bug": (lambda: RuntimeError("secret detail"), grpc.StatusCode.INTERNAL, "internal error: RuntimeError"),
}


class Faults:
    """Handlers that fail as the request says; `Relay` passes the request to the same server downstream."""

    def __init__(self) -> None:
        self.downstream: GuardedClient[FaultsStub] | None = None
        self.cancelled = asyncio.Event()

    def fail(self, request: bytes) -> BaseException:
        return FAULTS[request.decode()][0]()

    async def unary(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise self.fail(request)

    async def stream(self, request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        for message in STREAMED:
            yield message
        raise self.fail(request)

    async def written(self, request: bytes, context: grpc.aio.ServicerContext) -> None:
        # The reader/writer flavour of a streaming handler (grpc's own health Watch is one).
        for message in STREAMED:
            await context.write(message)
        raise self.fail(request)

    async def aborts(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "aborted by the handler")
        raise AssertionError("not reached")

    async def forever(self, request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        try:
            while True:
                yield b"tick"
                await asyncio.sleep(0.01)
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled.set()
            raise

    async def relay(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        assert self.downstream is not None
        return await self.downstream.call(self.downstream.stub.Unary, request, timeout=2, retry=False)

    async def relay_slowly(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        assert self.downstream is not None
        async with contextlib.aclosing(
            self.downstream.stream(self.downstream.stub.Forever, request, timeout=0.2)
        ) as ticks:
            async for _ in ticks:
                pass
        return b""

    def add_to(self, server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    FAULTS_SERVICE,
                    {
                        "Unary": grpc.unary_unary_rpc_method_handler(self.unary),
                        "Stream": grpc.unary_stream_rpc_method_handler(self.stream),
                        "Written": grpc.unary_stream_rpc_method_handler(self.written),
                        "Aborts": grpc.unary_unary_rpc_method_handler(self.aborts),
                        "Forever": grpc.unary_stream_rpc_method_handler(self.forever),
                        "Relay": grpc.unary_unary_rpc_method_handler(self.relay),
                        "RelaySlowly": grpc.unary_unary_rpc_method_handler(self.relay_slowly),
                    },
                ),
            )
        )


class FaultsStub:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        for name in ("Unary", "Aborts", "Relay", "RelaySlowly"):
            setattr(self, name, channel.unary_unary(f"/{FAULTS_SERVICE}/{name}"))
        for name in ("Stream", "Written", "Forever"):
            setattr(self, name, channel.unary_stream(f"/{FAULTS_SERVICE}/{name}"))


@dataclass
class FaultsServer:
    faults: Faults
    stub: FaultsStub
    health: health_pb2_grpc.HealthStub


@pytest.fixture
async def faults_server() -> AsyncIterator[FaultsServer]:
    """The Faults servicer on a server built by the shared bootstrap, with a translator of its own."""
    faults = Faults()
    health = health_aio.HealthServicer()
    server = build_server(
        GrpcApp(
            name="faults",
            servicers=[
                (lambda servicer, server: servicer.add_to(server), faults),
                (health_pb2_grpc.add_HealthServicer_to_server, health),
            ],
            service_names=[FAULTS_SERVICE],
            error_translators=[library_status],
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    settings = Settings(_env_file=None, retry_attempts=1)
    faults.downstream = GuardedClient("faults-downstream", f"127.0.0.1:{port}", FaultsStub, settings)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield FaultsServer(faults, FaultsStub(channel), health_pb2_grpc.HealthStub(channel))
    finally:
        await channel.close()
        await faults.downstream.close()
        await server.stop(None)


def handled(method: str, code: str) -> float:
    sample = REGISTRY.get_sample_value(
        "chatterbot_grpc_server_handled_total", {"method": f"/{FAULTS_SERVICE}/{method}", "code": code}
    )
    return sample or 0.0


async def counted_once_more(method: str, code: str, before: float) -> bool:
    """Whether the server counted one more call of `method` ending with `code`; it may count just after the
    caller has its answer."""
    for _ in range(200):
        if handled(method, code) > before:
            break
        await asyncio.sleep(0.005)
    return handled(method, code) == before + 1


def trailers(error: grpc.aio.AioRpcError) -> dict[str, str]:
    return {key: value for key, value in error.trailing_metadata() or () if isinstance(value, str)}


@pytest.mark.parametrize("fault", list(FAULTS))
async def test_a_unary_handler_that_raises_ends_with_the_status_of_its_error(faults_server, fault):
    _, code, details = FAULTS[fault]
    counted = handled("Unary", code.name)
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await faults_server.stub.Unary(fault.encode(), timeout=5)
    assert (failed.value.code(), failed.value.details()) == (code, details)
    # The metrics interceptor, outside the status one, counts the code the call really ended with.
    assert await counted_once_more("Unary", code.name, counted)


@pytest.mark.parametrize("method", ["Stream", "Written"])
@pytest.mark.parametrize("fault", list(FAULTS))
async def test_a_stream_that_raises_after_sending_messages_keeps_them_and_ends_with_the_status(
    faults_server, method, fault
):
    _, code, details = FAULTS[fault]
    counted = handled(method, code.name)
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        async for message in getattr(faults_server.stub, method)(fault.encode(), timeout=5):
            received.append(message)
    assert received == STREAMED
    assert (failed.value.code(), failed.value.details()) == (code, details)
    assert await counted_once_more(method, code.name, counted)


async def test_an_open_circuit_blames_its_target_in_the_trailers(faults_server):
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await faults_server.stub.Unary(b"circuit-open", timeout=5)
    assert trailers(failed.value) == {"cb-dependency": "inference", "retry-after": "2.500"}
    assert dependency_of(failed.value) == "inference"
    assert retry_after_of(failed.value) == 2.5


async def test_an_unavailable_of_this_server_itself_blames_no_dependency(faults_server):
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await faults_server.stub.Unary(b"unavailable", timeout=5)
    assert dependency_of(failed.value) is None


async def test_an_unknown_exception_is_internal_and_logged_without_leaking_its_message(faults_server, caplog):
    with (
        caplog.at_level(logging.ERROR, logger="chatterbot.status"),
        pytest.raises(grpc.aio.AioRpcError) as failed,
    ):
        await faults_server.stub.Unary(b"bug", timeout=5)
    assert failed.value.code() == grpc.StatusCode.INTERNAL
    assert "secret detail" not in (failed.value.details() or "")
    [record] = [r for r in caplog.records if r.name == "chatterbot.status"]
    assert record.method == f"/{FAULTS_SERVICE}/Unary"
    assert record.exc_info and isinstance(record.exc_info[1], RuntimeError)


async def test_known_errors_are_not_logged_as_unhandled(faults_server, caplog):
    with caplog.at_level(logging.ERROR, logger="chatterbot.status"), pytest.raises(grpc.aio.AioRpcError):
        await faults_server.stub.Unary(b"not-found", timeout=5)
    assert not [r for r in caplog.records if r.name == "chatterbot.status"]


async def test_a_handler_that_aborts_itself_keeps_its_own_status(faults_server):
    counted = handled("Aborts", "PERMISSION_DENIED")
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await faults_server.stub.Aborts(b"", timeout=5)
    assert (failed.value.code(), failed.value.details()) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "aborted by the handler",
    )
    assert await counted_once_more("Aborts", "PERMISSION_DENIED", counted)


@pytest.mark.parametrize(
    "fault", ["invalid", "not-found", "denied", "precondition", "exhausted", "out-of-range"]
)
async def test_a_downstream_business_error_reaches_the_caller_unchanged(faults_server, fault):
    _, code, details = FAULTS[fault]
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await faults_server.stub.Relay(fault.encode(), timeout=5)
    assert (failed.value.code(), failed.value.details()) == (code, details)
    assert dependency_of(failed.value) is None


async def test_a_downstream_failure_is_unavailable_naming_the_dependency(faults_server):
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await faults_server.stub.Relay(b"bug", timeout=5)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert failed.value.details() == "faults-downstream failed: INTERNAL"
    assert dependency_of(failed.value) == "faults-downstream"


async def test_a_downstream_timeout_is_deadline_exceeded_naming_the_dependency(faults_server):
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await faults_server.stub.RelaySlowly(b"", timeout=5)
    assert (failed.value.code(), failed.value.details()) == (
        grpc.StatusCode.DEADLINE_EXCEEDED,
        "faults-downstream timed out",
    )


async def test_a_cancelled_stream_stays_cancelled(faults_server, caplog):
    counted = handled("Forever", "CANCELLED")
    with caplog.at_level(logging.ERROR, logger="chatterbot.status"):
        call = faults_server.stub.Forever(b"", timeout=5)
        assert await call.read() == b"tick"
        call.cancel()
        await asyncio.wait_for(faults_server.faults.cancelled.wait(), 5)
        assert await counted_once_more("Forever", "CANCELLED", counted)
    assert not [r for r in caplog.records if r.name == "chatterbot.status"]


async def test_a_written_stream_such_as_health_watch_works_through_the_interceptors(faults_server):
    watch = faults_server.health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=5)
    first = await watch.read()
    assert first.status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()


def test_status_of_knows_status_errors_translations_and_downstream_failures_only():
    error = status.NotFound("gone")
    assert status.status_of(error) is error
    assert status.status_of(LibraryError("x"), [library_status]).code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status.status_of(LibraryError("x")) is None
    assert status.status_of(KeyError("x")) is None
    unavailable = status.Unavailable("down", dependency="store", retry_after=0.25)
    assert unavailable.metadata == (("cb-dependency", "store"), ("retry-after", "0.250"))
    assert status.Unavailable("down").metadata == ()
