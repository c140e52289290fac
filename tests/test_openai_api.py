"""The OpenAI-compatible API through the whole mesh, driven by the official `openai` SDK; and client disconnects
on the streaming routes cancelling the generation down to the engine (on a mesh of its own with a slow engine)."""

from __future__ import annotations

import asyncio
import re
import socket
import time
import uuid
from collections import Counter
from collections.abc import Iterator

import grpc
import httpx
import openai
import orjson
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from chat_svc.continuation import continues_digest, head_digest
from chat_svc.servicer import to_turn_input
from chatterbot.v1 import chat_pb2, chat_pb2_grpc, context_pb2, context_pb2_grpc, types_pb2
from chatterbot.wire import CONVERSATION_ID_PATTERN
from context_svc.turns import context_key
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


def new_user() -> str:
    return f"user-oai-{uuid.uuid4().hex[:12]}"


def context_keys(valkey: redis.Redis, user_id: str) -> list[bytes]:
    """The user's cached context lists (`ctx:{user:conversation}`)."""
    return list(valkey.scan_iter(match=context_key(user_id, "*")))


Messages = list[dict[str, str]]


def ask(client: openai.OpenAI, user: str, messages: Messages, *, stream: bool = False) -> str:
    """The answer to `messages`, as one completion or gathered from a stream."""
    if not stream:
        reply = client.chat.completions.create(model=SIM_MODEL, messages=messages, max_tokens=20, user=user)
        return reply.choices[0].message.content
    chunks = client.chat.completions.create(
        model=SIM_MODEL, messages=messages, max_tokens=20, user=user, stream=True
    )
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def converse(client: openai.OpenAI, user: str, messages: Messages, question: str, **kwargs) -> Messages:
    """Ask `question` after `messages`, as an OpenAI client does: the conversation so far, the answer added."""
    messages = [*messages, {"role": "user", "content": question}]
    return [*messages, {"role": "assistant", "content": ask(client, user, messages, **kwargs)}]


def conversations(pg: ShardConnections, user_id: str) -> dict[str, list[tuple[str, str]]]:
    """(role, content) of the stored messages of each of a user's conversations, oldest first."""
    found: dict[str, list[tuple[str, str]]] = {}
    for conversation_id, role, content in stored(pg, user_id):
        found.setdefault(conversation_id, []).append((role, content))
    return found


def pairs(messages: Messages) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in messages if m["role"] != "system"]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_resent_conversation_is_one_stored_conversation_and_reaches_the_model(client, pg, valkey, stream):
    user = new_user()
    messages = converse(client, user, [], "Plan a trip to Lisbon", stream=stream)
    messages = converse(client, user, messages, "And on day two?", stream=stream)
    # System prompt, the first question, the first answer and the new question reached the model.
    assert messages[-1]["content"].startswith(f"[simulated {SIM_MODEL}: 4 messages")
    # A system message of the client's own changes the prompt, not the conversation.
    messages = converse(
        client,
        user,
        [{"role": "system", "content": "You are terse."}, *messages],
        "And day three?",
        stream=stream,
    )
    assert messages[-1]["content"].startswith(f"[simulated {SIM_MODEL}: 6 messages")

    assert list(conversations(pg, user).values()) == [pairs(messages)]
    # No turn of it named the conversation, so none reads its context: none was written.
    assert context_keys(valkey, user) == []


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_clients_continuing_one_head_fork_into_conversations_of_their_own(client, pg, stream):
    user = new_user()
    opening = converse(client, user, [], "Name a colour", stream=stream)
    mine = converse(client, user, opening, "A warmer one?", stream=stream)
    # Another client resends the same opening: that head has moved on, so this is a conversation of its own.
    theirs = converse(client, user, opening, "A colder one?", stream=stream)
    mine = converse(client, user, mine, "Warmer still?", stream=stream)
    theirs = converse(client, user, theirs, "Colder still?", stream=stream)

    stored_conversations = sorted(conversations(pg, user).values(), key=len, reverse=True)
    assert stored_conversations == [pairs(mine), pairs(theirs[len(opening) :])]


async def test_concurrent_stateless_requests_are_conversations_of_their_own_and_write_no_context(
    mesh, pg, valkey
):
    user, question = new_user(), "Summarize ticket 4711"
    async with openai.AsyncOpenAI(
        base_url=f"{mesh.edge_url}/v1", api_key=API_KEY, max_retries=0, timeout=60
    ) as aclient:
        replies = await asyncio.gather(
            *(
                aclient.chat.completions.with_raw_response.create(
                    model=SIM_MODEL,
                    messages=[{"role": "user", "content": question}],
                    max_tokens=10,
                    user=user,
                )
                for _ in range(20)
            )
        )
    named = {r.headers["x-conversation-id"] for r in replies}
    assert len(named) == 20
    assert all(re.fullmatch(CONVERSATION_ID_PATTERN, conversation_id) for conversation_id in named)

    found = conversations(pg, user)
    assert set(found) == named
    answers = Counter(r.parse().choices[0].message.content for r in replies)
    assert Counter(messages[1][1] for messages in found.values()) == answers
    assert all([role for role, _ in messages] == ["user", "assistant"] for messages in found.values())
    assert all(messages[0] == ("user", question) for messages in found.values())
    assert context_keys(valkey, user) == []


async def test_concurrent_stateless_streams_are_conversations_of_their_own(mesh, pg, valkey):
    user, question = new_user(), "Stream ticket 4712"
    async with openai.AsyncOpenAI(
        base_url=f"{mesh.edge_url}/v1", api_key=API_KEY, max_retries=0, timeout=60
    ) as aclient:

        async def streamed() -> str:
            chunks = await aclient.chat.completions.create(
                model=SIM_MODEL,
                messages=[{"role": "user", "content": question}],
                max_tokens=10,
                user=user,
                stream=True,
            )
            return "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])

        answers = await asyncio.gather(*(streamed() for _ in range(8)))
    found = conversations(pg, user)
    assert len(found) == 8
    assert sorted(messages for messages in found.values()) == sorted(
        [("user", question), ("assistant", answer)] for answer in answers
    )
    assert context_keys(valkey, user) == []


def test_a_continued_conversation_drops_its_stale_context_for_the_next_chat_reader(
    mesh, client, edge, valkey
):
    user = new_user()
    raw = client.chat.completions.with_raw_response.create(
        model=SIM_MODEL, messages=[{"role": "user", "content": "Remember: blue"}], max_tokens=20, user=user
    )
    conversation_id = raw.headers["x-conversation-id"]
    opening = [
        {"role": "user", "content": "Remember: blue"},
        {"role": "assistant", "content": raw.parse().choices[0].message.content},
    ]
    # A reader of the conversation's context (a /chat turn naming it) caches it: the first exchange.
    with grpc.insecure_channel(mesh.services["context"].url) as channel:
        context = context_pb2_grpc.ContextServiceStub(channel)
        request = context_pb2.GetContextRequest(user_id=user, conversation_id=conversation_id)
        assert len(context.GetContext(request, timeout=10).turns) == 2
    assert context_keys(valkey, user) == [context_key(user, conversation_id).encode()]

    converse(client, user, opening, "And my colour?")
    assert not valkey.exists(context_key(user, conversation_id))
    # The next /chat turn rebuilds the context from history, both exchanges in it.
    r = edge.post(
        "/chat", json={"message": "Still there?", "user_id": user, "conversation_id": conversation_id}
    )
    assert r.status_code == 200, r.text
    assert "6 messages" in r.json()["response"]


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


def test_a_served_model_is_retrieved_and_another_is_not_found(mesh, client):
    model = client.models.retrieve(SIM_MODEL)
    assert (model.id, model.object, model.owned_by) == (SIM_MODEL, "model", "chatterbot")
    assert model.created > 0

    for unknown in ("no-such-model", "org/no-such-model"):  # an id may hold a slash, sent percent-encoded
        with pytest.raises(openai.NotFoundError) as caught:
            client.models.retrieve(unknown)
        error = caught.value
        assert error.type == "not_found_error" and error.param == "model" and error.code == "404"
        assert unknown in error.message
        assert error.response.headers["content-type"] == "application/problem+json"
    # The same keys as the model list.
    with sdk(mesh, api_key="not-a-key") as wrong, pytest.raises(openai.PermissionDeniedError):
        wrong.models.retrieve(SIM_MODEL)
    assert httpx.get(f"{mesh.edge_url}/v1/models/{SIM_MODEL}").status_code == 401


@pytest.mark.parametrize(
    ("messages", "kwargs", "fragment"),
    [
        ([], {}, "messages"),
        (
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
            {},
            "the last message must be a user message",
        ),
        ([{"role": "robot", "content": "x"}, {"role": "user", "content": "hi"}], {}, "role"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}],
            {},
            "only 'text'",
        ),
        ([{"role": "user", "content": "hi"}], {"temperature": 3}, "temperature"),
        ([{"role": "user", "content": "hi"}], {"max_tokens": 5000}, "max_tokens"),
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


def test_the_head_of_an_exchange_is_what_the_resent_conversation_continues():
    opening = prompt((SYSTEM, "s"), (USER, "hi"))
    assert continues_digest(opening) == ""  # nothing answered yet: a new conversation
    assert continues_digest(prompt((USER, "hi"), (USER, "again"))) == ""
    head = head_digest(opening, "hello")
    assert re.fullmatch("[0-9a-f]{32}", head)
    resent = prompt((USER, "hi"), (ASSISTANT, "hello"), (USER, "more"))
    # System messages are no part of the conversation: dropped, added or changed, the head is the same.
    assert continues_digest(resent) == head == head_digest(prompt((USER, "hi")), "hello")
    assert continues_digest([*prompt((SYSTEM, "other")), *resent]) == head
    assert head_digest(opening, "hello!") != head
    assert continues_digest(prompt((USER, "hi"), (ASSISTANT, "hello"), (USER, "more"), (USER, "x"))) != head
    # Contents that join alike are still different conversations.
    assert head_digest(prompt((USER, "a\nb")), "c") != head_digest(prompt((USER, "a")), "b\nc")


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
        assert re.fullmatch(CONVERSATION_ID_PATTERN, reply.conversation_id)
        assert stored(pg, "user-oai-grpc") == [
            (reply.conversation_id, "user", "Over gRPC"),
            (reply.conversation_id, "assistant", reply.response),
        ]
        # The same rules as the OpenAI API's: the resent conversation continues the stored one.
        resent = chat_pb2.ChatTurn(
            user_id="user-oai-grpc",
            message="Again",
            max_tokens=20,
            messages=prompt((USER, "Over gRPC"), (ASSISTANT, reply.response), (USER, "Again")),
        )
        again = stub.Chat(chat_pb2.ChatRequest(turn=resent), metadata=metadata, timeout=10)
        assert again.conversation_id == reply.conversation_id
        assert len(stored(pg, "user-oai-grpc")) == 4
        other = stub.Chat(chat_pb2.ChatRequest(turn=turn), metadata=metadata, timeout=10)
        assert other.conversation_id != reply.conversation_id

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
