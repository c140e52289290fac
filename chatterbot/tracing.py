"""OpenTelemetry for every process: W3C trace context from the edge through every gRPC hop.

The propagator is always W3C `traceparent`, so a trace started by a client (or the edge) continues in
chat_svc, context_svc, inference_svc and store_svc. Spans are recorded and exported over OTLP/HTTP only when
`CHATTERBOT_OTEL_EXPORTER_OTLP_ENDPOINT` is set; otherwise tracing costs next to nothing.

Queued turns keep the trace across JetStream: `publishing()` wraps a job's publish in a producer span and puts its
`traceparent`/`tracestate` in the message headers, and `processing()` opens the worker's consumer span for a
delivery as a child of it. A child rather than a link: a job is the consequence of exactly one submit, so the one
trace of a turn shows the wait in the queue and everything the worker called. The headers are stored with the
message, so every redelivery is another child of the same producer span, with its attempt number.

Servers use OpenTelemetry's gRPC instrumentation. Clients (every `GuardedClient` channel) use
`client_tracing_interceptors()` below: OpenTelemetry's asyncio client interceptor awaits each unary call's status in
a task of its own, so cancelling the caller left the RPC, and the generation behind it, running.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator, Mapping

import grpc
from opentelemetry import propagate, trace
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from chatterbot.settings import Settings

log = logging.getLogger(__name__)
_configured = False
# Spans are made only where they are exported: with no OTLP endpoint, no request pays for tracing.
_exporting = False


def tracing_enabled() -> bool:
    """Whether this process exports spans (`setup_tracing` found an OTLP endpoint)."""
    return _exporting


def setup_tracing(service: str, settings: Settings) -> None:
    """Set the propagator, the tracer provider and the gRPC instrumentation of this process (once); with no
    OTLP endpoint set, nothing is instrumented."""
    global _configured, _exporting
    if _configured:
        return
    _configured = True
    propagate.set_global_textmap(CompositePropagator([TraceContextTextMapPropagator()]))
    if not settings.otel_exporter_otlp_endpoint:
        return
    _exporting = True
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    provider = TracerProvider(resource=Resource.create({"service.name": f"chatterbot-{service}"}))
    endpoint = settings.otel_exporter_otlp_endpoint.rstrip("/") + "/v1/traces"
    provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint), schedule_delay_millis=500)
    )
    trace.set_tracer_provider(provider)
    from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorServer

    GrpcAioInstrumentorServer().instrument()


def shutdown_tracing() -> None:
    """Flush spans still buffered (at process exit)."""
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.shutdown()


@contextlib.contextmanager
def publishing(subject: str, headers: dict[str, str], message_id: str) -> Iterator[None]:
    """A producer span around publishing message `message_id` on `subject`, its trace context added to
    `headers`; with nothing exported, neither span nor headers."""
    if not _exporting:
        yield
        return
    with trace.get_tracer(__name__).start_as_current_span(
        f"send {subject}",
        kind=SpanKind.PRODUCER,
        attributes={
            "messaging.system": "nats",
            "messaging.operation.type": "send",
            "messaging.destination.name": subject,
            "messaging.message.id": message_id,
        },
    ):
        propagate.inject(headers)
        yield


@contextlib.contextmanager
def processing(
    subject: str, headers: Mapping[str, str] | None, message_id: str, consumer: str, attempt: int
) -> Iterator[trace.Span]:
    """The consumer span of one delivery of a message, current while it runs, a child of the trace context in
    the message's `headers` (a trace of its own when they carry none); a non-recording span when nothing is
    exported."""
    if not _exporting:
        yield trace.INVALID_SPAN
        return
    with trace.get_tracer(__name__).start_as_current_span(
        f"process {subject}",
        context=propagate.extract(headers or {}),
        kind=SpanKind.CONSUMER,
        attributes={
            "messaging.system": "nats",
            "messaging.operation.type": "process",
            "messaging.destination.name": subject,
            "messaging.message.id": message_id,
            "messaging.consumer.group.name": consumer,
            "chatterbot.job.attempt": attempt,
        },
    ) as span:
        yield span


def client_tracing_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """The interceptors that trace a channel's unary and server-streaming calls (a channel files each
    interceptor under one kind of call only, so one object cannot serve both); none when nothing is
    exported."""
    return [_TracingUnaryUnary(), _TracingUnaryStream()] if _exporting else []


_PENDING_SPANS: set[asyncio.Future[None]] = set()


class _TracingClientInterceptor:
    """A client span per call, and its W3C trace context in the call's metadata.

    The call itself is handed back at once, so cancelling it (or the task awaiting it) cancels the RPC.
    """

    def _start(self, details: grpc.aio.ClientCallDetails) -> tuple[trace.Span, grpc.aio.ClientCallDetails]:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        service, _, name = method.lstrip("/").partition("/")
        span = trace.get_tracer(__name__).start_span(
            method.lstrip("/"),
            kind=SpanKind.CLIENT,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
        )
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        metadata = grpc.aio.Metadata(*tuple(details.metadata or ()))
        for key, value in carrier.items():
            metadata.add(key, value)
        # grpc.aio's ClientCallDetails is a namedtuple; types-grpcio declares only its fields.
        return span, details._replace(metadata=metadata)  # type: ignore[attr-defined]

    def _end_when_done(self, span: trace.Span, call: grpc.aio.Call) -> None:
        if not span.is_recording():
            span.end()
            return

        async def end() -> None:
            code = await call.code()
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            if code != grpc.StatusCode.OK:
                span.set_status(Status(StatusCode.ERROR, f"{code.name}: {await call.details()}"))
            span.end()

        def when_done(_: object) -> None:
            # Held until it ends: the event loop keeps only a weak reference to a task.
            task = asyncio.ensure_future(end())
            _PENDING_SPANS.add(task)
            task.add_done_callback(_PENDING_SPANS.discard)

        call.add_done_callback(when_done)

    async def _intercept(self, continuation, client_call_details, request):
        span, details = self._start(client_call_details)
        try:
            call = await continuation(details, request)
        except BaseException:
            span.end()
            raise
        self._end_when_done(span, call)
        return call


class _TracingUnaryUnary(_TracingClientInterceptor, grpc.aio.UnaryUnaryClientInterceptor):
    intercept_unary_unary = _TracingClientInterceptor._intercept


class _TracingUnaryStream(_TracingClientInterceptor, grpc.aio.UnaryStreamClientInterceptor):
    intercept_unary_stream = _TracingClientInterceptor._intercept
