"""In-process calls (chatterbot.local) against the same servicers over a real grpc.aio server: the same stubs,
codes, details and trailers, deadlines and cancellation reaching the handler, the breaker and the metrics."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY

from chat_svc.auth import ApiKeyInterceptor, current_caller
from chatterbot import local, status
from chatterbot.api_keys import SERVICE, KeyResolver
from chatterbot.breaker import CircuitOpenError
from chatterbot.grpc_server import GrpcApp, build_local_server, build_server
from chatterbot.guarded_client import GuardedClient, dependency_of, retry_after_of
from chatterbot.settings import Settings
from chatterbot.v1 import chat_pb2, chat_pb2_grpc, inference_pb2, inference_pb2_grpc, types_pb2

INFERENCE = "chatterbot.v1.InferenceService"
TRANSPORTS = ("local", "network")
_targets = itertools.count()

Unary = Callable[[Any, Any], Awaitable[Any]]
Streaming = Callable[[Any, Any], AsyncIterator[Any]]


def make_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "deadline_seconds": 5.0,
        "stream_deadline_seconds": 5.0,
        "breaker_fail_max": 3,
        "breaker_reset_seconds": 30.0,
        "retry_attempts": 3,
        "retry_initial_backoff": 0.01,
        "retry_max_backoff": 0.02,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


def delta(text: str) -> inference_pb2.GenerateResponse:
    return inference_pb2.GenerateResponse(text=text, token_count=1, model="scripted")


THREE_DELTAS = [delta("one "), delta("two "), delta("three")]
FINAL = inference_pb2.GenerateResponse(
    finish_reason=types_pb2.FINISH_REASON_STOP,
    usage=types_pb2.Usage(prompt_tokens=4, completion_tokens=3, total_tokens=7),
    model="scripted",
)
MODELS = inference_pb2.ListModelsResponse(
    models=[inference_pb2.Model(id="scripted", engine="sim", state=inference_pb2.MODEL_STATE_READY)]
)


class Scripted(inference_pb2_grpc.InferenceServiceServicer):
    """A real InferenceService servicer whose two methods do what each test sets, and say what happened."""

    def __init__(self) -> None:
        self.list_models: Unary = self.answer
        self.generate: Streaming = self.count_then_finish
        self.calls = 0
        self.requests: list[Any] = []
        self.responses: list[Any] = []
        self.entered = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.finished = asyncio.Event()

    async def ListModels(self, request: Any, context: Any) -> Any:
        self._enter(request)
        try:
            response = await self.list_models(request, context)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        finally:
            self.finished.set()
        self.responses.append(response)
        return response

    async def Generate(self, request: Any, context: Any) -> AsyncIterator[Any]:
        self._enter(request)
        try:
            async for response in self.generate(request, context):
                self.responses.append(response)
                yield response
        except (asyncio.CancelledError, GeneratorExit):
            # CancelledError when the call is cancelled while the handler awaits; GeneratorExit when it is
            # closed while suspended at a yield.
            self.cancelled.set()
            raise
        finally:
            self.finished.set()

    def _enter(self, request: Any) -> None:
        self.calls += 1
        self.requests.append(request)
        self.entered.set()

    @staticmethod
    async def answer(request: Any, context: Any) -> Any:
        return inference_pb2.ListModelsResponse(models=MODELS.models)

    @staticmethod
    async def count_then_finish(request: Any, context: Any) -> AsyncIterator[Any]:
        for message in (*THREE_DELTAS, FINAL):
            yield message


@contextlib.asynccontextmanager
async def served(
    servicer: Any,
    transport: str,
    *,
    add: Callable[[Any, Any], None] = inference_pb2_grpc.add_InferenceServiceServicer_to_server,
    stub: Callable[[Any], Any] = inference_pb2_grpc.InferenceServiceStub,
    service_name: str = INFERENCE,
    interceptors: tuple[grpc.aio.ServerInterceptor, ...] = (),
    **settings: Any,
) -> AsyncIterator[GuardedClient[Any]]:
    """A guarded client of `servicer`, served in process (registered) or by a grpc.aio server on a port,
    both built from one GrpcApp by the shared bootstrap."""
    app = GrpcApp(
        name="scripted",
        servicers=[(add, servicer)],
        service_names=[service_name],
        interceptors=list(interceptors),
    )
    target = f"local-test-{next(_targets)}"
    server: grpc.aio.Server | None = None
    if transport == "local":
        local.register(target, build_local_server(app))
        # Nothing listens here: a call that went to the network would fail.
        address = "127.0.0.1:1"
    else:
        server = build_server(app)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        address = f"127.0.0.1:{port}"
    client = GuardedClient(target, address, stub, make_settings(**settings))
    assert isinstance(client.channel, local.LocalChannel) == (transport == "local")
    try:
        yield client
    finally:
        await client.close()
        local.unregister(target)
        if server is not None:
            await server.stop(None)


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def servicer() -> Scripted:
    return Scripted()


def client_calls(client: GuardedClient[Any], method: str, code: str) -> float:
    return (
        REGISTRY.get_sample_value(
            "chatterbot_client_calls_total", {"target": client.target, "method": method, "code": code}
        )
        or 0.0
    )


def handled(method: str, code: str) -> float:
    sample = REGISTRY.get_sample_value(
        "chatterbot_grpc_server_handled_total", {"method": f"/{INFERENCE}/{method}", "code": code}
    )
    return sample or 0.0


async def counted(method: str, code: str, expected: float) -> float:
    """The server's count of `method` ending with `code`, once it reached `expected` (a network server may
    count just after its caller has the answer) or after a few seconds."""
    for _ in range(400):
        if handled(method, code) >= expected:
            break
        await asyncio.sleep(0.005)
    return handled(method, code)


async def settled(event: asyncio.Event, transport: str) -> bool:
    """Whether `event` is set: at once in process (the handler runs in the caller's task), within a few
    seconds over the network (where the server learns of the caller's end by a message)."""
    if transport == "local":
        return event.is_set()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), 5)
    return event.is_set()


def trailers(error: grpc.aio.AioRpcError) -> tuple[tuple[str, Any], ...]:
    return tuple((key, value) for key, value in error.trailing_metadata() or ())


# --- answers ---------------------------------------------------------------------------------------------


async def test_a_unary_call_gets_the_handlers_answer(servicer, transport):
    async with served(servicer, transport) as client:
        reply = await client.call(client.stub.ListModels, inference_pb2.ListModelsRequest())
    assert reply == MODELS
    assert servicer.calls == 1
    assert client_calls(client, "ListModels", "OK") == 1


async def test_in_process_the_request_and_the_answer_are_the_same_objects(servicer):
    """No serialization in process: the handler gets the caller's message, the caller the handler's."""
    request = inference_pb2.ListModelsRequest()
    async with served(servicer, "local") as client:
        reply = await client.call(client.stub.ListModels, request)
    assert servicer.requests == [request] and servicer.requests[0] is request
    assert reply is servicer.responses[0]


async def test_a_server_stream_yields_every_message_in_order(servicer, transport):
    request = inference_pb2.GenerateRequest(
        request_id="r-1", messages=[types_pb2.ChatMessage(role=types_pb2.ROLE_USER, content="count")]
    )
    async with served(servicer, transport) as client:
        received = [message async for message in client.stream(client.stub.Generate, request)]
    assert received == [*THREE_DELTAS, FINAL]
    assert servicer.requests == [request]
    assert servicer.finished.is_set() and not servicer.cancelled.is_set()
    assert client_calls(client, "Generate", "OK") == 1


# --- errors: the same code, details and trailers both ways ----------------------------------------------

# Name -> what the handler raises, and the code and details its caller gets.
FAULTS: dict[str, tuple[Callable[[], BaseException], grpc.StatusCode, str]] = {
    "invalid-argument": (
        lambda: status.InvalidArgument("messages must not be empty"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "messages must not be empty",
    ),
    "not-found": (
        lambda: status.NotFound("no model named x"),
        grpc.StatusCode.NOT_FOUND,
        "no model named x",
    ),
    "unavailable-dependency": (
        lambda: status.Unavailable("redis is down", dependency="redis", retry_after=1.5),
        grpc.StatusCode.UNAVAILABLE,
        "redis is down",
    ),
    "unexpected": (
        lambda: RuntimeError("secret detail"),
        grpc.StatusCode.INTERNAL,
        "internal error: RuntimeError",
    ),
    "not-implemented": (
        lambda: NotImplementedError(),
        grpc.StatusCode.UNIMPLEMENTED,
        "method not implemented",
    ),
}


def raising(fault: str) -> Unary:
    async def fail(request: Any, context: Any) -> Any:
        raise FAULTS[fault][0]()

    return fail


async def unary_error(servicer: Scripted, transport: str) -> grpc.aio.AioRpcError:
    async with served(servicer, transport) as client:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await client.call(client.stub.ListModels, inference_pb2.ListModelsRequest())
    return failed.value


@pytest.mark.parametrize("fault", list(FAULTS))
async def test_a_failing_handler_ends_the_call_as_the_network_server_would(servicer, fault):
    servicer.list_models = raising(fault)
    _, code, details = FAULTS[fault]
    in_process = await unary_error(servicer, "local")
    over_network = await unary_error(servicer, "network")
    assert (in_process.code(), in_process.details()) == (code, details)
    assert (over_network.code(), over_network.details()) == (code, details)
    assert trailers(in_process) == trailers(over_network)
    assert dependency_of(in_process) == dependency_of(over_network)


async def test_an_unavailable_dependency_is_named_in_the_trailers_and_neither_retried_nor_counted(
    servicer, transport
):
    servicer.list_models = raising("unavailable-dependency")
    async with served(servicer, transport) as client:
        for _ in range(client.breaker.circuit.fail_max + 1):
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await client.call(client.stub.ListModels, inference_pb2.ListModelsRequest())
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
            assert dependency_of(failed.value) == "redis"
            assert retry_after_of(failed.value) == pytest.approx(1.5)
            assert dict(trailers(failed.value)) == {"cb-dependency": "redis", "retry-after": "1.500"}
        assert servicer.calls == client.breaker.circuit.fail_max + 1
        assert client.breaker.state == "closed" and client.breaker.fail_counter == 0


async def test_unavailable_of_the_target_itself_is_retried_then_counted(servicer, transport):
    async def down(request: Any, context: Any) -> Any:
        raise status.Unavailable("warming up")

    servicer.list_models = down
    async with served(servicer, transport, retry_attempts=2, breaker_fail_max=5) as client:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await client.call(client.stub.ListModels, inference_pb2.ListModelsRequest())
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE and dependency_of(failed.value) is None
        assert servicer.calls == 2
        assert client.breaker.fail_counter == 2
        assert client_calls(client, "ListModels", "UNAVAILABLE") == 2


async def test_the_breaker_opens_on_failures_and_then_refuses_without_calling(servicer, transport):
    servicer.list_models = raising("unexpected")
    async with served(servicer, transport) as client:
        fail_max = client.breaker.circuit.fail_max
        for _ in range(fail_max):
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await client.call(client.stub.ListModels, inference_pb2.ListModelsRequest())
            assert failed.value.code() == grpc.StatusCode.INTERNAL
        assert client.breaker.state == "open"
        with pytest.raises(CircuitOpenError) as refused:
            await client.call(client.stub.ListModels, inference_pb2.ListModelsRequest())
        assert refused.value.target == client.target
        with pytest.raises(CircuitOpenError):
            await anext(client.stream(client.stub.Generate, inference_pb2.GenerateRequest()))
        assert servicer.calls == fail_max
        assert client_calls(client, "ListModels", "INTERNAL") == fail_max
        assert client_calls(client, "ListModels", "CIRCUIT_OPEN") == 1


async def test_business_errors_do_not_open_the_breaker(servicer, transport):
    servicer.list_models = raising("not-found")
    async with served(servicer, transport) as client:
        for _ in range(client.breaker.circuit.fail_max + 1):
            with pytest.raises(grpc.aio.AioRpcError):
                await client.call(client.stub.ListModels, inference_pb2.ListModelsRequest())
        assert client.breaker.state == "closed" and client.breaker.fail_counter == 0
        assert servicer.calls == client.breaker.circuit.fail_max + 1


@pytest.mark.parametrize("fault", ["not-found", "unexpected", "unavailable-dependency"])
async def test_an_error_mid_stream_arrives_after_the_messages_sent_before_it(servicer, transport, fault):
    async def two_then_fail(request: Any, context: Any) -> AsyncIterator[Any]:
        yield THREE_DELTAS[0]
        yield THREE_DELTAS[1]
        raise FAULTS[fault][0]()

    servicer.generate = two_then_fail
    _, code, details = FAULTS[fault]
    received = []
    async with served(servicer, transport) as client:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            async for message in client.stream(client.stub.Generate, inference_pb2.GenerateRequest()):
                received.append(message)
        assert received == THREE_DELTAS[:2]
        assert (failed.value.code(), failed.value.details()) == (code, details)
        # Never retried once a message arrived; the breaker counts the target's own failures only.
        assert servicer.calls == 1
        assert client.breaker.fail_counter == (1 if fault == "unexpected" else 0)


async def test_a_stream_that_fails_before_its_first_message_is_retried_when_unavailable(servicer, transport):
    async def unavailable_once(request: Any, context: Any) -> AsyncIterator[Any]:
        if servicer.calls == 1:
            raise status.Unavailable("warming up")
        yield FINAL

    servicer.generate = unavailable_once
    async with served(servicer, transport) as client:
        received = [m async for m in client.stream(client.stub.Generate, inference_pb2.GenerateRequest())]
    assert received == [FINAL]
    assert servicer.calls == 2
    assert client.breaker.fail_counter == 0


# --- deadlines and cancellation reach the handler --------------------------------------------------------


async def forever(request: Any, context: Any) -> Any:
    await asyncio.sleep(3600)
    return MODELS


async def one_then_forever(request: Any, context: Any) -> AsyncIterator[Any]:
    yield THREE_DELTAS[0]
    await asyncio.sleep(3600)
    yield FINAL


async def endless(request: Any, context: Any) -> AsyncIterator[Any]:
    while True:
        yield THREE_DELTAS[0]
        await asyncio.sleep(0.01)


async def test_a_passed_deadline_is_deadline_exceeded_and_cancels_the_handler(servicer, transport):
    servicer.list_models = forever
    async with served(servicer, transport) as client:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await client.call(client.stub.ListModels, inference_pb2.ListModelsRequest(), timeout=0.2)
        assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert await settled(servicer.cancelled, transport)
        assert servicer.calls == 1  # DEADLINE_EXCEEDED is not retried
        assert client.breaker.fail_counter == 1


async def test_a_stream_past_its_deadline_keeps_what_arrived_and_cancels_the_handler(servicer, transport):
    servicer.generate = one_then_forever
    received = []
    async with served(servicer, transport) as client:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            async for message in client.stream(
                client.stub.Generate, inference_pb2.GenerateRequest(), timeout=0.3
            ):
                received.append(message)
        assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert received == THREE_DELTAS[:1]
        assert await settled(servicer.cancelled, transport)
        assert client.breaker.fail_counter == 1


async def test_the_handler_sees_the_callers_deadline(servicer, transport):
    remaining: list[float | None] = []

    async def record(request: Any, context: Any) -> Any:
        remaining.append(context.time_remaining())
        return MODELS

    servicer.list_models = record
    async with served(servicer, transport) as client:
        await client.call(client.stub.ListModels, inference_pb2.ListModelsRequest(), timeout=3)
    [left] = remaining
    # Over the network gRPC rounds the timeout it sends up and dates its deadline by a cached clock: a few
    # milliseconds more than 3 s may be left on a busy machine (the default deadline is far from it).
    assert left is not None and 0 < left <= 3.1


async def test_cancelling_the_caller_cancels_the_unary_handler(servicer, transport):
    servicer.list_models = forever
    async with served(servicer, transport) as client:
        caller = asyncio.create_task(client.call(client.stub.ListModels, inference_pb2.ListModelsRequest()))
        await asyncio.wait_for(servicer.entered.wait(), 5)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        assert await settled(servicer.cancelled, transport)
        assert client_calls(client, "ListModels", "CANCELLED") == 1
        assert client.breaker.state == "closed" and client.breaker.fail_counter == 0


async def test_cancelling_the_consumer_cancels_the_stream_handler(servicer, transport):
    servicer.generate = endless
    async with served(servicer, transport) as client:
        started = asyncio.Event()

        async def consume() -> None:
            async with contextlib.aclosing(
                client.stream(client.stub.Generate, inference_pb2.GenerateRequest())
            ) as deltas:
                async for _ in deltas:
                    started.set()

        consumer = asyncio.create_task(consume())
        await asyncio.wait_for(started.wait(), 5)
        consumer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await consumer
        assert await settled(servicer.cancelled, transport)
        assert servicer.finished.is_set()
        assert client.breaker.fail_counter == 0


async def test_leaving_a_stream_early_runs_the_handlers_finally(servicer, transport):
    servicer.generate = endless
    async with served(servicer, transport) as client:
        async with contextlib.aclosing(
            client.stream(client.stub.Generate, inference_pb2.GenerateRequest())
        ) as deltas:
            async for message in deltas:
                assert message == THREE_DELTAS[0]
                break
        # In process, by the time aclosing is done; over the network, once the server hears of it.
        assert await settled(servicer.finished, transport)
        assert servicer.cancelled.is_set()
        assert client_calls(client, "Generate", "CANCELLED") == 1
        assert client.breaker.state == "closed" and client.breaker.fail_counter == 0


# --- the server's interceptors run in process too --------------------------------------------------------


async def test_the_metrics_interceptor_counts_each_call_by_method_and_code(servicer, transport):
    ok_before, not_found_before = handled("ListModels", "OK"), handled("ListModels", "NOT_FOUND")
    stream_before = handled("Generate", "OK")
    async with served(servicer, transport) as client:
        await client.call(client.stub.ListModels, inference_pb2.ListModelsRequest())
        assert await counted("ListModels", "OK", ok_before + 1) == ok_before + 1
        servicer.list_models = raising("not-found")
        with pytest.raises(grpc.aio.AioRpcError):
            await client.call(client.stub.ListModels, inference_pb2.ListModelsRequest())
        assert await counted("ListModels", "NOT_FOUND", not_found_before + 1) == not_found_before + 1
        assert [m async for m in client.stream(client.stub.Generate, inference_pb2.GenerateRequest())]
        assert await counted("Generate", "OK", stream_before + 1) == stream_before + 1
    in_flight = REGISTRY.get_sample_value(
        "chatterbot_grpc_server_in_flight", {"method": f"/{INFERENCE}/ListModels"}
    )
    assert in_flight == 0


async def test_in_process_the_call_is_counted_before_its_caller_has_the_answer(servicer):
    before = handled("ListModels", "OK")
    async with served(servicer, "local") as client:
        await client.call(client.stub.ListModels, inference_pb2.ListModelsRequest())
        assert handled("ListModels", "OK") == before + 1


class ChatModels(chat_pb2_grpc.ChatServiceServicer):
    """ChatService with two methods, behind chat_svc's own API key interceptor; says who called."""

    def __init__(self) -> None:
        self.callers: list[Any] = []

    async def ListModels(self, request: Any, context: Any) -> Any:
        self.callers.append(current_caller())
        return chat_pb2.ChatServiceListModelsResponse(models=MODELS.models)

    async def StreamChat(self, request: Any, context: Any) -> AsyncIterator[Any]:
        self.callers.append(current_caller())
        yield chat_pb2.StreamChatResponse(text="hi", conversation_id=request.turn.conversation_id)


CHAT_KEY = "local-test-service-key"


@contextlib.asynccontextmanager
async def chat_served(servicer: ChatModels, transport: str) -> AsyncIterator[GuardedClient[Any]]:
    interceptor = ApiKeyInterceptor(KeyResolver(service_keys=[CHAT_KEY]))
    async with served(
        servicer,
        transport,
        add=chat_pb2_grpc.add_ChatServiceServicer_to_server,
        stub=chat_pb2_grpc.ChatServiceStub,
        service_name="chatterbot.v1.ChatService",
        interceptors=(interceptor,),
    ) as client:
        yield client


@dataclass
class Outcome:
    code: grpc.StatusCode | None
    details: str | None


async def chat_outcomes(client: GuardedClient[Any], metadata: tuple[tuple[str, str], ...]) -> list[Outcome]:
    """How ListModels and StreamChat end with `metadata`: OK, or the code and details of the error."""
    outcomes = []
    calls = (
        lambda: client.call(
            client.stub.ListModels, chat_pb2.ChatServiceListModelsRequest(), metadata=metadata
        ),
        lambda: _drain(
            client.stream(
                client.stub.StreamChat,
                chat_pb2.StreamChatRequest(turn=chat_pb2.ChatTurn(conversation_id="c-1")),
                metadata=metadata,
            )
        ),
    )
    for call in calls:
        try:
            await call()
            outcomes.append(Outcome(grpc.StatusCode.OK, None))
        except grpc.aio.AioRpcError as error:
            outcomes.append(Outcome(error.code(), error.details()))
    return outcomes


async def _drain(stream: AsyncIterator[Any]) -> list[Any]:
    return [message async for message in stream]


@pytest.mark.parametrize(
    ("metadata", "code"),
    [
        ((), grpc.StatusCode.UNAUTHENTICATED),
        ((("x-api-key", "not-a-key"),), grpc.StatusCode.PERMISSION_DENIED),
        ((("x-api-key", CHAT_KEY),), grpc.StatusCode.OK),
    ],
    ids=["no-key", "wrong-key", "right-key"],
)
async def test_the_apps_own_interceptor_answers_unary_and_streaming_calls_alike(metadata, code):
    outcomes = {}
    for transport in TRANSPORTS:
        servicer = ChatModels()
        async with chat_served(servicer, transport) as client:
            outcomes[transport] = await chat_outcomes(client, metadata)
        if code == grpc.StatusCode.OK:
            assert [caller.kind for caller in servicer.callers] == [SERVICE, SERVICE], transport
        else:
            assert servicer.callers == [], transport
    assert [o.code for o in outcomes["network"]] == [code, code]
    assert outcomes["local"] == outcomes["network"]


async def test_a_method_the_servicer_leaves_to_its_base_class_is_unimplemented_both_ways():
    # The generated base class sets UNIMPLEMENTED on the context, then raises NotImplementedError.
    outcomes = {}
    for transport in TRANSPORTS:
        async with chat_served(ChatModels(), transport) as client:
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await client.call(client.stub.GetStatus, chat_pb2.GetStatusRequest())
            outcomes[transport] = (failed.value.code(), client.breaker.fail_counter)
    assert outcomes == dict.fromkeys(TRANSPORTS, (grpc.StatusCode.UNIMPLEMENTED, 0))


# --- which channel a client gets ------------------------------------------------------------------------


async def test_an_unregistered_target_gets_a_network_channel(servicer):
    async with served(servicer, "network") as client:
        assert isinstance(client.channel, grpc.aio.Channel)
        assert await client.call(client.stub.ListModels, inference_pb2.ListModelsRequest()) == MODELS


async def test_only_clients_made_after_register_and_before_unregister_call_in_process(servicer):
    app = GrpcApp(
        name="scripted",
        servicers=[(inference_pb2_grpc.add_InferenceServiceServicer_to_server, servicer)],
        service_names=[INFERENCE],
    )
    target = f"local-test-{next(_targets)}"
    settings = make_settings()
    before = GuardedClient(target, "127.0.0.1:1", inference_pb2_grpc.InferenceServiceStub, settings)
    local.register(target, build_local_server(app))
    try:
        during = GuardedClient(target, "127.0.0.1:1", inference_pb2_grpc.InferenceServiceStub, settings)
        assert local.local_server(target) is not None
    finally:
        local.unregister(target)
    after = GuardedClient(target, "127.0.0.1:1", inference_pb2_grpc.InferenceServiceStub, settings)
    try:
        assert isinstance(before.channel, grpc.aio.Channel)
        assert isinstance(during.channel, local.LocalChannel)
        assert isinstance(after.channel, grpc.aio.Channel)
        # The client made while registered keeps calling in process.
        assert await during.call(during.stub.ListModels, inference_pb2.ListModelsRequest()) == MODELS
        assert local.local_server(target) is None
    finally:
        for client in (before, during, after):
            await client.close()


async def test_an_unknown_method_in_process_is_unimplemented():
    server = local.LocalServer()
    stub = inference_pb2_grpc.InferenceServiceStub(local.LocalChannel(server))
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await stub.ListModels(inference_pb2.ListModelsRequest(), timeout=1)
    assert failed.value.code() == grpc.StatusCode.UNIMPLEMENTED
    with pytest.raises(grpc.aio.AioRpcError) as failed_stream:
        async for _ in stub.Generate(inference_pb2.GenerateRequest(), timeout=1):
            pass
    assert failed_stream.value.code() == grpc.StatusCode.UNIMPLEMENTED
