"""API keys on the whole mesh: made, listed and revoked with the CLI, stored hashed on the control shard,
scoped by kind at the edge and on chat_svc's gRPC surface, and revoked within seconds."""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from pathlib import Path

import grpc
import httpx
import pytest

from chatterbot.api_keys import ADMIN, SERVICE, USER, ApiKeyRecord, KeyResolver
from chatterbot.v1 import chat_pb2, chat_pb2_grpc
from tests.clients import chat_body, create_key, keys_cli, new_user
from tests.meshes import ADMIN_KEY, API_KEY

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def client(mesh) -> httpx.Client:
    """A client with no key of its own."""
    with httpx.Client(base_url=mesh.edge_url, timeout=30) as c:
        yield c


def as_key(key: str) -> dict[str, str]:
    return {"X-API-Key": key}


# --- the CLI and the store ---


def test_keys_are_created_listed_and_revoked_with_the_cli(mesh):
    user = new_user()
    made = create_key(mesh, "--user", user, "--rpm", "7", "--tpm", "900", "--name", "mobile app")
    prefix = made.key[:11]

    listed = keys_cli(mesh, "list", "--user", user)
    assert listed.returncode == 0, listed.stderr
    header, row = listed.stdout.splitlines()
    assert header.split()[:8] == ["id", "prefix", "kind", "user", "rpm", "tpm", "created", "revoked"]
    assert row.split()[:6] == [made.key_id, prefix, "user", user, "7", "900"]
    # Not revoked; limits of its own (rpm, tpm), so none per route.
    assert row.split()[8:] == ["-", "none", "mobile", "app"]
    # The key itself is printed once, at creation, and never again.
    assert made.key not in listed.stdout

    revoked = keys_cli(mesh, "revoke", prefix)
    assert revoked.returncode == 0, revoked.stderr
    assert f"revoked {made.key_id}" in revoked.stdout
    row = keys_cli(mesh, "list", "--user", user).stdout.splitlines()[1]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d", row.split()[8]) and row.split()[10:] == ["none", "mobile", "app"]
    # Revoking again is harmless; an unknown key is an error.
    assert keys_cli(mesh, "revoke", made.key_id).returncode == 0
    missing = keys_cli(mesh, "revoke", "no-such-key")
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr


def test_service_and_admin_keys_name_no_user(mesh):
    service = create_key(mesh, "--service")
    admin = create_key(mesh, "--admin", "--name", "ops")
    rows = {line.split()[0]: line.split() for line in keys_cli(mesh, "list").stdout.splitlines()[1:]}
    assert rows[service.key_id][2:4] == ["service", "-"]
    assert rows[admin.key_id][2:4] == ["admin", "-"]
    refused = keys_cli(mesh, "create", "--user", "ab")
    assert refused.returncode == 2 and "--user" in refused.stderr


def test_keys_are_stored_hashed_on_the_control_shard(mesh, pg):
    made = create_key(mesh, "--user", new_user())
    control, other = pg.connections
    rows = control.execute(
        "SELECT key_hash, prefix, row_to_json(k)::text FROM api_keys k WHERE key_id = %s", (made.key_id,)
    ).fetchall()
    assert len(rows) == 1
    key_hash, prefix, whole_row = rows[0]
    assert bytes(key_hash) == hashlib.sha256(made.key.encode()).digest()
    assert prefix == made.key[:11]
    secret_part = made.key[11:]
    assert secret_part not in whole_row and made.key not in whole_row
    assert other.execute("SELECT count(*) FROM api_keys").fetchone()[0] == 0


# --- kinds at the edge ---


def test_missing_key_is_401_and_unknown_or_malformed_keys_are_403(client):
    r = client.post("/chat", json=chat_body(new_user()))
    assert r.status_code == 401 and r.headers["content-type"] == "application/problem+json"
    assert "WWW-Authenticate" in r.headers
    for key in ("cb_" + "x" * 43, "not-a-key"):
        r = client.post("/chat", json=chat_body(new_user()), headers=as_key(key))
        assert r.status_code == 403, r.text


def test_a_bearer_token_works_like_the_x_api_key_header(mesh, client):
    user = new_user()
    made = create_key(mesh, "--user", user)
    r = client.post("/chat", json=chat_body(user), headers={"Authorization": f"Bearer {made.key}"})
    assert r.status_code == 200, r.text
    r = client.post("/chat", json=chat_body(user), headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 200, r.text
    r = client.post("/chat", json=chat_body(user), headers={"Authorization": "Bearer cb_nope"})
    assert r.status_code == 403


def test_a_user_key_acts_only_for_its_own_user(mesh, client):
    user, stranger = new_user(), new_user()
    key = as_key(create_key(mesh, "--user", user).key)

    own = client.post("/chat", json=chat_body(user), headers=key)
    assert own.status_code == 200, own.text
    cid = own.json()["conversation_id"]
    assert client.get(f"/conversations/{user}", headers=key).status_code == 200
    assert client.get(f"/history/{user}", params={"conversation_id": cid}, headers=key).status_code == 200

    # Every route that takes a user_id refuses another user, before anything is stored.
    refused = [
        client.post("/chat", json=chat_body(stranger), headers=key),
        client.post("/chat", json=chat_body(stranger, stream=True), headers=key),
        client.post("/async-chat", json=chat_body(stranger), headers=key),
        client.post("/stream-chat", json=chat_body(stranger), headers=key),
        client.get(f"/conversations/{stranger}", headers=key),
        client.post("/conversations", json={"user_id": stranger, "title": "x"}, headers=key),
        client.get(f"/history/{stranger}", params={"conversation_id": cid}, headers=key),
        client.put(f"/conversations/{cid}/title", json={"user_id": stranger, "title": "x"}, headers=key),
        client.delete(f"/conversations/{cid}", params={"user_id": stranger}, headers=key),
    ]
    for r in refused:
        assert r.status_code == 403, (r.request.method, r.request.url, r.text)
        assert user in r.json()["detail"]
    assert client.get(f"/conversations/{stranger}", headers=as_key(API_KEY)).json()["conversations"] == []


def test_a_user_key_cannot_see_another_users_queued_chat(mesh, client):
    user, stranger = new_user(), new_user()
    key = as_key(create_key(mesh, "--user", user).key)
    theirs = client.post("/async-chat", json=chat_body(stranger), headers=as_key(API_KEY)).json()[
        "correlation_id"
    ]
    mine = client.post("/async-chat", json=chat_body(user), headers=key)
    assert mine.status_code == 200, mine.text

    # Another user's correlation id answers exactly like one that does not exist.
    assert client.get(f"/check-response/{theirs}", headers=key).status_code == 404
    assert client.get(f"/stream/{theirs}", headers=key).status_code == 404
    assert client.delete(f"/stream/{theirs}", headers=key).status_code == 404
    assert client.get(f"/check-response/{theirs}", headers=as_key(API_KEY)).status_code == 200
    assert client.get(f"/check-response/{mine.json()['correlation_id']}", headers=key).status_code == 200


def test_a_service_key_from_the_store_acts_for_any_user(mesh, client):
    key = as_key(create_key(mesh, "--service").key)
    for user in (new_user(), new_user()):
        assert client.post("/chat", json=chat_body(user), headers=key).status_code == 200


def test_only_admin_keys_reach_debug_routes(mesh, client):
    user_key = create_key(mesh, "--user", new_user()).key
    service_key = create_key(mesh, "--service").key
    admin_key = create_key(mesh, "--admin").key
    for key, status in (
        (user_key, 403),
        (service_key, 403),
        (API_KEY, 403),
        (admin_key, 200),
        (ADMIN_KEY, 200),
    ):
        r = client.get("/debug/queue-stats", headers=as_key(key))
        assert r.status_code == status, (key[:11], r.text)
    # An admin key also acts for any user.
    assert client.post("/chat", json=chat_body(new_user()), headers=as_key(admin_key)).status_code == 200


def test_a_revoked_key_is_refused_within_the_cache_time(mesh, client):
    user = new_user()
    made = create_key(mesh, "--user", user)
    key = as_key(made.key)
    assert client.post("/chat", json=chat_body(user), headers=key).status_code == 200  # cached at the edge
    channel = grpc.insecure_channel(mesh.services["chat"].url)
    stub = chat_pb2_grpc.ChatServiceStub(channel)
    turn = chat_pb2.ChatTurn(user_id=user, message="Hello over gRPC", max_tokens=10)
    stub.Chat(
        chat_pb2.ChatRequest(turn=turn), metadata=(("x-api-key", made.key),), timeout=10
    )  # cached there

    assert keys_cli(mesh, "revoke", made.key_id).returncode == 0
    revoked_at = time.monotonic()
    limit = float(mesh.services["edge"].env["CHATTERBOT_API_KEY_CACHE_SECONDS"]) + 1.0
    while client.post("/chat", json=chat_body(user), headers=key).status_code != 403:
        assert time.monotonic() - revoked_at < limit, "the edge still accepts a revoked key"
        time.sleep(0.2)
    while True:
        try:
            stub.Chat(chat_pb2.ChatRequest(turn=turn), metadata=(("x-api-key", made.key),), timeout=10)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.PERMISSION_DENIED
            break
        assert time.monotonic() - revoked_at < limit, "chat_svc still accepts a revoked key"
        time.sleep(0.2)
    channel.close()


# --- kinds on chat_svc's gRPC surface ---


def test_grpc_user_key_for_another_user_is_permission_denied(mesh):
    user, stranger = new_user(), new_user()
    key = create_key(mesh, "--user", user).key
    metadata = (("x-api-key", key),)
    with grpc.insecure_channel(mesh.services["chat"].url) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        reply = stub.Chat(
            chat_pb2.ChatRequest(turn=chat_pb2.ChatTurn(user_id=user, message="Hi", max_tokens=10)),
            metadata=metadata,
            timeout=10,
        )
        assert reply.response

        denied = [
            lambda: stub.Chat(
                chat_pb2.ChatRequest(turn=chat_pb2.ChatTurn(user_id=stranger, message="Hi")),
                metadata=metadata,
                timeout=10,
            ),
            lambda: list(
                stub.StreamChat(
                    chat_pb2.StreamChatRequest(turn=chat_pb2.ChatTurn(user_id=stranger, message="Hi")),
                    metadata=metadata,
                    timeout=10,
                )
            ),
            lambda: stub.SubmitChat(
                chat_pb2.SubmitChatRequest(turn=chat_pb2.ChatTurn(user_id=stranger, message="Hi")),
                metadata=metadata,
                timeout=10,
            ),
            lambda: stub.ListConversations(
                chat_pb2.ListConversationsRequest(user_id=stranger), metadata=metadata, timeout=10
            ),
            lambda: stub.CreateConversation(
                chat_pb2.CreateConversationRequest(user_id=stranger), metadata=metadata, timeout=10
            ),
        ]
        for call in denied:
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, err.value.details()

        theirs = stub.SubmitChat(
            chat_pb2.SubmitChatRequest(turn=chat_pb2.ChatTurn(user_id=stranger, message="Hi")),
            metadata=(("x-api-key", API_KEY),),
            timeout=10,
        ).correlation_id
        with pytest.raises(grpc.RpcError) as err:
            stub.GetChatResult(
                chat_pb2.GetChatResultRequest(correlation_id=theirs), metadata=metadata, timeout=10
            )
        assert err.value.code() == grpc.StatusCode.NOT_FOUND

        for metadata, code in (
            ((), grpc.StatusCode.UNAUTHENTICATED),
            ((("x-api-key", "cb_" + "y" * 43),), grpc.StatusCode.PERMISSION_DENIED),
        ):
            with pytest.raises(grpc.RpcError) as err:
                stub.ListConversations(
                    chat_pb2.ListConversationsRequest(user_id=user), metadata=metadata, timeout=10
                )
            assert err.value.code() == code


# --- the resolver on its own ---


async def test_the_resolver_caches_answers_briefly_and_shares_lookups():
    now = [0.0]
    calls: list[bytes] = []
    records = {"cb_live": ApiKeyRecord("k1", "cb_live", USER, "alice", requests_per_minute=3)}

    async def lookup(digest: bytes) -> ApiKeyRecord | None:
        calls.append(digest)
        await asyncio.sleep(0.01)
        for key, record in records.items():
            if hashlib.sha256(key.encode()).digest() == digest:
                return record
        return None

    resolver = KeyResolver(
        service_keys=["static-s"],
        admin_keys=["static-a"],
        lookup=lookup,
        cache_seconds=5,
        clock=lambda: now[0],
    )
    assert (await resolver.resolve("static-s")).kind == SERVICE
    assert (await resolver.resolve("static-a")).kind == ADMIN
    assert await resolver.resolve("not-shaped-like-a-key") is None
    assert calls == []  # static and malformed keys need no lookup

    found = await asyncio.gather(*(resolver.resolve("cb_live") for _ in range(10)))
    assert len(calls) == 1 and all(p.user_id == "alice" and p.requests_per_minute == 3 for p in found)
    assert found[0].may_act_for("alice") and not found[0].may_act_for("bob")

    assert await resolver.resolve("cb_unknown") is None
    assert await resolver.resolve("cb_unknown") is None
    assert len(calls) == 2  # "no such key" is cached too ...
    now[0] = 1.5
    assert await resolver.resolve("cb_unknown") is None
    assert len(calls) == 3  # ... but for a second only

    records.clear()  # revoked or deleted
    now[0] = 4.9
    assert (await resolver.resolve("cb_live")) is not None  # still cached
    now[0] = 5.1
    assert await resolver.resolve("cb_live") is None  # looked up again: gone
