"""POST /chat through the whole mesh: edge → chat_svc → context_svc → inference_svc → store_svc, on real servers."""

from __future__ import annotations

import time

import grpc
import httpx
import orjson
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from chatterbot.v1 import chat_pb2, chat_pb2_grpc
from context_svc.turns import context_key, decode_turn
from tests.meshes import API_KEY, ShardConnections


def stored_messages(pg: ShardConnections, user_id: str, conversation_id: str) -> list[tuple[str, str]]:
    rows = (
        pg.user(user_id)
        .execute(
            "SELECT role, content FROM messages WHERE user_id = %s AND conversation_id = %s ORDER BY message_id",
            (user_id, conversation_id),
        )
        .fetchall()
    )
    return [(r[0], r[1]) for r in rows]


def context_turns(valkey: redis.Redis, user_id: str, conversation_id: str) -> list[dict]:
    return [decode_turn(item) for item in valkey.lrange(context_key(user_id, conversation_id), 0, -1)]


def test_chat_answers_through_the_whole_mesh(edge, pg, valkey):
    r = edge.post("/chat", json={"message": "Hello, mesh!", "user_id": "user-mesh-1", "max_tokens": 40})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"response", "conversation_id", "processing_time"}
    assert body["response"].startswith("[simulated")
    assert body["processing_time"] > 0

    assert stored_messages(pg, "user-mesh-1", body["conversation_id"]) == [
        ("user", "Hello, mesh!"),
        ("assistant", body["response"]),
    ]
    turns = context_turns(valkey, "user-mesh-1", body["conversation_id"])
    assert [(t["role"], t["content"]) for t in turns] == [
        ("user", "Hello, mesh!"),
        ("assistant", body["response"]),
    ]
    assert all(t["tokens"] > 0 for t in turns)


def test_second_chat_sees_the_first_turn_in_its_context(edge):
    first = edge.post("/chat", json={"message": "My name is Ada.", "user_id": "user-mesh-2"}).json()
    # The simulator labels its answer with what it was given: system prompt + this message.
    assert "2 messages" in first["response"]
    second = edge.post(
        "/chat",
        json={
            "message": "What is my name?",
            "user_id": "user-mesh-2",
            "conversation_id": first["conversation_id"],
        },
    ).json()
    assert second["conversation_id"] == first["conversation_id"]
    # System prompt, the first question, the first answer and the new question.
    assert "4 messages" in second["response"]


def store_history_reads(mesh) -> float:
    text = httpx.get(mesh.up_info()["metrics"]["store"], timeout=5).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "chatterbot_grpc_server_handled_total"
        and sample.labels["method"].endswith("ListMessages")
    )


def test_a_conversations_first_turn_is_cached_without_reading_history(mesh, edge, valkey):
    reads = store_history_reads(mesh)
    first = edge.post("/chat", json={"message": "A fresh start", "user_id": "user-mesh-fresh"}).json()
    second = edge.post(
        "/chat",
        json={"message": "And on", "user_id": "user-mesh-fresh", "conversation_id": first["conversation_id"]},
    ).json()
    assert "4 messages" in second["response"]
    edge.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "Fresh, the OpenAI way"}], "user": "user-mesh-fresh"},
    ).raise_for_status()
    assert store_history_reads(mesh) == reads
    # A conversation made empty: reading its context asks history (once); storing its first exchange does not.
    made = edge.post("/conversations", json={"user_id": "user-mesh-fresh", "title": "Empty"}).json()
    edge.post(
        "/chat",
        json={
            "message": "Into the empty one",
            "user_id": "user-mesh-fresh",
            "conversation_id": made["conversation_id"],
        },
    ).raise_for_status()
    assert store_history_reads(mesh) == reads + 1
    assert len(context_turns(valkey, "user-mesh-fresh", first["conversation_id"])) == 4
    assert len(context_turns(valkey, "user-mesh-fresh", made["conversation_id"])) == 2


def test_context_strings_reach_the_model_but_not_the_history(edge, pg):
    r = edge.post(
        "/chat", json={"message": "Hi", "user_id": "user-mesh-3", "context": ["The user likes tea."]}
    )
    assert "3 messages" in r.json()["response"]
    assert [role for role, _ in stored_messages(pg, "user-mesh-3", r.json()["conversation_id"])] == [
        "user",
        "assistant",
    ]


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b'{"message": "hi", "user_id": "ab"}',
        b'{"message": "", "user_id": "user-bad"}',
        b'{"message": "hi", "user_id": "user-bad", "max_tokens": 5000}',
        b'{"message": "hi", "user_id": "user-bad", "temperature": 3}',
        b'{"message": "hi", "user_id": "user-bad", "context": ["a","b","c","d","e","f","g","h","i","j","k"]}',
        b'{"message": "hi", "user_id": "user-bad", "conversation_id": "../../etc"}',
        b'{"user_id": "user-bad"}',
        b"[]",
    ],
)
def test_malformed_body_gets_422_and_touches_no_store(edge, pg, body):
    before = pg.count("SELECT count(*) FROM messages")
    r = edge.post("/chat", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["status"] == 422
    assert pg.count("SELECT count(*) FROM messages") == before
    assert pg.count("SELECT count(*) FROM users WHERE user_id = 'user-bad'") == 0


def test_api_key_missing_is_401_and_wrong_is_403(mesh):
    import httpx

    body = {"message": "hi", "user_id": "user-auth"}
    missing = httpx.post(f"{mesh.edge_url}/chat", json=body)
    assert missing.status_code == 401
    assert missing.headers["content-type"].startswith("application/problem+json")
    wrong = httpx.post(f"{mesh.edge_url}/chat", json=body, headers={"X-API-Key": "nope"})
    assert wrong.status_code == 403


def test_health_covers_every_service_and_server(edge):
    body = edge.get("/health").json()
    assert body["status"] == "healthy", body
    assert body["components"] == dict.fromkeys(
        ("chat", "context", "inference", "store", "worker", "postgres", "redis", "nats"), "up"
    )
    assert body["timestamp"]
    assert edge.get("/livez").status_code == 200
    assert edge.get("/readyz").status_code == 200


def test_streamed_chat_sends_tokens_then_done(edge, pg):
    with edge.stream(
        "POST", "/chat", json={"message": "Stream it", "user_id": "user-mesh-4", "stream": True}
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        data = [line[len("data: ") :] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    events = [orjson.loads(d) for d in data[:-1]]
    assert events[-1]["done"] is True and events[-1]["finish_reason"] in ("stop", "length")
    assert all(e["done"] is False for e in events[:-1])
    text = "".join(e["token"] for e in events)
    assert stored_messages(pg, "user-mesh-4", events[-1]["conversation_id"])[-1] == ("assistant", text)


def test_grpc_chat_with_key_metadata(mesh):
    with grpc.insecure_channel(mesh.services["chat"].url) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        turn = chat_pb2.ChatTurn(user_id="user-grpc", message="Hello over gRPC", max_tokens=20)
        reply = stub.Chat(chat_pb2.ChatRequest(turn=turn), metadata=(("x-api-key", API_KEY),), timeout=10)
        assert reply.response.startswith("[simulated") and reply.conversation_id

        with pytest.raises(grpc.RpcError) as missing:
            stub.Chat(chat_pb2.ChatRequest(turn=turn), timeout=10)
        assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as wrong:
            stub.Chat(chat_pb2.ChatRequest(turn=turn), metadata=(("x-api-key", "nope"),), timeout=10)
        assert wrong.value.code() == grpc.StatusCode.PERMISSION_DENIED
        bad = chat_pb2.ChatTurn(user_id="x", message="hi")
        with pytest.raises(grpc.RpcError) as invalid:
            stub.Chat(chat_pb2.ChatRequest(turn=bad), metadata=(("x-api-key", API_KEY),), timeout=10)
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_repeated_request_id_stores_one_exchange(mesh, pg):
    with grpc.insecure_channel(mesh.services["chat"].url) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        turn = chat_pb2.ChatTurn(
            user_id="user-idem", message="Once only", request_id="req-idem-1", conversation_id="conv-idem"
        )
        first = stub.Chat(chat_pb2.ChatRequest(turn=turn), metadata=(("x-api-key", API_KEY),), timeout=10)
        again = stub.Chat(chat_pb2.ChatRequest(turn=turn), metadata=(("x-api-key", API_KEY),), timeout=10)
    assert again.response == first.response
    assert len(stored_messages(pg, "user-idem", "conv-idem")) == 2


def test_stopped_inference_opens_the_breaker_and_chat_recovers(mesh, edge):
    """Runs last in this module: it stops and restarts inference_svc."""
    inference = mesh.services["inference"]
    inference.stop()
    try:
        for _ in range(5):  # enough failures to open chat_svc's breaker for inference
            started = time.perf_counter()
            r = edge.post("/chat", json={"message": "anyone there?", "user_id": "user-breaker"})
            elapsed = time.perf_counter() - started
            assert r.status_code == 503, r.text
            assert int(r.headers["Retry-After"]) >= 1
            assert r.headers["content-type"].startswith("application/problem+json")
            assert elapsed < 1.0, f"503 took {elapsed:.2f}s"
        assert "circuit open" in r.json()["detail"]
        health = edge.get("/health").json()
        assert health["status"] == "degraded" and health["components"]["inference"] == "down"
    finally:
        inference.start()
    deadline = time.monotonic() + 15
    while True:
        r = edge.post("/chat", json={"message": "back?", "user_id": "user-breaker"})
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert r.status_code == 200, r.text
    # /health follows the services' own health checks, which see inference back on their next probe.
    deadline = time.monotonic() + 15
    while (health := edge.get("/health").json())["status"] != "healthy" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert health["status"] == "healthy", health
