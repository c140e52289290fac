"""The history half of the public API through the whole mesh (edge → chat_svc → store_svc on two shards),
and context that survives a Redis flush."""

from __future__ import annotations

import time
import uuid

import grpc
import httpx

from chatterbot.v1 import (
    chat_pb2,
    chat_pb2_grpc,
    context_pb2,
    context_pb2_grpc,
    store_pb2,
    store_pb2_grpc,
    types_pb2,
)
from context_svc.turns import context_key
from tests.clients import create_key
from tests.meshes import API_KEY


def new_user() -> str:
    return f"user-{uuid.uuid4().hex[:10]}"


def chat(edge: httpx.Client, user: str, message: str, conversation_id: str | None = None) -> dict:
    body = {"message": message, "user_id": user, "max_tokens": 20}
    if conversation_id:
        body["conversation_id"] = conversation_id
    r = edge.post("/chat", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_create_list_rename_and_delete_a_conversation(edge):
    user = new_user()
    created = edge.post("/conversations", json={"user_id": user, "title": "Trip to Lisbon"})
    assert created.status_code == 201, created.text
    conversation = created.json()
    assert conversation["title"] == "Trip to Lisbon" and conversation["message_count"] == 0
    cid = conversation["conversation_id"]

    other = chat(edge, user, "A second conversation")["conversation_id"]
    listed = edge.get(f"/conversations/{user}").json()
    assert [c["conversation_id"] for c in listed["conversations"]] == [other, cid]
    assert listed["next_page_token"] is None
    first_page = edge.get(f"/conversations/{user}", params={"limit": 1}).json()
    assert [c["conversation_id"] for c in first_page["conversations"]] == [other]
    second_page = edge.get(
        f"/conversations/{user}", params={"limit": 1, "page_token": first_page["next_page_token"]}
    )
    assert [c["conversation_id"] for c in second_page.json()["conversations"]] == [cid]

    renamed = edge.put(f"/conversations/{cid}/title", json={"user_id": user, "title": "Lisbon, May"})
    assert renamed.status_code == 200 and renamed.json()["title"] == "Lisbon, May"
    assert edge.get(f"/conversations/{user}").json()["conversations"][0]["conversation_id"] == cid

    deleted = edge.delete(f"/conversations/{cid}", params={"user_id": user})
    assert deleted.status_code == 200 and deleted.json() == {"conversation_id": cid, "deleted_messages": 0}
    assert [c["conversation_id"] for c in edge.get(f"/conversations/{user}").json()["conversations"]] == [
        other
    ]
    assert edge.delete(f"/conversations/{cid}", params={"user_id": user}).status_code == 404


def test_history_pages_backwards_with_the_before_cursor(edge):
    user = new_user()
    cid = chat(edge, user, "one")["conversation_id"]
    chat(edge, user, "two", cid)
    chat(edge, user, "three", cid)

    newest = edge.get(f"/history/{user}", params={"conversation_id": cid, "limit": 4}).json()
    assert [m["role"] for m in newest["messages"]] == ["user", "assistant"] * 2
    assert [m["content"] for m in newest["messages"] if m["role"] == "user"] == ["two", "three"]
    assert all(m["token_count"] > 0 and m["created_at"].endswith("Z") for m in newest["messages"])
    assert newest["messages"][1]["processing_time"] > 0 and newest["messages"][0]["processing_time"] is None
    older = edge.get(
        f"/history/{user}", params={"conversation_id": cid, "limit": 4, "before": newest["next_before"]}
    )
    assert [m["content"] for m in older.json()["messages"] if m["role"] == "user"] == ["one"]
    assert older.json()["next_before"] is None
    ids = [m["message_id"] for m in older.json()["messages"] + newest["messages"]]
    assert ids == sorted(ids)


def test_a_user_cannot_read_rename_or_delete_another_users_conversation(edge):
    alice, bob = new_user(), new_user()
    cid = chat(edge, alice, "alice's secret")["conversation_id"]

    assert edge.get(f"/history/{bob}", params={"conversation_id": cid}).status_code == 404
    r = edge.put(f"/conversations/{cid}/title", json={"user_id": bob, "title": "mine now"})
    assert r.status_code == 404 and r.headers["content-type"].startswith("application/problem+json")
    assert edge.delete(f"/conversations/{cid}", params={"user_id": bob}).status_code == 404
    assert edge.get(f"/conversations/{bob}").json()["conversations"] == []

    history = edge.get(f"/history/{alice}", params={"conversation_id": cid}).json()
    assert history["messages"][0]["content"] == "alice's secret"
    assert edge.get(f"/conversations/{alice}").json()["conversations"][0]["title"] == "alice's secret"


def test_deleting_a_conversation_removes_its_messages_and_its_cached_context(edge, pg, valkey):
    user = new_user()
    cid = chat(edge, user, "forget me")["conversation_id"]
    assert valkey.exists(context_key(user, cid))

    r = edge.delete(f"/conversations/{cid}", params={"user_id": user})
    assert r.status_code == 200 and r.json()["deleted_messages"] == 2
    assert not valkey.exists(context_key(user, cid))
    assert (
        pg.user(user).execute("SELECT count(*) FROM messages WHERE user_id = %s", (user,)).fetchone()[0] == 0
    )
    assert edge.get(f"/history/{user}", params={"conversation_id": cid}).status_code == 404
    # The conversation id starts afresh: nothing of the deleted turns comes back as context.
    assert "2 messages" in chat(edge, user, "new start", cid)["response"]


def test_context_survives_a_redis_flush(edge, mesh, valkey):
    user = new_user()
    first = chat(edge, user, "My name is Ada.")
    valkey.flushall()
    second = chat(edge, user, "What is my name?", first["conversation_id"])
    # System prompt, the first question and answer (rebuilt from PostgreSQL), and the new question.
    assert "4 messages" in second["response"]

    with grpc.insecure_channel(mesh.services["context"].url) as channel:
        stub = context_pb2_grpc.ContextServiceStub(channel)
        request = context_pb2.GetContextRequest(user_id=user, conversation_id=first["conversation_id"])
        assert len(stub.GetContext(request, timeout=10).turns) == 4
        valkey.flushall()
        rebuilt = stub.GetContext(request, timeout=10)
    assert rebuilt.source == context_pb2.CONTEXT_SOURCE_STORE
    assert [t.content for t in rebuilt.turns][::2] == ["My name is Ada.", "What is my name?"]


def test_history_shows_a_tool_turn_as_tool_calls_and_tool_results(edge, mesh):
    user = new_user()
    call = types_pb2.ToolCall(id="call-7", name="get_weather", arguments='{"city": "Lisbon"}')
    question = "What is the weather in Lisbon?"
    with grpc.insecure_channel(mesh.services["store"].url) as channel:
        # The answer that called a tool, as an engine with tools would have made it.
        asked = store_pb2_grpc.StoreServiceStub(channel).AppendExchange(
            store_pb2.AppendExchangeRequest(
                user_id=user,
                request_id=f"ask-{user}",
                user_message=store_pb2.ExchangeMessage(content=question, token_count=7),
                assistant_message=store_pb2.ExchangeMessage(tool_calls=[call], token_count=12),
                model="sim-7b",
            ),
            timeout=10,
        )
    cid = asked.conversation.conversation_id
    # The tool turn, through ChatService as the OpenAI route sends it: the prompt ends with the call's result.
    with grpc.insecure_channel(mesh.services["chat"].url) as channel:
        answered = chat_pb2_grpc.ChatServiceStub(channel).Chat(
            chat_pb2.ChatRequest(
                turn=chat_pb2.ChatTurn(
                    user_id=user,
                    conversation_id=cid,
                    max_tokens=12,
                    messages=[
                        types_pb2.ChatMessage(role=types_pb2.ROLE_USER, content=question),
                        types_pb2.ChatMessage(role=types_pb2.ROLE_ASSISTANT, tool_calls=[call]),
                        types_pb2.ChatMessage(
                            role=types_pb2.ROLE_TOOL, tool_call_id="call-7", content='{"celsius": 21}'
                        ),
                    ],
                )
            ),
            metadata=(("x-api-key", API_KEY),),
            timeout=30,
        )

    history = edge.get(f"/history/{user}", params={"conversation_id": cid})
    assert history.status_code == 200, history.text
    messages = history.json()["messages"]
    assert [(m["role"], m["tool_call_id"]) for m in messages] == [
        ("user", None),
        ("assistant", None),
        ("tool", "call-7"),
        ("assistant", None),
    ]
    assert messages[1]["tool_calls"] == [
        {
            "id": "call-7",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Lisbon"}'},
        }
    ]
    assert messages[1]["content"] == "" and messages[1]["processing_time"] is not None
    assert messages[2]["content"] == '{"celsius": 21}' and messages[2]["processing_time"] is None
    assert messages[3]["content"] == answered.response and messages[3]["tool_calls"] is None
    assert messages[0]["tool_calls"] is None
    assert edge.get(f"/conversations/{user}").json()["conversations"][0]["message_count"] == 4
    # The seed's form, across conversations, shows them alike.
    latest = edge.get(f"/history/{user}").json()["messages"]
    assert [m["tool_call_id"] for m in latest] == [None, None, "call-7", None]
    assert latest[1]["tool_calls"] == messages[1]["tool_calls"]


def test_the_openapi_schema_documents_tool_calls_and_tool_results_in_history(edge):
    schema = edge.get("/openapi.json").json()
    schemas = schema["components"]["schemas"]

    def resolve(ref: str) -> dict:
        return schemas[ref.rsplit("/", 1)[1]]

    message = schemas["HistoryMessage"]["properties"]
    assert "tool" in message["role"]["enum"]
    assert "tool message" in message["tool_call_id"]["description"]
    calls = next(option for option in message["tool_calls"]["anyOf"] if option.get("type") == "array")
    call = resolve(calls["items"]["$ref"])
    assert set(call["properties"]) == {"id", "type", "function"}
    assert call["properties"]["type"]["const"] == "function"
    assert set(resolve(call["properties"]["function"]["$ref"])["required"]) == {"name", "arguments"}


def test_history_routes_validate_and_authenticate(mesh, edge):
    assert edge.get(f"/history/{new_user()}").json()["messages"] == []  # the seed's form: every conversation
    assert edge.get("/conversations/ab").status_code == 422
    assert edge.post("/conversations", json={"user_id": "ab"}).status_code == 422
    assert edge.put("/conversations/c1/title", json={"user_id": new_user(), "title": ""}).status_code == 422
    assert httpx.get(f"{mesh.edge_url}/conversations/{new_user()}").status_code == 401
    assert (
        httpx.get(f"{mesh.edge_url}/conversations/{new_user()}", headers={"X-API-Key": "nope"}).status_code
        == 403
    )


def test_the_matching_chat_service_rpcs_over_grpc(mesh):
    user = new_user()
    metadata = (("x-api-key", API_KEY),)
    with grpc.insecure_channel(mesh.services["chat"].url) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        created = stub.CreateConversation(
            chat_pb2.CreateConversationRequest(user_id=user, title="over gRPC"), metadata=metadata, timeout=10
        )
        listed = stub.ListConversations(
            chat_pb2.ListConversationsRequest(user_id=user), metadata=metadata, timeout=10
        )
        assert [c.title for c in listed.conversations] == ["over gRPC"]
        deleted = stub.DeleteConversation(
            chat_pb2.DeleteConversationRequest(
                user_id=user, conversation_id=created.conversation.conversation_id
            ),
            metadata=metadata,
            timeout=10,
        )
        assert deleted.message_count == 0


def test_the_seed_apis_conversation_routes_still_answer(edge):
    user = new_user()
    first = chat(edge, user, "first conversation")["conversation_id"]
    second = chat(edge, user, "second conversation")["conversation_id"]

    # GET /history/{user_id} without conversation_id: the latest messages, newest conversation first.
    latest = edge.get(f"/history/{user}")
    assert latest.status_code == 200, latest.text
    body = latest.json()
    assert body["conversation_id"] is None and body["next_page_token"] is None
    assert [(m["conversation_id"], m["role"]) for m in body["messages"]] == [
        (second, "user"),
        (second, "assistant"),
        (first, "user"),
        (first, "assistant"),
    ]
    paged = edge.get(f"/history/{user}", params={"limit": 1}).json()
    assert [m["role"] for m in paged["messages"]] == ["assistant", "assistant"]

    renamed = edge.put(
        "/conversations/title", json={"user_id": user, "conversation_id": first, "title": "Renamed"}
    )
    assert renamed.status_code == 200 and renamed.json()["title"] == "Renamed"
    deleted = edge.delete(f"/conversations/{user}/{second}")
    assert deleted.status_code == 200 and deleted.json() == {"conversation_id": second, "deleted_messages": 2}
    assert [c["conversation_id"] for c in edge.get(f"/conversations/{user}").json()["conversations"]] == [
        first
    ]


def test_the_seed_apis_conversation_routes_keep_user_keys_to_their_user(edge, mesh):
    user, other = new_user(), new_user()
    theirs = chat(edge, other, "not yours")["conversation_id"]
    key = create_key(mesh, "--user", user).key
    headers = {"X-API-Key": key}
    assert edge.get(f"/history/{other}", headers=headers).status_code == 403
    body = {"user_id": other, "conversation_id": theirs, "title": "Mine now"}
    assert edge.put("/conversations/title", json=body, headers=headers).status_code == 403
    assert edge.delete(f"/conversations/{other}/{theirs}", headers=headers).status_code == 403


def test_health_timestamp_is_seconds_since_the_epoch(edge):
    body = edge.get("/health").json()
    assert isinstance(body["timestamp"], float) and abs(body["timestamp"] - time.time()) < 60
    assert body["time"].startswith(time.strftime("%Y", time.gmtime()))
