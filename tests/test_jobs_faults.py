"""Queued chats under faults, on a mesh of their own (own NATS, slow simulated engine, short ack wait):
cancel, a worker SIGKILLed mid-generation, NATS killed with jobs queued, the dead-letter stream, priorities."""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import nats
import orjson
import pytest

from chatterbot.jetstream import JOBS_STREAM, PRIORITIES, JobEvent, events_subject
from chatterbot.v1 import chat_pb2, chat_pb2_grpc, store_pb2, store_pb2_grpc, types_pb2
from ops.embedded import free_port
from ops.launcher import Mesh, ServiceProcess
from tests.clients import read_stream, tokens_after_last_restart, wait_done
from tests.meshes import API_KEY, own_mesh


@pytest.fixture(scope="module")
def slow_mesh(servers, tmp_path_factory) -> Iterator[Mesh]:
    with own_mesh(
        servers,
        tmp_path_factory,
        "faults-mesh",
        own_nats=True,
        sim_itl_ms=15,
        sim_itl_at_max_ms=15,
        sim_mean_output_tokens=10_000,
        jobs_ack_wait_seconds=2.0,
        jobs_heartbeat_seconds=0.5,
        jobs_max_deliver=3,
        jobs_backoff_seconds=[0.2],
        worker_concurrency=2,
    ) as mesh:
        yield mesh


@pytest.fixture
def client(slow_mesh) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=slow_mesh.edge_url, headers={"X-API-Key": API_KEY}, timeout=30) as c:
        yield c


def extra_worker(mesh: Mesh, tmp_path) -> ServiceProcess:
    """A second worker process beside the mesh's own."""
    env = dict(mesh.services["worker"].env)
    port = free_port()
    env.update(CHATTERBOT_WORKER_ADDR=f"127.0.0.1:{port}", CHATTERBOT_METRICS_PORT="0")
    return ServiceProcess("worker", tmp_path, port, env)


def test_delete_stream_cancels_the_job(client):
    cid = client.post(
        "/stream-chat", json={"message": "cancel me", "user_id": "user-cancel-1", "max_tokens": 1024}
    ).json()["correlation_id"]
    assert read_stream(client, cid, stop_after=2)
    r = client.delete(f"/stream/{cid}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    events = read_stream(client, cid)
    assert events[-1][1] == "error" and orjson.loads(events[-1][2])["error"] == "cancelled"
    assert wait_done(client, cid) == {"status": "failed", "correlation_id": cid, "error": "cancelled"}


def test_worker_killed_mid_generation_is_redelivered_and_stored_once(slow_mesh, client, pg, tmp_path):
    worker_a = slow_mesh.services["worker"]
    # The simulator answers this prompt with all 400 tokens (its length is fixed by the prompt), 6 s at 15 ms a
    # token: the kill below lands mid-generation however fast the second worker starts.
    cid = client.post(
        "/stream-chat",
        json={"message": "survive a worker crash", "user_id": "user-crash-1", "max_tokens": 400},
    ).json()["correlation_id"]
    before_crash = read_stream(client, cid, stop_after=5)
    worker_b = extra_worker(slow_mesh, tmp_path)
    worker_b.start()
    try:
        worker_a.kill()  # SIGKILL: no goodbye, no nak; JetStream redelivers after ack_wait
        after_crash = read_stream(client, cid, last_event_id=before_crash[-1][0])
    finally:
        worker_a.start()
        worker_b.stop()
    events = before_crash + after_crash
    ids = [int(i) for i, _, _ in events]
    assert ids == list(range(1, len(events) + 1)), "an event was lost or repeated"
    assert any(orjson.loads(d).get("restart") for _, kind, d in events if kind == "message" and d != "[DONE]")
    assert events[-1][2] == "[DONE]"
    answer = wait_done(client, cid)["response"]
    assert tokens_after_last_restart(events) == answer
    stored = (
        pg.user("user-crash-1")
        .execute(
            "SELECT content FROM messages WHERE user_id = %s AND request_id = %s AND role = 'assistant'",
            ("user-crash-1", cid),
        )
        .fetchall()
    )
    assert stored == [(answer,)]


def test_nats_killed_while_jobs_are_queued_every_accepted_job_completes(slow_mesh, client):
    worker = slow_mesh.services["worker"]
    worker.stop()  # let jobs pile up in the stream
    try:
        accepted = [
            client.post(
                "/async-chat", json={"message": f"queued {i}", "user_id": "user-nats-1", "max_tokens": 10}
            ).json()["correlation_id"]
            for i in range(20)
        ]
        slow_mesh.servers["nats"].kill()
        slow_mesh.servers["nats"].start()
    finally:
        worker.start()
    results = [wait_done(client, cid, timeout=60) for cid in accepted]
    assert all("response" in r for r in results), results


def test_job_failing_every_try_goes_to_the_dead_letter_stream_and_replays(slow_mesh, client):
    inference = slow_mesh.services["inference"]
    inference.stop()
    try:
        cid = client.post(
            "/async-chat", json={"message": "doomed for now", "user_id": "user-dlq-1", "max_tokens": 10}
        ).json()["correlation_id"]
        failed = wait_done(client, cid, timeout=60)
        assert failed["status"] == "failed" and failed["error"]
        listing = cli(slow_mesh, "dlq", "list")
        assert cid in listing.stdout
        queue = client.get("/debug/queue-stats", headers={"X-API-Key": slow_mesh.keys.admin_key}).json()
        assert queue["jetstream"]["dlq_size"] >= 1
    finally:
        inference.start()
    replayed = cli(slow_mesh, "dlq", "replay", cid)
    assert replayed.returncode == 0, replayed.stderr
    deadline = time.monotonic() + 30
    while True:  # chat's breaker for inference may need its reset time before the retry succeeds
        done = wait_done(client, cid, timeout=30)
        if "response" in done or time.monotonic() > deadline:
            break
        cli(slow_mesh, "dlq", "replay", cid)
    assert "response" in done, done
    assert cid not in cli(slow_mesh, "dlq", "list").stdout


def cli(mesh: Mesh, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(Path(sys.executable).with_name("chatterbot")), *args],
        env=mesh.services["chat"].env,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def _submit_batch(address: str, count: int) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)

        async def one(i: int) -> None:
            turn = chat_pb2.ChatTurn(user_id="user-batch-1", message=f"batch {i}", max_tokens=10)
            await stub.SubmitChat(
                chat_pb2.SubmitChatRequest(turn=turn, priority=types_pb2.JOB_PRIORITY_BATCH),
                metadata=(("x-api-key", API_KEY),),
                timeout=30,
            )

        for start in range(0, count, 50):
            await asyncio.gather(*(one(i) for i in range(start, min(start + 50, count))))


def test_streaming_job_jumps_a_burst_of_batch_jobs(slow_mesh, client):
    asyncio.run(_submit_batch(slow_mesh.services["chat"].url, 1000))
    time.sleep(1.0)  # the workers are now busy with batch jobs
    started = time.perf_counter()
    cid = client.post(
        "/stream-chat", json={"message": "me first", "user_id": "user-prio-1", "max_tokens": 10}
    ).json()["correlation_id"]
    first = read_stream(client, cid, stop_after=1)
    first_token = time.perf_counter() - started
    assert first and orjson.loads(first[0][2])["token"]
    # One batch job's service time, from the results the workers stored.
    js_pending = _batch_pending(slow_mesh)
    assert js_pending > 800, "the batch burst should still be queued"
    service_times = _batch_service_times(client, slow_mesh)
    one_job = statistics.median(service_times)
    # The streaming job's own time to first token is small (sim TTFT) next to a job's service time.
    assert first_token < one_job + 0.5, (first_token, one_job)
    _purge_batch(slow_mesh)


def _batch_pending(mesh: Mesh) -> int:
    async def go() -> int:
        import nats

        nc = await nats.connect(mesh.servers["nats"].url)
        try:
            info = await nc.jetstream().consumer_info(JOBS_STREAM, PRIORITIES["batch"][1])
            return info.num_pending
        finally:
            await nc.close()

    return asyncio.run(go())


def _batch_service_times(client: httpx.Client, mesh: Mesh) -> list[float]:
    rows = []
    import psycopg

    for dsn in mesh.settings.postgres_shards or [mesh.settings.postgres_dsn]:
        with psycopg.connect(dsn) as conn:
            rows += conn.execute(
                "SELECT processing_time FROM job_results WHERE user_id = 'user-batch-1' AND status = %s",
                (types_pb2.JOB_STATUS_SUCCEEDED,),
            ).fetchall()
    assert rows
    return [r[0] for r in rows]


def _purge_batch(mesh: Mesh) -> None:
    async def go() -> None:
        import nats

        nc = await nats.connect(mesh.servers["nats"].url)
        try:
            await nc.jetstream().purge_stream(JOBS_STREAM, subject=PRIORITIES["batch"][0])
        finally:
            await nc.close()

    asyncio.run(go())


def test_a_job_finished_by_an_earlier_try_still_ends_its_stream(slow_mesh, client):
    """A try that stored its answer and died before publishing the stream's end: the next delivery runs nothing
    again and ends the stream with the stored answer, so a reader is not left with keep-alives forever."""
    worker = slow_mesh.services["worker"]
    env = worker.env
    worker.stop()
    try:
        cid = client.post(
            "/stream-chat", json={"message": "finished already", "user_id": "user-end-1", "max_tokens": 20}
        ).json()["correlation_id"]
        stored = "the answer an earlier try stored"

        async def earlier_try() -> None:
            # What that try left: two tokens on the events stream and a succeeded result in the store.
            nc = await nats.connect(env["CHATTERBOT_NATS_URL"])
            try:
                js = nc.jetstream()
                for seq, token in ((1, "the "), (2, "ans")):
                    await js.publish(events_subject(cid), JobEvent(seq, token).encode())
            finally:
                await nc.close()
            async with grpc.aio.insecure_channel(env["CHATTERBOT_STORE_ADDR"]) as channel:
                await store_pb2_grpc.StoreServiceStub(channel).PutJobResult(
                    store_pb2.PutJobResultRequest(
                        result=store_pb2.JobResult(
                            correlation_id=cid,
                            user_id="user-end-1",
                            status=types_pb2.JOB_STATUS_SUCCEEDED,
                            response=stored,
                            finish_reason=types_pb2.FINISH_REASON_STOP,
                        )
                    )
                )

        asyncio.run(earlier_try())
    finally:
        worker.start()
    events = read_stream(client, cid)
    assert [int(i) for i, _, _ in events] == list(range(1, len(events) + 1))
    assert events[-1][2] == "[DONE]"
    assert tokens_after_last_restart(events) == stored
    assert wait_done(client, cid)["response"] == stored
