"""The core API against a combined mesh (`chatterbot up`'s default): two processes each running every component,
sharing every port, components calling each other in process; and how such a mesh stops."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import openai
import orjson
import psutil
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from chatterbot.v1 import chat_pb2, chat_pb2_grpc
from ops.embedded import NatsServer
from ops.launcher import Component, Mesh
from tests.clients import REPO_ROOT, chat_body, new_user, read_stream, tokens_after_last_restart, wait_done
from tests.meshes import API_KEY, Servers, ShardConnections, mesh_settings

PROCESSES = 2
CHAT_METHOD = "/chatterbot.v1.ChatService/Chat"


@contextlib.contextmanager
def combined_mesh(servers: Servers, tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[Mesh]:
    """A combined mesh of PROCESSES processes on the session's PostgreSQL and Valkey, with a NATS of its own
    (its workers take only its own jobs)."""
    nats = NatsServer(tmp_path_factory.mktemp(f"{name}-nats"))
    nats.start()
    m = Mesh(
        mesh_settings(servers, nats_url=nats.url),
        tmp_path_factory.mktemp(name),
        prefer_configured_ports=False,
        mode="combined",
        processes=PROCESSES,
    )
    m.servers["nats"] = nats  # stopped with the mesh
    try:
        m.start()
        yield m
    finally:
        m.stop()


@pytest.fixture(scope="module")
def combined(servers: Servers, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    with combined_mesh(servers, tmp_path_factory, "combined") as m:
        yield m


@pytest.fixture
def edge(combined: Mesh) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=combined.edge_url, headers={"X-API-Key": API_KEY}, timeout=30) as client:
        yield client


@pytest.fixture
def sdk(combined: Mesh) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=f"{combined.edge_url}/v1", api_key=API_KEY, max_retries=0, timeout=30
    ) as client:
        yield client


def stored(pg: ShardConnections, user_id: str) -> list[tuple[str, str, str]]:
    """(conversation_id, role, content) of every stored message of a user, oldest first."""
    rows = (
        pg.user(user_id)
        .execute(
            "SELECT conversation_id, role, content FROM messages WHERE user_id = %s ORDER BY message_id",
            (user_id,),
        )
        .fetchall()
    )
    return [(r[0], r[1], r[2]) for r in rows]


def metric_sum(url: str, name: str, **labels: str) -> float:
    """The sum of the samples `name` whose labels include `labels`, on one process's metrics endpoint."""
    text = httpx.get(url, timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def per_process(mesh: Mesh, name: str, **labels: str) -> dict[str, float]:
    return {child: metric_sum(url, name, **labels) for child, url in mesh.up_info()["metrics"].items()}


# --- the mesh ---------------------------------------------------------------------------------------------


def test_every_component_runs_in_each_of_the_processes(combined):
    info = combined.up_info()
    assert info["mode"] == "combined"
    assert sorted(combined.children) == [f"mesh-{i}" for i in range(PROCESSES)]
    pids = list(info["pids"].values())
    assert len(set(pids)) == PROCESSES and all(pids)
    for name in ("store", "context", "inference", "chat", "worker", "edge"):
        service = combined.services[name]
        assert isinstance(service, Component) and service.is_running
        assert all(name in child.components for child in combined.children.values())
    assert set(info["grpc"]) == {"chat", "context", "inference", "store"}


# --- the core API ------------------------------------------------------------------------------------------


def test_chat_answers_and_stores_the_exchange(edge, pg):
    user = new_user()
    r = edge.post("/chat", json=chat_body(user, message="Hello, combined mesh!", max_tokens=20))
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"response", "conversation_id", "processing_time"}
    assert body["response"].startswith("[simulated")
    assert stored(pg, user) == [
        (body["conversation_id"], "user", "Hello, combined mesh!"),
        (body["conversation_id"], "assistant", body["response"]),
    ]


def test_history_shows_the_stored_exchange(edge, pg):
    user = new_user()
    first = edge.post("/chat", json=chat_body(user, message="first")).json()
    cid = first["conversation_id"]
    second = edge.post("/chat", json=chat_body(user, message="second", conversation_id=cid)).json()
    # The second turn saw the first one: system prompt, first exchange, new question.
    assert "4 messages" in second["response"]

    history = edge.get(f"/history/{user}", params={"conversation_id": cid})
    assert history.status_code == 200, history.text
    messages = [(m["role"], m["content"]) for m in history.json()["messages"]]
    expected = [
        ("user", "first"),
        ("assistant", first["response"]),
        ("user", "second"),
        ("assistant", second["response"]),
    ]
    assert messages == expected
    assert [(role, content) for _, role, content in stored(pg, user)] == expected


def test_stream_chat_streams_tokens_then_done(edge, pg):
    user = new_user()
    accepted = edge.post("/stream-chat", json=chat_body(user, message="stream me", max_tokens=30))
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["status"] == "streaming"
    cid = accepted.json()["correlation_id"]
    events = read_stream(edge, cid)
    assert [int(i) for i, _, _ in events] == list(range(1, len(events) + 1))
    assert events[-1][2] == "[DONE]"
    final = orjson.loads(events[-2][2])
    assert final["done"] is True and final["finish_reason"] in ("stop", "length")
    text = tokens_after_last_restart(events)
    assert text.startswith("[simulated")
    done = wait_done(edge, cid)
    assert done["response"] == text
    assert [(role, content) for _, role, content in stored(pg, user)] == [
        ("user", "stream me"),
        ("assistant", text),
    ]


def test_async_chat_answers_through_check_response(edge, pg):
    user = new_user()
    accepted = edge.post("/async-chat", json=chat_body(user, message="queued hello", max_tokens=20))
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["status"] == "processing"
    cid = accepted.json()["correlation_id"]
    done = wait_done(edge, cid)
    assert set(done) == {"response", "conversation_id", "processing_time"}, done
    assert done["response"].startswith("[simulated")
    assert stored(pg, user) == [
        (done["conversation_id"], "user", "queued hello"),
        (done["conversation_id"], "assistant", done["response"]),
    ]


def test_openai_sdk_completion_answers_and_stores_the_exchange(sdk, pg):
    user = new_user()
    [model] = [m.id for m in sdk.models.list()]
    raw = sdk.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "Hello from the SDK"}], max_tokens=20, user=user
    )
    completion = raw.parse()
    assert completion.object == "chat.completion" and completion.model == model
    [choice] = completion.choices
    assert choice.message.role == "assistant"
    assert choice.message.content.startswith(f"[simulated {model}")
    assert completion.usage.completion_tokens > 0
    assert stored(pg, user) == [
        (raw.headers["x-conversation-id"], "user", "Hello from the SDK"),
        (raw.headers["x-conversation-id"], "assistant", choice.message.content),
    ]


def test_openai_sdk_stream_sends_deltas_finish_and_usage(sdk, pg):
    user = new_user()
    [model] = [m.id for m in sdk.models.list()]
    chunks = list(
        sdk.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Stream from the SDK"}],
            max_tokens=30,
            stream=True,
            stream_options={"include_usage": True},
            user=user,
        )
    )
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    finished = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finished) == 1 and finished[0] is chunks[-2]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith(f"[simulated {model}")
    assert [(role, content) for _, role, content in stored(pg, user)] == [
        ("user", "Stream from the SDK"),
        ("assistant", text),
    ]


def test_grpc_chat_answers_with_an_api_key_and_refuses_without(combined, pg):
    user = new_user()
    with grpc.insecure_channel(combined.services["chat"].url) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        turn = chat_pb2.ChatTurn(user_id=user, message="Over gRPC", max_tokens=20)
        reply = stub.Chat(chat_pb2.ChatRequest(turn=turn), metadata=(("x-api-key", API_KEY),), timeout=30)
        assert reply.response.startswith("[simulated")
        assert stored(pg, user) == [
            (reply.conversation_id, "user", "Over gRPC"),
            (reply.conversation_id, "assistant", reply.response),
        ]
        with pytest.raises(grpc.RpcError) as keyless:
            stub.Chat(chat_pb2.ChatRequest(turn=turn), timeout=30)
        assert keyless.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert len(stored(pg, user)) == 2


def test_both_processes_serve_and_the_edge_calls_chat_in_its_own_process(combined):
    requests = 40
    edge_before = per_process(combined, "chatterbot_edge_requests_total", route="/chat", status="200")
    chat_before = per_process(combined, "chatterbot_grpc_server_handled_total", method=CHAT_METHOD, code="OK")
    user = new_user()
    # A connection of its own for each request, so the kernel spreads them over the processes.
    with httpx.Client(
        base_url=combined.edge_url,
        headers={"X-API-Key": API_KEY, "Connection": "close"},
        timeout=30,
        limits=httpx.Limits(max_keepalive_connections=0),
    ) as client:
        for i in range(requests):
            r = client.post("/chat", json=chat_body(user, message=f"spread {i}", max_tokens=10))
            assert r.status_code == 200, r.text
    edge_after = per_process(combined, "chatterbot_edge_requests_total", route="/chat", status="200")
    chat_after = per_process(combined, "chatterbot_grpc_server_handled_total", method=CHAT_METHOD, code="OK")
    edge_served = {name: edge_after[name] - edge_before[name] for name in edge_after}
    chat_served = {name: chat_after[name] - chat_before[name] for name in chat_after}
    assert sum(edge_served.values()) == requests
    assert all(count > 0 for count in edge_served.values()), edge_served
    # Each edge's chats were answered by the chat component of its own process (in process, no hop).
    assert chat_served == edge_served


# --- failures crossing the in-process hops -----------------------------------------------------------------


def test_health_covers_every_component_and_server(edge):
    body = edge.get("/health").json()
    assert body["status"] == "healthy", body
    assert body["components"] == dict.fromkeys(
        ("chat", "context", "inference", "store", "worker", "postgres", "redis", "nats"), "up"
    )
    assert edge.get("/readyz").status_code == 200


def test_business_errors_keep_their_meaning_across_the_in_process_hops(edge, sdk):
    with pytest.raises(openai.NotFoundError) as unknown_model:
        sdk.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert "no-such-model" in unknown_model.value.message

    alice, bob = new_user(), new_user()
    mine = edge.post("/chat", json=chat_body(alice, message="mine")).json()
    cid = mine["conversation_id"]
    theirs = edge.get(f"/history/{bob}", params={"conversation_id": cid})
    assert theirs.status_code == 404, theirs.text
    assert theirs.headers["content-type"].startswith("application/problem+json")
    # Conversation ids are the user's own: bob's turn under alice's id sees nothing of hers, changes nothing.
    continued = edge.post("/chat", json=chat_body(bob, message="yours?", conversation_id=cid))
    assert continued.status_code == 200, continued.text
    assert "2 messages" in continued.json()["response"]
    history = edge.get(f"/history/{alice}", params={"conversation_id": cid}).json()["messages"]
    assert [(m["role"], m["content"]) for m in history] == [("user", "mine"), ("assistant", mine["response"])]
    assert edge.post("/chat", json=chat_body(alice), headers={"X-API-Key": "nope"}).status_code == 403


def test_store_down_is_503_with_retry_after_and_recovers(servers, edge, combined):
    user = new_user()
    servers.postgres.kill()
    try:
        r = edge.post("/chat", json=chat_body(user, message="are you there?"))
        assert r.status_code == 503, r.text
        assert r.headers["content-type"].startswith("application/problem+json")
        assert float(r.headers["Retry-After"]) >= 0
    finally:
        servers.postgres.start()
    # Once the store's pools and chat's breaker for the store let a trial through, turns are stored again.
    deadline = time.monotonic() + 30
    while True:
        r = edge.post("/chat", json=chat_body(user, message="are you there now?"))
        if r.status_code != 503 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert r.status_code == 200, r.text
    with psycopg.connect(servers.shard_dsn_for(user)) as conn:  # the killed server dropped older connections
        rows = conn.execute(
            "SELECT content FROM messages WHERE user_id = %s AND role = 'user'", (user,)
        ).fetchall()
    assert rows == [("are you there now?",)]


# --- starting and stopping ---------------------------------------------------------------------------------


def test_a_wrong_component_name_exits_2_with_a_clear_message(tmp_path):
    command = str(Path(sys.executable).with_name("chatterbot"))
    for targets, named in (("edge,nosuch", "nosuch"), ("chatt", "chatt"), (",", "(none given)")):
        out = subprocess.run(
            [command, "serve", targets], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 2, (targets, out.stdout, out.stderr)
        assert f"unknown component(s): {named}" in out.stderr, out.stderr
        assert "choose from store, context, inference, chat, worker, edge or all" in out.stderr


def test_stopping_a_combined_mesh_stops_every_process_gracefully_and_frees_its_ports(
    servers, tmp_path_factory
):
    with combined_mesh(servers, tmp_path_factory, "combined-stop") as m:
        children = list(m.children.values())
        popens = [child._proc for child in children]
        assert all(p is not None for p in popens) and len(popens) == PROCESSES
        family = [psutil.Process(p.pid) for p in popens]
        family += [d for p in list(family) for d in p.children(recursive=True)]
        ports = {m.services[name].port for name in ("edge", "chat", "context", "inference", "store")}
        assert listening(ports) == ports
        r = httpx.post(
            f"{m.edge_url}/chat", headers={"X-API-Key": API_KEY}, json=chat_body(new_user()), timeout=30
        )
        assert r.status_code == 200, r.text
        m.stop()
        # SIGTERM, then a clean exit: no process was left to be killed.
        assert [p.returncode for p in popens] == [0] * PROCESSES
        _gone, alive = psutil.wait_procs(family, timeout=10)
        assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], alive
        assert not any(child.is_running for child in children)
        assert not listening(ports), ports


def listening(ports: set[int]) -> set[int]:
    """Those of `ports` that a socket on this machine listens on."""
    return {
        conn.laddr.port
        for conn in psutil.net_connections(kind="tcp")
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port in ports
    }
