"""The OpenAI-compatible API through the whole mesh, driven by the official `openai` SDK; and client disconnects
on the streaming routes cancelling the generation down to the engine (on a mesh of its own with a slow engine)."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator

import grpc
import httpx
import openai
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from chat_svc.servicer import to_turn_input
from chat_svc.turn import TurnInput, conversation_id_for
from chatterbot.v1 import chat_pb2, chat_pb2_grpc, types_pb2
from chatterbot.wire import CONVERSATION_ID_PATTERN
from ops.launcher import Mesh
from tests.meshes import API_KEY, ShardConnections, own_mesh

SIM_MODEL = "chatterbot-sim-7b-awq"


def sdk(mesh: Mesh, api_key: str = API_KEY, **kwargs) -> openai.OpenAI:
    """The official SDK pointed at the edge; the key travels as `Authorization: Bearer`."""
    return openai.OpenAI(base_url=f"{mesh.edge_url}/v1", api_key=api_key, max_retries=0, timeout=30, **kwargs)


@pytest.fixture
def client(mesh) -> Iterator[openai.OpenAI]:
    with sdk(mesh) as c:
        yield c


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


def test_sdk_completion_answers_and_stores_the_exchange(client, pg):
    raw = client.chat.completions.with_raw_response.create(
        model=SIM_MODEL,
        messages=[{"role": "user", "content": "Hello from the SDK"}],
        max_tokens=40,
        temperature=0.5,
        user="user-oai-1",
    )
    completion = raw.parse()
    assert completion.id.startswith("chatcmpl-")
    assert completion.object == "chat.completion"
    assert completion.model == SIM_MODEL
    assert completion.created > 0
    [choice] = completion.choices
    assert choice.message.role == "assistant"
    # The system prompt was added (the request had none) to the user's message.
    assert choice.message.content.startswith(f"[simulated {SIM_MODEL}: 2 messages")
    assert choice.finish_reason in ("stop", "length")
    usage = completion.usage
    assert usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    conversation_id = raw.headers["x-conversation-id"]
    assert stored(pg, "user-oai-1") == [
        (conversation_id, "user", "Hello from the SDK"),
        (conversation_id, "assistant", choice.message.content),
    ]


def test_sdk_stream_sends_role_then_deltas_then_finish_then_usage(client, pg):
    chunks = list(
        client.chat.completions.create(
            model=SIM_MODEL,
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "Stream"}, {"type": "text", "text": "me"}],
                }
            ],
            max_completion_tokens=60,
            stream=True,
            stream_options={"include_usage": True},
            user="user-oai-stream",
        )
    )
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].id.startswith("chatcmpl-")
    assert chunks[0].choices[0].delta.role == "assistant"
    finished = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finished) == 1 and finished[0] is chunks[-2]
    assert finished[0].choices[0].finish_reason in ("stop", "length")
    # The last chunk has no choices and the usage; the others carry `usage: null`.
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert (
        chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + chunks[-1].usage.completion_tokens
    )
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith(f"[simulated {SIM_MODEL}: 2 messages")

    # Text parts are joined by newlines; the exchange is stored like any other turn.
    assert [(role, content) for _, role, content in stored(pg, "user-oai-stream")] == [
        ("user", "Stream\nme"),
        ("assistant", text),
    ]


def test_sdk_stream_without_include_usage_has_no_usage_chunk(client):
    chunks = list(
        client.chat.completions.create(
            model=SIM_MODEL,
            messages=[{"role": "user", "content": "short"}],
            max_tokens=5,
            stream=True,
            user="user-oai-stream-2",
        )
    )
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices for c in chunks)


def test_resent_conversation_is_one_stored_conversation_and_reaches_the_model(client, pg):
    user, first_question = "user-oai-conv", "Plan a trip to Lisbon"
    first = (
        client.chat.completions.create(
            model=SIM_MODEL, messages=[{"role": "user", "content": first_question}], max_tokens=20, user=user
        )
        .choices[0]
        .message.content
    )
    second = (
        client.chat.completions.create(
            model=SIM_MODEL,
            messages=[
                {"role": "user", "content": first_question},
                {"role": "assistant", "content": first},
                {"role": "user", "content": "And on day two?"},
            ],
            max_tokens=20,
            user=user,
        )
        .choices[0]
        .message.content
    )
    # System prompt, the first question, the first answer and the new question reached the model.
    assert second.startswith(f"[simulated {SIM_MODEL}: 4 messages")

    rows = stored(pg, user)
    assert len({conversation_id for conversation_id, _, _ in rows}) == 1
    assert [(role, content) for _, role, content in rows] == [
        ("user", first_question),
        ("assistant", first),
        ("user", "And on day two?"),
        ("assistant", second),
    ]


def test_a_system_message_replaces_the_system_prompt(client):
    answer = (
        client.chat.completions.create(
            model=SIM_MODEL,
            messages=[{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
            max_tokens=10,
            user="user-oai-system",
        )
        .choices[0]
        .message.content
    )
    assert answer.startswith(f"[simulated {SIM_MODEL}: 2 messages")


def test_conversation_header_names_the_stored_conversation(client, pg, edge):
    client.chat.completions.create(
        model=SIM_MODEL,
        messages=[{"role": "user", "content": "In a named conversation"}],
        max_tokens=10,
        user="user-oai-header",
        extra_headers={"X-Conversation-Id": "trip-2026"},
    )
    assert {conversation_id for conversation_id, _, _ in stored(pg, "user-oai-header")} == {"trip-2026"}
    # The seed API sees it like any other conversation.
    history = edge.get("/history/user-oai-header", params={"conversation_id": "trip-2026"}).json()
    assert [m["role"] for m in history["messages"]] == ["user", "assistant"]

    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client.chat.completions.create(
            model=SIM_MODEL,
            messages=[{"role": "user", "content": "x"}],
            extra_headers={"X-Conversation-Id": "not a valid id!"},
        )
    assert caught.value.body["param"] == "x-conversation-id"


def test_without_user_the_default_user_is_stored(client, pg):
    content = "Whose message is this? " + str(time.time())
    client.chat.completions.create(
        model=SIM_MODEL, messages=[{"role": "user", "content": content}], max_tokens=10
    )
    assert ("user", content) in [(role, c) for _, role, c in stored(pg, "openai-client")]


def test_stop_seed_and_greedy_sampling_reach_the_engine(client):
    def ask(**kwargs) -> openai.types.chat.ChatCompletion:
        return client.chat.completions.create(
            model=SIM_MODEL,
            messages=[{"role": "user", "content": "Tell me a story"}],
            max_tokens=30,
            user="user-oai-sampling",
            **kwargs,
        )

    full = ask(seed=7).choices[0].message.content
    assert ask(seed=7).choices[0].message.content == full
    stop_word = full.split()[-3]
    stopped = ask(seed=7, stop=[stop_word, "never-appears"]).choices[0]
    assert stopped.finish_reason == "stop"
    assert stop_word not in stopped.message.content and full.startswith(stopped.message.content.rstrip())
    greedy = ask(temperature=0)
    assert greedy.choices[0].message.content.startswith("[simulated")


def test_models_lists_the_served_model(client):
    models = client.models.list().data
    assert SIM_MODEL in [m.id for m in models]
    assert all(m.object == "model" and m.owned_by == "chatterbot" and m.created > 0 for m in models)


@pytest.mark.parametrize(
    ("messages", "kwargs", "fragment"),
    [
        ([], {}, "messages"),
        (
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
            {},
            "the last message must be a user message",
        ),
        (
            [{"role": "tool", "content": "x", "tool_call_id": "t1"}, {"role": "user", "content": "hi"}],
            {},
            "role",
        ),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}],
            {},
            "only 'text'",
        ),
        ([{"role": "user", "content": "hi"}], {"temperature": 3}, "temperature"),
        ([{"role": "user", "content": "hi"}], {"max_tokens": 5000}, "max_tokens"),
        ([{"role": "user", "content": "hi"}], {"n": 2}, "n"),
        ([{"role": "user", "content": "x" * 2001}], {}, "2000 characters"),
    ],
)
def test_bad_input_is_unprocessable_with_an_openai_error(client, messages, kwargs, fragment):
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client.chat.completions.create(model=SIM_MODEL, messages=messages, **kwargs)
    error = caught.value
    assert error.status_code == 422
    assert error.type == "invalid_request_error" and error.code == "422"
    assert fragment in error.message
    # Still a problem body (RFC 9457) for everyone else.
    assert error.response.headers["content-type"] == "application/problem+json"
    problem = error.response.json()
    assert problem["status"] == 422 and problem["detail"] == error.body["message"]


def test_malformed_json_is_unprocessable(mesh):
    r = httpx.post(
        f"{mesh.edge_url}/v1/chat/completions",
        content=b"{not json",
        headers={"X-API-Key": API_KEY, "Content-Type": "application/json"},
    )
    assert r.status_code == 422
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.type == "not_found_error"
    assert "no-such-model" in caught.value.message


def test_keys_map_to_the_sdk_auth_errors(mesh):
    with sdk(mesh, api_key="not-a-key") as wrong, pytest.raises(openai.PermissionDeniedError) as caught:
        wrong.models.list()
    assert caught.value.type == "permission_error"

    r = httpx.post(
        f"{mesh.edge_url}/v1/chat/completions",
        json={"model": SIM_MODEL, "messages": [{"role": "user", "content": "hi"}]},
    )
    assert r.status_code == 401 and r.headers["content-type"] == "application/problem+json"
    assert r.json()["error"]["type"] == "authentication_error"
    with sdk(mesh) as keyless, pytest.raises(openai.AuthenticationError) as caught:
        keyless.models.list(extra_headers={"Authorization": openai.Omit()})  # no key sent at all
    assert caught.value.type == "authentication_error"


def test_x_api_key_header_works_too(mesh):
    r = httpx.get(f"{mesh.edge_url}/v1/models", headers={"X-API-Key": API_KEY})
    assert r.status_code == 200
    assert r.json()["object"] == "list"


# --- the same turns on chat_svc's gRPC surface (ChatTurn.messages, ListModels) ---


def prompt(*pairs: tuple[int, str]) -> list[types_pb2.ChatMessage]:
    return [types_pb2.ChatMessage(role=role, content=content) for role, content in pairs]


USER, ASSISTANT, SYSTEM = types_pb2.ROLE_USER, types_pb2.ROLE_ASSISTANT, types_pb2.ROLE_SYSTEM


@pytest.mark.parametrize(
    ("turn", "fragment"),
    [
        (
            chat_pb2.ChatTurn(
                user_id="user-v", message="hi", messages=prompt((USER, "hi"), (ASSISTANT, "hello"))
            ),
            "last of turn.messages must be a user message",
        ),
        (
            chat_pb2.ChatTurn(
                user_id="user-v",
                message="hi",
                messages=prompt((types_pb2.ROLE_UNSPECIFIED, "x"), (USER, "hi")),
            ),
            "turn.messages[0].role",
        ),
        (
            chat_pb2.ChatTurn(user_id="user-v", message="other", messages=prompt((USER, "hi"))),
            "turn.message must equal",
        ),
        (
            chat_pb2.ChatTurn(user_id="user-v", message="hi", messages=prompt((USER, "hi")), context=["c"]),
            "turn.context must be empty",
        ),
        (
            chat_pb2.ChatTurn(user_id="user-v", message="hi", messages=prompt(*[(USER, "hi")] * 257)),
            "at most 256 messages",
        ),
        (
            chat_pb2.ChatTurn(
                user_id="user-v", message="hi", messages=prompt((SYSTEM, "x" * 400_000), (USER, "hi"))
            ),
            "characters in all",
        ),
    ],
)
def test_invalid_whole_prompt_turns_are_refused(turn, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        to_turn_input(turn, 2000)


def test_whole_prompt_turn_takes_greedy_sampling_and_short_answers():
    turn = to_turn_input(
        chat_pb2.ChatTurn(
            user_id="user-v",
            message="hi",
            messages=prompt((USER, "hi")),
            max_tokens=1,
            temperature=0.5,
            greedy=True,
        ),
        2000,
    )
    assert (turn.max_tokens, turn.temperature) == (1, 0.0)
    assert [m.content for m in turn.messages] == ["hi"]
    # Seed API turns keep their rules.
    with pytest.raises(ValueError, match="10 to 1024"):
        to_turn_input(chat_pb2.ChatTurn(user_id="user-v", message="hi", max_tokens=1), 2000)


def test_a_resent_conversation_derives_the_same_conversation_id():
    first = TurnInput(user_id="user-a", message="hi", messages=prompt((SYSTEM, "s"), (USER, "hi")))
    later = TurnInput(
        user_id="user-a",
        message="more",
        messages=prompt((SYSTEM, "s"), (USER, "hi"), (ASSISTANT, "hello"), (USER, "more")),
    )
    other_user = TurnInput(user_id="user-b", message="hi", messages=prompt((USER, "hi")))
    assert conversation_id_for(first) == conversation_id_for(later) != conversation_id_for(other_user)
    assert re.fullmatch(CONVERSATION_ID_PATTERN, conversation_id_for(first))


def test_grpc_whole_prompt_turn_and_list_models(mesh, pg):
    metadata = (("x-api-key", API_KEY),)
    with grpc.insecure_channel(mesh.services["chat"].url) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        turn = chat_pb2.ChatTurn(
            user_id="user-oai-grpc",
            message="Over gRPC",
            max_tokens=20,
            messages=prompt((SYSTEM, "Be brief."), (USER, "Over gRPC")),
        )
        reply = stub.Chat(chat_pb2.ChatRequest(turn=turn), metadata=metadata, timeout=10)
        assert reply.response.startswith(f"[simulated {SIM_MODEL}: 2 messages")
        assert reply.conversation_id.startswith("oai-")
        assert stored(pg, "user-oai-grpc") == [
            (reply.conversation_id, "user", "Over gRPC"),
            (reply.conversation_id, "assistant", reply.response),
        ]

        with pytest.raises(grpc.RpcError) as queued:
            stub.SubmitChat(chat_pb2.SubmitChatRequest(turn=turn), metadata=metadata, timeout=10)
        assert queued.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        models = stub.ListModels(
            chat_pb2.ChatServiceListModelsRequest(), metadata=metadata, timeout=10
        ).models
        assert SIM_MODEL in [m.id for m in models]
        with pytest.raises(grpc.RpcError) as keyless:
            stub.ListModels(chat_pb2.ChatServiceListModelsRequest(), timeout=10)
        assert keyless.value.code() == grpc.StatusCode.UNAUTHENTICATED


# --- client disconnects cancel the generation, down to the engine ---


@pytest.fixture(scope="module")
def slow_mesh(servers, tmp_path_factory) -> Iterator[Mesh]:
    """A mesh whose simulated engine answers at length and slowly (about 15 s for 1024 tokens)."""
    with own_mesh(
        servers,
        tmp_path_factory,
        "openai-slow-mesh",
        own_nats=True,
        sim_itl_ms=15,
        sim_itl_at_max_ms=15,
        sim_mean_output_tokens=10_000,
    ) as mesh:
        yield mesh


def engine_metric(mesh: Mesh, name: str) -> float:
    """A metric of inference_svc's engine, summed over models."""
    text = httpx.get(mesh.up_info()["metrics"]["inference"], timeout=5).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    )


def wait_for(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (
            "/chat",
            {
                "message": "Talk for a long time",
                "user_id": "user-disconnect-1",
                "max_tokens": 1024,
                "stream": True,
            },
        ),
        (
            "/v1/chat/completions",
            {
                "model": SIM_MODEL,
                "messages": [{"role": "user", "content": "Talk at length"}],
                "max_tokens": 1024,
                "stream": True,
                "user": "user-disconnect-2",
            },
        ),
    ],
)
def test_client_disconnect_cancels_the_generation_in_the_engine(slow_mesh, path, body):
    assert wait_for(lambda: engine_metric(slow_mesh, "chatterbot_engine_running_sequences") == 0)
    aborted = engine_metric(slow_mesh, "chatterbot_engine_aborted_requests_total")
    with (
        httpx.Client(base_url=slow_mesh.edge_url, headers={"X-API-Key": API_KEY}, timeout=30) as http,
        http.stream("POST", path, json=body) as r,
    ):
        assert r.status_code == 200
        events = 0
        for line in r.iter_lines():
            events += line.startswith("data: ")
            if events == 3:
                assert engine_metric(slow_mesh, "chatterbot_engine_running_sequences") == 1
            if events == 5:
                break  # leaving the loop closes the connection
    # The client is gone after five of about a thousand tokens: the sequence leaves the engine, aborted.
    assert wait_for(lambda: engine_metric(slow_mesh, "chatterbot_engine_running_sequences") == 0, timeout=5)
    assert wait_for(
        lambda: engine_metric(slow_mesh, "chatterbot_engine_aborted_requests_total") == aborted + 1
    )


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/chat", {"message": "Talk for a long time", "user_id": "user-disconnect-3", "max_tokens": 1024}),
        (
            "/v1/chat/completions",
            {
                "model": SIM_MODEL,
                "messages": [{"role": "user", "content": "Talk at length"}],
                "max_tokens": 1024,
                "user": "user-disconnect-4",
            },
        ),
    ],
)
def test_a_client_that_hangs_up_on_a_whole_answer_cancels_its_generation(slow_mesh, path, body):
    assert wait_for(lambda: engine_metric(slow_mesh, "chatterbot_engine_running_sequences") == 0)
    aborted = engine_metric(slow_mesh, "chatterbot_engine_aborted_requests_total")
    url = httpx.URL(slow_mesh.edge_url)
    payload = orjson.dumps(body)
    with socket.create_connection((url.host, url.port), timeout=10) as client:
        client.sendall(
            f"POST {path} HTTP/1.1\r\nHost: {url.host}\r\nX-API-Key: {API_KEY}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        assert wait_for(lambda: engine_metric(slow_mesh, "chatterbot_engine_running_sequences") == 1)
    # Hung up about 15 s before the answer would be whole: the sequence leaves the engine, aborted.
    assert wait_for(lambda: engine_metric(slow_mesh, "chatterbot_engine_running_sequences") == 0, timeout=5)
    assert wait_for(
        lambda: engine_metric(slow_mesh, "chatterbot_engine_aborted_requests_total") == aborted + 1
    )
