"""Queued chats on JetStream: /async-chat + /check-response, /stream-chat + /stream with resume, cancel."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import httpx
import orjson
import pytest

from ops.embedded import free_port
from ops.launcher import Mesh, ServiceProcess
from tests.clients import read_stream, tokens_after_last_restart, wait_done
from tests.meshes import ADMIN_KEY, API_KEY, own_mesh


def test_async_chat_answers_through_check_response(edge, pg):
    r = edge.post(
        "/async-chat", json={"message": "queued hello", "user_id": "user-async-1", "max_tokens": 30}
    )
    assert r.status_code == 200, r.text
    accepted = r.json()
    assert accepted["status"] == "processing" and accepted["message"]
    cid = accepted["correlation_id"]
    assert accepted["check_endpoint"] == f"/check-response/{cid}"
    done = wait_done(edge, cid)
    assert set(done) == {"response", "conversation_id", "processing_time"}
    assert done["response"].startswith("[simulated")
    # Reading a result does not delete it.
    assert edge.get(f"/check-response/{cid}").json() == done
    stored = (
        pg.user("user-async-1")
        .execute(
            "SELECT content FROM messages WHERE user_id = %s AND request_id = %s AND role = 'assistant'",
            ("user-async-1", cid),
        )
        .fetchall()
    )
    assert stored == [(done["response"],)]


def test_check_response_of_an_unknown_id_is_404(edge):
    assert edge.get("/check-response/not-a-correlation-id").status_code == 404
    assert edge.get("/check-response/" + "0" * 32 + ".dXNlci1ub2JvZHk").status_code == 404
    assert edge.get("/stream/not-a-correlation-id").status_code == 404


def test_stream_chat_streams_tokens_then_done(edge, pg):
    accepted = edge.post("/stream-chat", json={"message": "stream me", "user_id": "user-stream-1"}).json()
    assert accepted["status"] == "streaming"
    cid = accepted["correlation_id"]
    assert accepted["stream_endpoint"].startswith(f"/stream/{cid}?ticket=")
    events = read_stream(edge, cid)
    ids = [int(i) for i, _, _ in events]
    assert ids == list(range(1, len(events) + 1))
    assert events[-1][2] == "[DONE]"
    final = orjson.loads(events[-2][2])
    assert final["done"] is True and final["finish_reason"] in ("stop", "length")
    assert final["usage"]["completion_tokens"] > 0
    text = tokens_after_last_restart(events)
    assert text == wait_done(edge, cid)["response"]


def test_dropped_stream_resumes_from_last_event_id(edge):
    cid = edge.post(
        "/stream-chat", json={"message": "resume me", "user_id": "user-stream-2", "max_tokens": 200}
    ).json()["correlation_id"]
    first = read_stream(edge, cid, stop_after=3)
    rest = read_stream(edge, cid, last_event_id=first[-1][0])
    assert int(rest[0][0]) == int(first[-1][0]) + 1  # nothing lost, nothing repeated
    everything = first + rest
    assert [int(i) for i, _, _ in everything] == list(range(1, len(everything) + 1))
    assert tokens_after_last_restart(everything) == wait_done(edge, cid)["response"]


def test_finished_stream_replays_whole(edge):
    cid = edge.post("/stream-chat", json={"message": "replay me", "user_id": "user-stream-3"}).json()[
        "correlation_id"
    ]
    done = wait_done(edge, cid)
    events = read_stream(edge, cid)
    assert events[-1][2] == "[DONE]"
    assert tokens_after_last_restart(events) == done["response"]


def test_replays_leave_no_consumer_behind(edge):
    cid = edge.post("/stream-chat", json={"message": "replay me often", "user_id": "user-stream-4"}).json()[
        "correlation_id"
    ]
    wait_done(edge, cid)
    admin = {"X-API-Key": ADMIN_KEY}
    before = edge.get("/debug/queue-stats", headers=admin).json()["response_queue"]["consumer_count"]
    for _ in range(3):
        assert read_stream(edge, cid)[-1][2] == "[DONE]"
    # NATS caps a stream's consumers (1,000 by default): a replay's consumer goes as soon as it is read, not
    # after the 30 s it would take to expire.
    deadline = time.monotonic() + 5
    while (
        count := edge.get("/debug/queue-stats", headers=admin).json()["response_queue"]["consumer_count"]
    ) > before:
        assert time.monotonic() < deadline, f"{count - before} replay consumers left behind"
        time.sleep(0.1)


def test_queue_stats_need_an_admin_key(edge, mesh):
    assert edge.get("/debug/queue-stats").status_code == 403
    r = edge.get("/debug/queue-stats", headers={"X-API-Key": ADMIN_KEY})
    assert r.status_code == 200, r.text
    body = r.json()
    for queue in ("chat_queue", "response_queue", "batch_queue"):
        assert set(body[queue]) == {"message_count", "consumer_count"}
    assert set(body["jetstream"]["consumers"]) == {"streaming", "interactive", "batch"}
    assert "dlq_size" in body["jetstream"]


def test_500_async_chats_at_once_all_complete_with_their_own_answers(mesh, pg):
    import asyncio

    async def run() -> list[tuple[str, dict]]:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(
            base_url=mesh.edge_url, headers={"X-API-Key": API_KEY}, timeout=60, limits=limits
        ) as client:

            async def submit(i: int) -> str:
                r = await client.post(
                    "/async-chat",
                    json={
                        "message": f"question number {i}",
                        "user_id": f"user-many-{i % 25}",
                        "max_tokens": 12,
                    },
                )
                assert r.status_code == 200, r.text
                return r.json()["correlation_id"]

            cids = await asyncio.gather(*(submit(i) for i in range(500)))
            assert len(set(cids)) == 500

            async def result(cid: str) -> dict:
                while True:
                    body = (await client.get(f"/check-response/{cid}")).json()
                    if body.get("status") != "pending":
                        return body
                    await asyncio.sleep(0.5)

            results = await asyncio.wait_for(asyncio.gather(*(result(c) for c in cids)), timeout=180)
            return list(zip(cids, results, strict=True))

    for cid, body in asyncio.run(run()):
        assert "response" in body, body
        user_id = cid_user(cid)
        stored = (
            pg.user(user_id)
            .execute(
                "SELECT m.content, u.content FROM messages m JOIN messages u ON u.user_id = m.user_id "
                "AND u.request_id = m.request_id AND u.role = 'user' "
                "WHERE m.user_id = %s AND m.request_id = %s AND m.role = 'assistant'",
                (user_id, cid),
            )
            .fetchall()
        )
        assert len(stored) == 1 and stored[0][0] == body["response"]
        assert stored[0][1].startswith("question number ")


def cid_user(correlation_id: str) -> str:
    from chat_svc.jobs import user_of

    return user_of(correlation_id)


# --- keep-alives, and a draining edge handing its streams over to another replica ---


@pytest.fixture(scope="module")
def paced_mesh(servers, tmp_path_factory) -> Iterator[Mesh]:
    """A mesh whose answers start after a second and then take a few seconds; keep-alives every 0.2 s."""
    with own_mesh(
        servers,
        tmp_path_factory,
        "jobs-paced-mesh",
        own_nats=True,
        sse_keepalive_seconds=0.2,
        sim_ttft_ms=1000,
        sim_itl_ms=20,
        sim_itl_at_max_ms=20,
        sim_mean_output_tokens=10_000,
    ) as mesh:
        yield mesh


def test_an_idle_stream_gets_keepalive_comments(paced_mesh):
    with httpx.Client(base_url=paced_mesh.edge_url, headers={"X-API-Key": API_KEY}, timeout=30) as edge:
        cid = edge.post(
            "/stream-chat", json={"message": "take your time", "user_id": "user-paced-1", "max_tokens": 10}
        ).json()["correlation_id"]
        lines = []
        with edge.stream("GET", f"/stream/{cid}") as r:
            for line in r.iter_lines():
                lines.append(line)
                if line.startswith("data:"):
                    break
    # The first token is a second away: the wait is filled with comments, which SSE clients ignore.
    assert lines.count(": ping") >= 2, lines


def test_a_draining_edge_ends_queued_streams_and_another_replica_resumes_them(paced_mesh, tmp_path):
    edge_process = ServiceProcess("edge", tmp_path, free_port(), dict(paced_mesh.services["edge"].env))
    edge_process.env["CHATTERBOT_EDGE_PORT"] = str(edge_process.port)
    edge_process.env["CHATTERBOT_METRICS_PORT"] = "0"
    edge_process.start()
    with httpx.Client(base_url=edge_process.url, headers={"X-API-Key": API_KEY}, timeout=30) as draining:
        cid = draining.post(
            "/stream-chat", json={"message": "hand me over", "user_id": "user-paced-2", "max_tokens": 150}
        ).json()["correlation_id"]
        first: list[tuple[str, str, str]] = []
        began = time.monotonic()
        with draining.stream("GET", f"/stream/{cid}") as r:
            for line in r.iter_lines():
                if line.startswith("id:"):
                    first.append((line[3:].strip(), "message", ""))
                elif line.startswith("data:") and first:
                    first[-1] = (first[-1][0], "message", line[5:].strip())
                    if len(first) == 3:
                        edge_process._proc.send_signal(signal.SIGTERM)
                        began = time.monotonic()
        # The stream ended at once, not when the answer (about 3 s more) or the drain's grace period did.
        assert time.monotonic() - began < 2
    edge_process.stop()
    assert 3 <= len(first) < 150
    with httpx.Client(base_url=paced_mesh.edge_url, headers={"X-API-Key": API_KEY}, timeout=30) as other:
        rest = read_stream(other, cid, last_event_id=first[-1][0])
        everything = first + rest
        assert [int(i) for i, _, _ in everything] == list(range(1, len(everything) + 1))
        assert tokens_after_last_restart(everything) == wait_done(other, cid)["response"]
