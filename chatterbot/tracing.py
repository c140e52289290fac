"""OpenTelemetry for every process: W3C trace context from the edge through every gRPC hop.

The propagator is always W3C `traceparent`, so a trace started by a client (or the edge) continues in
chat_svc, context_svc, inference_svc and store_svc. Spans are recorded and exported over OTLP/HTTP only when
`CHATTERBOT_OTEL_EXPORTER_OTLP_ENDPOINT` is set; otherwise tracing costs next to nothing.
"""

from __future__ import annotations

import logging

from opentelemetry import propagate, trace
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from chatterbot.settings import Settings

log = logging.getLogger(__name__)
_configured = False


def setup_tracing(service: str, settings: Settings) -> None:
    """Set the propagator, the tracer provider and the gRPC instrumentation of this process (once)."""
    global _configured
    if _configured:
        return
    _configured = True
    propagate.set_global_textmap(CompositePropagator([TraceContextTextMapPropagator()]))
    if settings.otel_exporter_otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider = TracerProvider(resource=Resource.create({"service.name": f"chatterbot-{service}"}))
        endpoint = settings.otel_exporter_otlp_endpoint.rstrip("/") + "/v1/traces"
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint), schedule_delay_millis=500))
        trace.set_tracer_provider(provider)
    from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorClient, GrpcAioInstrumentorServer

    GrpcAioInstrumentorClient().instrument()
    GrpcAioInstrumentorServer().instrument()


def shutdown_tracing() -> None:
    """Flush spans still buffered (at process exit)."""
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.shutdown()
