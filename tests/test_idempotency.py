"""`Idempotency-Key` on the chat routes, on a real mesh (Valkey, NATS, PostgreSQL): a retried request runs one
turn and gets the first answer, across edges and across an edge that died mid-request."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import openai
import orjson
import pytest
from starlette.testclient import TestClient

from chatterbot.api_keys import KeyResolver
from edge.app import create_app
from edge.idempotency import KEY_PREFIX, REPLAYED_HEADER, Keyed, keyed
from edge.protocol import ChatRequest
from ops.embedded import free_port
from ops.launcher import Mesh, ServiceProcess
from tests.clients import new_user, sse, wait_done
from tests.meshes import ADMIN_KEY, API_KEY, mesh_settings, own_mesh

# Tokens come 10 ms apart and answers run to max_tokens, so a test can tell how long a turn is in flight.
ITL_MS = 10
LEASE_SECONDS = 1.0


@pytest.fixture(scope="module")
def idem_mesh(servers, tmp_path_factory) -> Iterator[Mesh]:
    with own_mesh(
        servers,
        tmp_path_factory,
        "idempotency",
        own_nats=True,
        sim_itl_ms=ITL_MS,
        sim_itl_at_max_ms=ITL_MS,
        sim_mean_output_tokens=10_000,
        idempotency_lease_seconds=LEASE_SECONDS,
    ) as mesh:
        yield mesh


@pytest.fixture
def edge(idem_mesh) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=idem_mesh.edge_url, headers={"X-API-Key": API_KEY}, timeout=30) as client:
        yield client


@contextmanager
def own_edge(mesh: Mesh, log_dir, **env: str) -> Iterator[ServiceProcess]:
    """An edge replica of the mesh's, with settings of its own."""
    port = free_port()
    process = ServiceProcess(
        "edge",
        log_dir,
        port,
        {
            **mesh.services["edge"].env,
            "CHATTERBOT_EDGE_PORT": str(port),
            "CHATTERBOT_METRICS_PORT": "0",
            **env,
        },
    )
    process.start(timeout=60)
    try:
        yield process
    finally:
        process.stop()


def as_keyed(key: str, api_key: str = API_KEY) -> dict[str, str]:
    return {"X-API-Key": api_key, "Idempotency-Key": key}


def chat_body(user: str, **extra) -> dict:
    return {"message": "Hello once", "user_id": user, "max_tokens": 10, **extra}


def the_keyed(body: dict, key: str, route: str = "/chat", api_key: str = API_KEY) -> Keyed:
    """The edge's view of a keyed request: where its record is, and the request id its turn runs with."""
    known, principal = KeyResolver(service_keys=[API_KEY], admin_keys=[ADMIN_KEY]).peek(api_key)
    assert known and principal is not None
    return keyed(principal.key_id, key, route, ChatRequest(**body))


def answers(pg, user: str) -> list[tuple[str, str]]:
    """(request id, content) of every stored answer of `user`."""
    return (
        pg.user(user)
        .execute(
            "SELECT request_id, content FROM messages WHERE user_id = %s AND role = 'assistant'", (user,)
        )
        .fetchall()
    )


def streamed_text(events: list[tuple[str, str, str]]) -> str:
    return "".join(orjson.loads(d)["token"] for _, kind, d in events if kind == "message" and d != "[DONE]")


def test_the_same_key_twice_runs_one_turn_and_replays_the_first_answer(edge, pg, valkey):
    user, key = new_user(), str(uuid.uuid4())
    records = len(valkey.keys(f"{KEY_PREFIX}:*"))
    assert edge.post("/chat", json=chat_body(user, message="no key")).status_code == 200
    assert len(valkey.keys(f"{KEY_PREFIX}:*")) == records  # a request without the header keeps nothing

    first = edge.post("/chat", json=chat_body(user), headers=as_keyed(key))
    again = edge.post("/chat", json=chat_body(user), headers=as_keyed(key))
    assert first.status_code == again.status_code == 200, (first.text, again.text)
    assert REPLAYED_HEADER not in first.headers and again.headers[REPLAYED_HEADER] == "true"
    assert again.content == first.content
    once = the_keyed(chat_body(user), key)
    assert first.headers["X-Request-ID"] == again.headers["X-Request-ID"] == once.request_id
    keyed_answers = [a for a in answers(pg, user) if a[0] == once.request_id]
    assert keyed_answers == [(once.request_id, first.json()["response"])]
    assert len(answers(pg, user)) == 2  # the request without a key, and the keyed one once
    assert 0 < valkey.pttl(once.record_key) <= 86_400_000


def test_concurrent_duplicates_run_one_turn(idem_mesh, pg):
    user, key = new_user(), str(uuid.uuid4())
    body = chat_body(user, max_tokens=80)  # about a second in flight

    def send(_: int) -> httpx.Response:
        return httpx.post(f"{idem_mesh.edge_url}/chat", json=body, headers=as_keyed(key), timeout=30)

    with ThreadPoolExecutor(3) as pool:
        responses = list(pool.map(send, range(3)))
    assert [r.status_code for r in responses] == [200, 200, 200], [r.text for r in responses]
    assert len({r.content for r in responses}) == 1
    assert sorted(r.headers.get(REPLAYED_HEADER, "") for r in responses) == ["", "true", "true"]
    assert len(answers(pg, user)) == 1


def test_the_same_key_with_another_body_or_route_is_422(edge, pg):
    user, key = new_user(), str(uuid.uuid4())
    assert edge.post("/chat", json=chat_body(user), headers=as_keyed(key)).status_code == 200
    for route, body in (
        ("/chat", chat_body(user, message="something else")),
        ("/async-chat", chat_body(user)),
    ):
        r = edge.post(route, json=body, headers=as_keyed(key))
        assert r.status_code == 422, r.text
        assert r.headers["content-type"] == "application/problem+json"
        assert "Idempotency-Key was used with another request" in r.json()["detail"]
    assert len(answers(pg, user)) == 1


def test_two_api_keys_use_the_same_idempotency_key_independently(edge, pg):
    user, key = new_user(), str(uuid.uuid4())
    mine = edge.post("/chat", json=chat_body(user), headers=as_keyed(key))
    theirs = edge.post("/chat", json=chat_body(user), headers=as_keyed(key, ADMIN_KEY))
    assert mine.status_code == theirs.status_code == 200
    assert REPLAYED_HEADER not in mine.headers and REPLAYED_HEADER not in theirs.headers
    assert mine.json()["conversation_id"] != theirs.json()["conversation_id"]
    assert len(answers(pg, user)) == 2


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_first_4xx_is_replayed_as_that_4xx(edge, pg, stream):
    user, key = new_user(), str(uuid.uuid4())
    body = chat_body(user, model="no-such-model", stream=stream)
    first = edge.post("/chat", json=body, headers=as_keyed(key))
    again = edge.post("/chat", json=body, headers=as_keyed(key))
    assert first.status_code == again.status_code == 404, first.text
    assert again.headers[REPLAYED_HEADER] == "true" and again.json() == first.json()
    assert again.headers["content-type"] == "application/problem+json"
    assert answers(pg, user) == []


@pytest.mark.parametrize(
    "value",
    ["", "k" * 256, b"caf\xe9", "tab\there"],
    ids=["empty", "too-long", "not-ascii", "control-character"],
)
def test_a_malformed_key_is_400(edge, value):
    r = edge.post("/chat", json=chat_body(new_user()), headers={"Idempotency-Key": value})
    assert r.status_code == 400, r.text
    assert "Idempotency-Key must be 1 to 255 printable ASCII characters" in r.json()["detail"]


def test_the_longest_key_is_taken(edge):
    r = edge.post("/chat", json=chat_body(new_user()), headers={"Idempotency-Key": "k" * 255})
    assert r.status_code == 200, r.text


def test_a_key_expires_after_its_ttl(idem_mesh, pg, tmp_path):
    user, key = new_user(), str(uuid.uuid4())
    with (
        own_edge(idem_mesh, tmp_path, CHATTERBOT_IDEMPOTENCY_TTL_SECONDS="2") as short,
        httpx.Client(base_url=short.url, timeout=30) as client,
    ):
        first = client.post("/chat", json=chat_body(user), headers=as_keyed(key))
        assert first.status_code == 200, first.text
        replayed = client.post("/chat", json=chat_body(user), headers=as_keyed(key))
        assert replayed.headers.get(REPLAYED_HEADER) == "true"
        time.sleep(2.2)
        # Expired: the key is free for another request, which runs a turn of its own.
        other = client.post("/chat", json=chat_body(user, message="another"), headers=as_keyed(key))
        assert other.status_code == 200 and REPLAYED_HEADER not in other.headers, other.text
        assert len(answers(pg, user)) == 2
        time.sleep(2.2)
        # The first body again runs with the first turn's request id: the store answers with that turn.
        rerun = client.post("/chat", json=chat_body(user), headers=as_keyed(key))
    assert rerun.status_code == 200 and REPLAYED_HEADER not in rerun.headers
    assert rerun.json()["conversation_id"] == first.json()["conversation_id"]
    assert rerun.json()["response"] == first.json()["response"]
    assert len(answers(pg, user)) == 2


@pytest.mark.parametrize("route", ["/async-chat", "/stream-chat"])
def test_a_queued_turn_submitted_twice_has_one_correlation_id_and_one_result(edge, pg, route):
    user, key = new_user(), str(uuid.uuid4())
    first = edge.post(route, json=chat_body(user), headers=as_keyed(key))
    again = edge.post(route, json=chat_body(user), headers=as_keyed(key))
    assert first.status_code == again.status_code == 200, (first.text, again.text)
    assert again.headers[REPLAYED_HEADER] == "true"
    cid = first.json()["correlation_id"]
    assert again.json()["correlation_id"] == cid
    assert again.json()["stream_endpoint"].startswith(f"/stream/{cid}?ticket=")
    done = wait_done(edge, cid)
    assert done["response"], done
    time.sleep(0.5)  # room for a second job to have run, had one been queued
    assert pg.count("SELECT count(*) FROM job_results WHERE correlation_id = %s", (cid,)) == 1
    assert answers(pg, user) == [(cid, done["response"])]


def test_a_chat_stream_is_replayed_as_its_events_and_refused_while_it_runs(edge, pg):
    user, key = new_user(), str(uuid.uuid4())
    body = chat_body(user, stream=True, max_tokens=200)  # two seconds in flight
    with edge.stream("POST", "/chat", json=body, headers=as_keyed(key)) as running:
        assert running.status_code == 200
        events = sse(running.iter_lines())
        first = [next(events)]
        busy = edge.post("/chat", json=body, headers=as_keyed(key))
        assert busy.status_code == 409 and busy.headers["Retry-After"] == "1", busy.text
        first += list(events)
    with edge.stream("POST", "/chat", json=body, headers=as_keyed(key)) as replayed:
        assert replayed.headers[REPLAYED_HEADER] == "true"
        assert replayed.headers["content-type"].startswith("text/event-stream")
        again = list(sse(replayed.iter_lines()))
    # The tokens come merged into one event; then the first's done event, and [DONE].
    assert [i for i, _, _ in again] == ["1", "2", "3"]
    assert again[1:] == [("2", "message", first[-2][2]), ("3", "message", "[DONE]")]
    assert orjson.loads(again[1][2])["done"] is True
    assert streamed_text(again) == streamed_text(first)
    assert answers(pg, user) == [(the_keyed(body, key).request_id, streamed_text(first))]


def test_a_stream_that_failed_frees_its_key(edge, pg):
    user, key = new_user(), str(uuid.uuid4())
    body = chat_body(user, stream=True, max_tokens=200)
    with edge.stream("POST", "/chat", json=body, headers=as_keyed(key)) as r:
        assert r.status_code == 200
        next(line for line in r.iter_lines() if line.startswith("data:"))
    # The client went away mid-stream: the generation stopped, and a retry runs the turn.
    deadline = time.monotonic() + 5
    while (retry := edge.post("/chat", json=body, headers=as_keyed(key))).status_code == 409:
        assert time.monotonic() < deadline, "the dropped stream never let its key go"
        time.sleep(0.1)
    assert retry.status_code == 200 and REPLAYED_HEADER not in retry.headers
    assert len(answers(pg, user)) == 1


def sdk(mesh: Mesh, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{mesh.edge_url}/v1", api_key=API_KEY, max_retries=0, timeout=30, **kwargs)


def test_openai_completions_with_an_idempotency_key(idem_mesh, pg):
    user, key = new_user(), str(uuid.uuid4())
    ask = {"model": "chatterbot-sim-7b-awq", "messages": [{"role": "user", "content": "once?"}], "user": user}
    client = sdk(idem_mesh)
    first = client.chat.completions.with_raw_response.create(
        **ask, max_tokens=10, extra_headers={"Idempotency-Key": key}
    )
    again = client.chat.completions.with_raw_response.create(
        **ask, max_tokens=10, extra_headers={"Idempotency-Key": key}
    )
    assert REPLAYED_HEADER.lower() not in first.headers and again.headers[REPLAYED_HEADER] == "true"
    for header in ("X-Conversation-Id", "X-Request-ID"):
        assert again.headers[header] == first.headers[header]
    assert again.parse().model_dump() == first.parse().model_dump()
    assert len(answers(pg, user)) == 1
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        client.chat.completions.create(**ask, max_tokens=11, extra_headers={"Idempotency-Key": key})
    assert "used with another request" in refused.value.message


def test_openai_streamed_completion_is_replayed_as_chunks(idem_mesh, pg):
    user, key = new_user(), str(uuid.uuid4())
    ask = {
        "model": "chatterbot-sim-7b-awq",
        "messages": [{"role": "user", "content": "stream once"}],
        "user": user,
        "max_tokens": 200,
        "stream": True,
        "stream_options": {"include_usage": True},
        "extra_headers": {"Idempotency-Key": key},
    }
    client = sdk(idem_mesh)
    running = client.chat.completions.create(**ask)
    first = [next(running)]
    with pytest.raises(openai.ConflictError) as busy:
        client.chat.completions.create(**ask)
    assert busy.value.response.headers["Retry-After"] == "1"
    first += list(running)
    raw = client.chat.completions.with_raw_response.create(**ask)
    assert raw.headers[REPLAYED_HEADER] == "true"
    again = list(raw.parse())

    def text(chunks) -> str:
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    assert text(again) == text(first) and text(first)
    assert {c.id for c in again} == {c.id for c in first}
    assert again[-1].usage == first[-1].usage and again[-1].usage.completion_tokens == 200
    assert [c.choices[0].finish_reason for c in again if c.choices][-1] == "length"
    assert len(again) < len(first)  # the text chunks merged into one
    stored = answers(pg, user)
    assert len(stored) == 1 and stored[0][1] == text(first)


def test_a_retry_after_the_edge_died_takes_the_key_over_and_one_answer_is_stored(
    idem_mesh, edge, pg, valkey, tmp_path
):
    user, key = new_user(), str(uuid.uuid4())
    body = chat_body(user, max_tokens=300)  # three seconds of tokens
    once = the_keyed(body, key)
    failed: list[BaseException] = []
    with own_edge(idem_mesh, tmp_path) as doomed:

        def first() -> None:
            try:
                httpx.post(f"{doomed.url}/chat", json=body, headers=as_keyed(key), timeout=30)
            except httpx.HTTPError as exc:
                failed.append(exc)

        sender = threading.Thread(target=first)
        sender.start()
        deadline = time.monotonic() + 10
        while not (record := valkey.get(once.record_key)):
            assert time.monotonic() < deadline, "the first request never took its key"
            time.sleep(0.02)
        assert orjson.loads(record)["state"] == "running"
        time.sleep(0.3)  # well into the generation
        doomed.kill()
        sender.join(10)
    assert failed, "the first request was answered before its edge died"
    # Another edge: it waits for the dead edge's hold to lapse, then runs the turn with the same request id.
    started = time.monotonic()
    retry = edge.post("/chat", json=body, headers=as_keyed(key))
    assert retry.status_code == 200 and REPLAYED_HEADER not in retry.headers, retry.text
    assert time.monotonic() - started >= 2.5  # its own three seconds of tokens
    assert retry.headers["X-Request-ID"] == once.request_id
    assert answers(pg, user) == [(once.request_id, retry.json()["response"])]
    assert edge.post("/chat", json=body, headers=as_keyed(key)).headers[REPLAYED_HEADER] == "true"


def test_a_rerun_of_a_stored_turn_answers_with_the_stored_answer(edge, pg, valkey):
    # The edge died after chat_svc stored the answer and before the edge kept it: its record is gone (the hold
    # lapsed) and the retry runs the turn again, with the same request id.
    user, key = new_user(), str(uuid.uuid4())
    once = the_keyed(chat_body(user), key)
    first = edge.post("/chat", json=chat_body(user), headers=as_keyed(key))
    assert first.status_code == 200
    valkey.delete(once.record_key)
    pg.user(user).execute(
        "UPDATE messages SET content = 'the stored answer' WHERE user_id = %s AND request_id = %s "
        "AND role = 'assistant'",
        (user, once.request_id),
    )
    rerun = edge.post("/chat", json=chat_body(user), headers=as_keyed(key))
    assert rerun.status_code == 200 and REPLAYED_HEADER not in rerun.headers
    assert rerun.json()["response"] == "the stored answer"
    assert rerun.json()["conversation_id"] == first.json()["conversation_id"]
    assert answers(pg, user) == [(once.request_id, "the stored answer")]


def in_process_edge(servers, **overrides) -> TestClient:
    """An edge app in this process on the session's servers, whose chat_svc is not there."""
    settings = mesh_settings(
        servers,
        chat_addr=f"127.0.0.1:{free_port()}",
        store_addr=f"127.0.0.1:{free_port()}",
        retry_attempts=1,
        deadline_seconds=2,
        **overrides,
    )
    return TestClient(create_app(settings), raise_server_exceptions=False)


def test_without_redis_the_header_is_refused(servers):
    with in_process_edge(servers, redis_url="") as client:
        r = client.post("/chat", json=chat_body(new_user()), headers=as_keyed("k-1"))
        assert r.status_code == 400, r.text
        assert "Idempotency-Key needs Redis" in r.json()["detail"]
        completion = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        r = client.post("/v1/chat/completions", json=completion, headers=as_keyed("k-1"))
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text


def test_a_first_request_that_got_a_503_frees_its_key_for_the_retry(servers, edge, pg, valkey):
    user, key = new_user(), str(uuid.uuid4())
    with in_process_edge(servers) as broken:
        r = broken.post("/chat", json=chat_body(user), headers=as_keyed(key))
        assert r.status_code == 503, r.text
    assert valkey.get(the_keyed(chat_body(user), key).record_key) is None
    retry = edge.post("/chat", json=chat_body(user), headers=as_keyed(key))
    assert retry.status_code == 200 and REPLAYED_HEADER not in retry.headers, retry.text
    assert len(answers(pg, user)) == 1


def test_redis_down_is_503_for_a_keyed_request(servers):
    with in_process_edge(servers, redis_url=f"redis://127.0.0.1:{free_port()}/0") as client:
        r = client.post("/chat", json=chat_body(new_user()), headers=as_keyed("k-2"))
    assert r.status_code == 503 and r.headers["Retry-After"] == "1", r.text
    assert "cannot check the Idempotency-Key" in r.json()["detail"]
