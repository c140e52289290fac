"""A chat turn degrades rather than fails when context is lost, and the mesh heals when servers come back."""

from __future__ import annotations

import time

import psycopg


def _wait_healthy(edge, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        body = edge.get("/health").json()
        if body["status"] == "healthy" or time.monotonic() > deadline:
            return body
        time.sleep(0.3)


def test_chat_answers_without_context_while_redis_is_down(servers, edge, pg):
    first = edge.post("/chat", json={"message": "first", "user_id": "user-redis-down"}).json()
    servers.valkey.kill()
    try:
        r = edge.post(
            "/chat",
            json={
                "message": "second",
                "user_id": "user-redis-down",
                "conversation_id": first["conversation_id"],
            },
        )
        assert r.status_code == 200, r.text
        # Earlier turns are not available: only the system prompt and the new message reach the model.
        assert "2 messages" in r.json()["response"]
        # The exchange is still stored: history does not depend on the cache.
        count = pg.count("SELECT count(*) FROM messages WHERE user_id = 'user-redis-down'")
        assert count == 4
        health = edge.get("/health").json()
        assert health["status"] == "degraded"
        assert health["components"]["redis"] == "down"
    finally:
        servers.valkey.start()
    assert _wait_healthy(edge)["status"] == "healthy"


def test_store_down_is_503_and_recovers(servers, edge):
    servers.postgres.kill()
    try:
        started = time.perf_counter()
        r = edge.post("/chat", json={"message": "are you there?", "user_id": "user-pg-down"})
        assert r.status_code == 503, r.text
        assert "Retry-After" in r.headers
        assert time.perf_counter() - started < 5
    finally:
        servers.postgres.start()
    assert _wait_healthy(edge)["status"] == "healthy"
    # Once chat_svc's breaker for store lets a trial through, turns are stored again.
    deadline = time.monotonic() + 15
    while True:
        r = edge.post("/chat", json={"message": "are you there now?", "user_id": "user-pg-down"})
        if r.status_code != 503 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert r.status_code == 200, r.text
    with psycopg.connect(
        servers.shard_dsn_for("user-pg-down")
    ) as conn:  # the killed server dropped earlier connections
        rows = conn.execute(
            "SELECT content FROM messages WHERE user_id = 'user-pg-down' AND role = 'user'"
        ).fetchall()
    assert rows == [("are you there now?",)]
