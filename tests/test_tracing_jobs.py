"""One trace for a queued turn: the job carries its submitter's W3C trace context through JetStream, so the
worker's span continues the trace from the edge down to inference and the store, on every delivery."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import nats
import pytest
from nats.aio.msg import Msg
from opentelemetry import context as otel_context
from opentelemetry import propagate
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span as OtlpSpan

from chat_svc.jobs import JobDeps, submit
from chat_svc.turn import TurnInput
from chatterbot import tracing
from chatterbot.guarded_client import GuardedClient
from chatterbot.jetstream import PRIORITIES
from chatterbot.v1 import store_pb2_grpc, types_pb2
from ops.embedded import free_port
from ops.launcher import Mesh
from tests.clients import read_stream, wait_done
from tests.meshes import API_KEY, own_mesh

CLIENT_SPAN_ID = "00f067aa0ba902b7"
SERVER = OtlpSpan.SpanKind.SPAN_KIND_SERVER
CLIENT = OtlpSpan.SpanKind.SPAN_KIND_CLIENT
PRODUCER = OtlpSpan.SpanKind.SPAN_KIND_PRODUCER
CONSUMER = OtlpSpan.SpanKind.SPAN_KIND_CONSUMER


@dataclass(frozen=True)
class Span:
    service: str
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    kind: int
    attributes: dict[str, object]

    @property
    def hop(self) -> tuple[str, int, str]:
        return self.service, self.kind, self.name.lstrip("/")


class Collector:
    """A real OTLP/HTTP endpoint on 127.0.0.1: decodes every export request and keeps its spans."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self._lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                request = ExportTraceServiceRequest.FromString(
                    self.rfile.read(int(self.headers["Content-Length"]))
                )
                collector.add(request)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add(self, request: ExportTraceServiceRequest) -> None:
        for resource_spans in request.resource_spans:
            service = next(
                a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"
            )
            for scope in resource_spans.scope_spans:
                for s in scope.spans:
                    attributes = {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in s.attributes}
                    span = Span(
                        service,
                        s.trace_id.hex(),
                        s.span_id.hex(),
                        s.parent_span_id.hex(),
                        s.name,
                        s.kind,
                        attributes,
                    )
                    with self._lock:
                        self.spans.append(span)

    def trace(self, trace_id: str) -> dict[str, Span]:
        with self._lock:
            return {s.span_id: s for s in self.spans if s.trace_id == trace_id}


def ancestry(spans: dict[str, Span], leaf: Span) -> list[tuple[str, int, str]]:
    """The hops from `leaf` up to the trace's first exported span, leaf first; ends with the id of the first
    span's parent when that one was not exported (the client's own)."""
    hops: list = [leaf.hop]
    span = leaf
    while span.parent_id in spans:
        span = spans[span.parent_id]
        hops.append(span.hop)
    hops.append(span.parent_id)
    return hops


def wait_for(condition, timeout: float = 20):
    """`condition()` once it is truthy; the last value when `timeout` runs out first."""
    deadline = time.monotonic() + timeout
    while not (value := condition()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return value


@pytest.fixture(scope="module")
def collector() -> Iterator[Collector]:
    c = Collector()
    yield c
    c.server.shutdown()


@pytest.fixture(scope="module")
def traced_mesh(servers, collector, tmp_path_factory) -> Iterator[Mesh]:
    """Every service in a process of its own, exporting spans to the collector; a simulated engine slow enough
    that a stream of a few hundred tokens is still generating when its worker is killed, and a short ack wait
    so the job is soon redelivered."""
    with own_mesh(
        servers,
        tmp_path_factory,
        "traced-mesh",
        own_nats=True,
        otel_exporter_otlp_endpoint=collector.url,
        sim_itl_ms=5,
        sim_itl_at_max_ms=5,
        sim_mean_output_tokens=10_000,
        jobs_ack_wait_seconds=2.0,
        jobs_heartbeat_seconds=0.5,
    ) as mesh:
        yield mesh


@pytest.fixture
def client(traced_mesh) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=traced_mesh.edge_url, headers={"X-API-Key": API_KEY}, timeout=30) as c:
        yield c


@pytest.fixture
async def published_jobs(traced_mesh) -> AsyncIterator[list[Msg]]:
    """Every job published to the mesh's jobs subjects from now on, as core NATS delivers a copy of each."""
    nc = await nats.connect(traced_mesh.settings.nats_url)
    seen: list[Msg] = []

    async def keep(msg: Msg) -> None:
        seen.append(msg)

    await nc.subscribe("chat.jobs.>", cb=keep)
    await nc.flush()
    try:
        yield seen
    finally:
        await nc.close()


async def published(jobs: list[Msg], correlation_id: str, timeout: float = 10) -> Msg:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for msg in jobs:
            if (msg.headers or {}).get("Nats-Msg-Id") == correlation_id:
                return msg
        await asyncio.sleep(0.05)
    raise AssertionError(f"job {correlation_id} was never published")


async def test_async_chat_is_one_trace_from_the_edge_through_the_worker_to_the_store(
    traced_mesh, client, collector, published_jobs
):
    trace_id = "5bf92f3577b34da6a3ce929d0e0e4736"
    async with httpx.AsyncClient(base_url=traced_mesh.edge_url, headers={"X-API-Key": API_KEY}) as edge:
        r = await edge.post(
            "/async-chat",
            json={"message": "trace my job", "user_id": "user-trace-job", "max_tokens": 10},
            headers={"traceparent": f"00-{trace_id}-{CLIENT_SPAN_ID}-01"},
        )
    assert r.status_code == 200, r.text
    cid = r.json()["correlation_id"]
    job = await published(published_jobs, cid)
    assert job.subject == PRIORITIES["interactive"][0]
    assert job.headers is not None and job.headers["Nats-Msg-Id"] == cid
    assert job.headers["traceparent"].split("-")[1] == trace_id
    assert "response" in await asyncio.to_thread(wait_done, client, cid)

    submit_chain = [
        ("chatterbot-chat", PRODUCER, "send chat.jobs.interactive"),
        ("chatterbot-chat", SERVER, "chatterbot.v1.ChatService/SubmitChat"),
        ("chatterbot-edge", CLIENT, "chatterbot.v1.ChatService/SubmitChat"),
        ("chatterbot-edge", SERVER, "POST /async-chat"),
        CLIENT_SPAN_ID,
    ]
    worker = [("chatterbot-worker", CONSUMER, "process chat.jobs.interactive"), *submit_chain]

    def leaf(service: str, name: str) -> Span | None:
        return next((s for s in collector.trace(trace_id).values() if s.hop == (service, SERVER, name)), None)

    def chains() -> dict[str, list] | None:
        leaves = {
            "inference": leaf("chatterbot-inference", "chatterbot.v1.InferenceService/Generate"),
            "store": leaf("chatterbot-store", "chatterbot.v1.StoreService/AppendExchange"),
        }
        if None in leaves.values():
            return None
        spans = collector.trace(trace_id)
        chains = {hop: ancestry(spans, span) for hop, span in leaves.items() if span is not None}
        return chains if all(chain[-1] == CLIENT_SPAN_ID for chain in chains.values()) else None

    found = await asyncio.to_thread(wait_for, chains)
    assert found is not None, sorted(s.hop for s in collector.trace(trace_id).values())
    assert found["inference"] == [
        ("chatterbot-inference", SERVER, "chatterbot.v1.InferenceService/Generate"),
        ("chatterbot-worker", CLIENT, "chatterbot.v1.InferenceService/Generate"),
        *worker,
    ]
    assert found["store"] == [
        ("chatterbot-store", SERVER, "chatterbot.v1.StoreService/AppendExchange"),
        ("chatterbot-worker", CLIENT, "chatterbot.v1.StoreService/AppendExchange"),
        *worker,
    ]
    (process,) = [s for s in collector.trace(trace_id).values() if s.kind == CONSUMER]
    assert process.attributes["messaging.message.id"] == cid
    assert process.attributes["chatterbot.job.attempt"] == 1
    assert process.attributes["chatterbot.job.outcome"] == "done"


def test_a_redelivered_job_continues_the_same_trace(traced_mesh, client, collector):
    trace_id = "6bf92f3577b34da6a3ce929d0e0e4736"
    worker = traced_mesh.services["worker"]
    # 600 tokens at 5 ms: still generating when the worker is killed after the first events.
    r = client.post(
        "/stream-chat",
        json={"message": "trace my retried job", "user_id": "user-trace-retry", "max_tokens": 600},
        headers={"traceparent": f"00-{trace_id}-{CLIENT_SPAN_ID}-01"},
    )
    assert r.status_code == 200, r.text
    cid = r.json()["correlation_id"]
    assert read_stream(client, cid, stop_after=2)
    worker.kill()  # SIGKILL: the first try ends unacknowledged, its span unsent; JetStream redelivers
    worker.start()
    assert "response" in wait_done(client, cid, timeout=60)

    def redelivery() -> Span | None:
        return next(
            (
                s
                for s in collector.trace(trace_id).values()
                if s.kind == CONSUMER and s.attributes["chatterbot.job.attempt"] == 2
            ),
            None,
        )

    second = wait_for(redelivery)
    spans = collector.trace(trace_id)
    assert second is not None, sorted(s.hop for s in spans.values())
    assert second.attributes["messaging.message.id"] == cid
    assert second.attributes["chatterbot.job.outcome"] == "done"
    assert ancestry(spans, second) == [
        ("chatterbot-worker", CONSUMER, "process chat.jobs.streaming"),
        ("chatterbot-chat", PRODUCER, "send chat.jobs.streaming"),
        ("chatterbot-chat", SERVER, "chatterbot.v1.ChatService/SubmitChat"),
        ("chatterbot-edge", CLIENT, "chatterbot.v1.ChatService/SubmitChat"),
        ("chatterbot-edge", SERVER, "POST /stream-chat"),
        CLIENT_SPAN_ID,
    ]
    # The second try's calls hang under its own span, in the same trace.
    calls = {s.name for s in spans.values() if s.kind == CLIENT and s.parent_id == second.span_id}
    assert "chatterbot.v1.InferenceService/Generate" in calls


async def test_with_tracing_off_a_job_carries_no_trace_headers(traced_mesh, published_jobs, monkeypatch):
    # This process exports nothing: even with a caller's trace context current, the job is published as it
    # always was, with its dedupe id alone.
    monkeypatch.setattr(tracing, "_exporting", False)
    parent = propagate.extract({"traceparent": f"00-7bf92f3577b34da6a3ce929d0e0e4736-{CLIENT_SPAN_ID}-01"})
    store = GuardedClient(
        "store", traced_mesh.services["store"].url, store_pb2_grpc.StoreServiceStub, traced_mesh.settings
    )
    nc = await nats.connect(traced_mesh.settings.nats_url)
    token = otel_context.attach(parent)
    try:
        deps = JobDeps(nc.jetstream(), nc, store, result_ttl_seconds=60)
        turn = TurnInput(user_id="user-untraced", message="no trace here", max_tokens=5)
        cid = await submit(deps, turn, types_pb2.JOB_PRIORITY_BATCH)
    finally:
        otel_context.detach(token)
        await nc.close()
        await store.close()
    job = await published(published_jobs, cid)
    assert job.subject == PRIORITIES["batch"][0]
    assert job.headers == {"Nats-Msg-Id": cid}
