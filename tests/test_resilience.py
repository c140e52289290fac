"""The edge under load and faults: every rung of the degradation ladder, the in-flight cap, body limits,
problem responses for unknown routes and methods, and a W3C trace through every gRPC hop."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from chatterbot.v1 import chat_pb2, chat_pb2_grpc, inference_pb2, inference_pb2_grpc, types_pb2
from ops.embedded import free_port
from ops.launcher import Mesh, ServiceProcess
from tests.meshes import API_KEY, own_mesh

LIGHT_MODEL = "chatterbot-sim-1b"


class Collector:
    """A real OTLP/HTTP endpoint: keeps (service, trace id, span name) of every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, str, str]] = []
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest.FromString(body)
                for resource_spans in request.resource_spans:
                    service = next(
                        a.value.string_value
                        for a in resource_spans.resource.attributes
                        if a.key == "service.name"
                    )
                    for scope in resource_spans.scope_spans:
                        for span in scope.spans:
                            collector.spans.append((service, span.trace_id.hex(), span.name))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def services_in(self, trace_id: str) -> set[str]:
        return {service for service, tid, _ in self.spans if tid == trace_id}


@pytest.fixture(scope="module")
def collector() -> Iterator[Collector]:
    c = Collector()
    yield c
    c.server.shutdown()


@pytest.fixture(scope="module")
def loaded_mesh(servers, collector, tmp_path_factory) -> Iterator[Mesh]:
    """One slow primary slot, a light model, a ladder with rungs one waiting sequence apart."""
    settings = {
        "sim_max_num_seqs": 1,
        "sim_itl_ms": 20,
        "sim_itl_at_max_ms": 20,
        "sim_mean_output_tokens": 10_000,
        "light_model_engine": "sim",
        "light_model_name": LIGHT_MODEL,
        "degrade_poll_seconds": 0.1,
        "degrade_reduced_context_waiting": 1,
        "degrade_light_model_waiting": 2,
        "degrade_cache_only_waiting": 3,
        "degrade_shed_waiting": 4,
        "reduced_context_token_budget": 1,
        "otel_exporter_otlp_endpoint": collector.url,
    }
    with own_mesh(servers, tmp_path_factory, "loaded-mesh", **settings) as mesh:
        yield mesh


@pytest.fixture
def client(loaded_mesh) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=loaded_mesh.edge_url, headers={"X-API-Key": API_KEY}, timeout=60) as c:
        yield c


@contextlib.contextmanager
def waiting_sequences(
    mesh: Mesh, waiting: int, client: httpx.Client, rung: str, tokens: int = 3000
) -> Iterator[None]:
    """Hold the primary model's one slot and `waiting` more sequences in its queue (each generating `tokens`
    tokens at 20 ms) until the block ends."""
    channel = grpc.insecure_channel(mesh.services["inference"].url)
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    request = inference_pb2.GenerateRequest(
        messages=[types_pb2.ChatMessage(role=types_pb2.ROLE_USER, content="hold the slot")],
        sampling=types_pb2.SamplingParams(max_tokens=tokens, temperature=0.7),
    )
    calls = [stub.Generate(request, timeout=120) for _ in range(waiting + 1)]
    try:
        deadline = time.monotonic() + 10
        while client.get("/health").json()["degradation"]["rung"] != rung:
            assert time.monotonic() < deadline, client.get("/health").json()
            time.sleep(0.05)
        yield
    finally:
        for call in calls:
            call.cancel()
        channel.close()
        deadline = time.monotonic() + 10
        while client.get("/health").json()["degradation"]["rung"] != "none" and time.monotonic() < deadline:
            time.sleep(0.05)


def chat(client: httpx.Client, message: str, **body) -> httpx.Response:
    return client.post("/chat", json={"message": message, "user_id": "user-ladder", "max_tokens": 10, **body})


def grpc_chat(mesh: Mesh, message: str, seed: int) -> chat_pb2.ChatResponse:
    with grpc.insecure_channel(mesh.services["chat"].url) as channel:
        turn = chat_pb2.ChatTurn(user_id="user-ladder", message=message, max_tokens=10, seed=seed)
        return chat_pb2_grpc.ChatServiceStub(channel).Chat(
            chat_pb2.ChatRequest(turn=turn), metadata=(("x-api-key", API_KEY),), timeout=30
        )


def test_no_load_no_rung(client):
    body = client.get("/health").json()
    assert body["status"] == "healthy" and body["degradation"] == {"rung": "none", "reason": ""}


def test_rung_1_shrinks_the_context_budget(loaded_mesh, client):
    first = chat(client, "first").json()
    second = chat(client, "second", conversation_id=first["conversation_id"]).json()
    assert "4 messages" in second["response"]
    # Short blockers: the third turn queues behind them on the primary model and must get its turn.
    with waiting_sequences(loaded_mesh, 1, client, "reduced_context", tokens=40):
        health = client.get("/health").json()
        assert health["status"] == "degraded"
        assert any(r.startswith("reduced_context") for r in health["reasons"])
        third = chat(client, "third", conversation_id=first["conversation_id"])
        assert third.status_code == 200, third.text
    # A budget of one token fits no earlier turn: only the system prompt and the new message.
    assert "2 messages" in third.json()["response"]


def test_rung_2_routes_to_the_light_model(loaded_mesh, client):
    with waiting_sequences(loaded_mesh, 2, client, "light_model"):
        started = time.perf_counter()
        r = chat(client, "light please")
        assert r.status_code == 200, r.text
        assert r.json()["response"].startswith(f"[simulated {LIGHT_MODEL}:")
        assert time.perf_counter() - started < 5  # not queued behind the primary model's backlog


def test_rung_3_answers_only_deterministic_repeats_from_the_cache(loaded_mesh, client):
    with waiting_sequences(loaded_mesh, 2, client, "light_model"):
        cached = grpc_chat(loaded_mesh, "the same question", seed=42)
    with waiting_sequences(loaded_mesh, 3, client, "cache_only"):
        again = grpc_chat(loaded_mesh, "the same question", seed=42)
        assert again.response == cached.response
        r = chat(client, "something new")
        assert r.status_code == 503, r.text
        assert int(r.headers["Retry-After"]) >= 1


def test_rung_4_sheds_new_work_with_503(loaded_mesh, client):
    with waiting_sequences(loaded_mesh, 4, client, "shed"):
        started = time.perf_counter()
        r = chat(client, "too busy?")
        assert r.status_code == 503, r.text
        assert int(r.headers["Retry-After"]) >= 1
        assert time.perf_counter() - started < 1
        assert "shedding load" in r.json()["detail"]
        assert any(reason.startswith("shed") for reason in client.get("/health").json()["reasons"])
        metrics = httpx.get(loaded_mesh.up_info()["metrics"]["chat"]).text
        assert "chatterbot_degradation_rung 4.0" in metrics
    assert chat(client, "calm again").status_code == 200


def test_edge_sheds_past_its_in_flight_cap(loaded_mesh, tmp_path):
    env = dict(loaded_mesh.services["edge"].env)
    port = free_port()
    env.update(CHATTERBOT_EDGE_PORT=str(port), CHATTERBOT_EDGE_MAX_IN_FLIGHT="1", CHATTERBOT_METRICS_PORT="0")
    edge = ServiceProcess("edge", tmp_path, port, env)
    edge.start()
    try:
        with httpx.Client(base_url=edge.url, headers={"X-API-Key": API_KEY}, timeout=30) as c:
            body = {"message": "hold on", "user_id": "user-cap", "max_tokens": 200, "stream": True}
            with c.stream("POST", "/chat", json=body) as held:
                assert held.status_code == 200
                refused = c.post("/chat", json={"message": "me too", "user_id": "user-cap"})
                assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
                assert refused.headers["content-type"].startswith("application/problem+json")
                assert c.get("/health").status_code == 200  # probes are never shed
            # The slot frees once the edge sees the disconnect and the generation is cancelled.
            deadline = time.monotonic() + 10
            while (
                r := c.post("/chat", json={"message": "now?", "user_id": "user-cap", "max_tokens": 10})
            ).status_code == 503:
                assert time.monotonic() < deadline, "the held stream's slot was never released"
                time.sleep(0.1)
            assert r.status_code == 200, r.text
    finally:
        edge.stop()


def test_bad_requests_get_problem_bodies_never_500(client):
    too_big = client.post(
        "/chat", content=b"{" + b" " * 2_000_000 + b"}", headers={"Content-Type": "application/json"}
    )
    assert too_big.status_code == 413 and too_big.headers["content-type"].startswith(
        "application/problem+json"
    )
    unknown = client.get("/no/such/route")
    assert unknown.status_code == 404 and unknown.json()["status"] == 404
    wrong_method = client.put("/chat", json={})
    assert wrong_method.status_code == 405 and wrong_method.json()["status"] == 405


def test_trace_context_flows_from_the_edge_through_every_grpc_hop(client, collector):
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    r = client.post(
        "/chat",
        json={"message": "trace me", "user_id": "user-trace", "max_tokens": 10},
        headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"},
    )
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 15
    expected = {
        "chatterbot-edge",
        "chatterbot-chat",
        "chatterbot-context",
        "chatterbot-inference",
        "chatterbot-store",
    }
    while collector.services_in(trace_id) != expected and time.monotonic() < deadline:
        time.sleep(0.2)
    assert collector.services_in(trace_id) == expected
