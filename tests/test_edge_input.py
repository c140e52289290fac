"""Text the store could not keep (a NUL, a lone surrogate) stops at the edge: 422 naming the field and why,
before any turn runs or anything is stored, on every route that stores text."""

from __future__ import annotations

import json
import uuid

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ops.launcher import Mesh
from tests.meshes import ShardConnections

NUL = "\x00"
LONE_SURROGATE = "\ud800"
BAD_TEXTS = {
    "nul": (NUL, "must not contain the NUL character (U+0000)"),
    "lone-surrogate": (LONE_SURROGATE, "is not valid Unicode: lone surrogate"),
}
# Words that would name a part of the mesh rather than the request.
MESH_WORDS = ("database", "postgres", "store", "chat_svc", "inference", "grpc")


def new_user() -> str:
    return f"user-{uuid.uuid4().hex[:10]}"


def post_json(edge: httpx.Client, method: str, path: str, body: dict) -> httpx.Response:
    # Python's json module writes a lone surrogate as the escape "\ud800", as a JavaScript client would.
    return edge.request(
        method, path, content=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )


def generated_prompt_tokens(mesh: Mesh) -> float:
    text = httpx.get(mesh.up_info()["metrics"]["inference"], timeout=5).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "chatterbot_engine_prompt_tokens_total"
    )


def stored_rows(pg: ShardConnections, user: str) -> int:
    """Rows of `user`, and of any user id that begins with it (the bad ids of a test)."""
    return sum(
        pg.count(f"SELECT count(*) FROM {table} WHERE user_id LIKE %s", (f"{user}%",))
        for table in ("users", "conversations", "messages")
    )


def assert_refused(r: httpx.Response, field: str, reason: str) -> None:
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    problem = r.json()
    assert problem["status"] == 422 and problem["title"] == "Unprocessable Entity"
    assert f"{field} {reason}" in problem["detail"], problem["detail"]
    assert not any(word in problem["detail"].lower() for word in MESH_WORDS), problem["detail"]


def turn_cases(user: str, bad: str) -> list[tuple[dict, str]]:
    """(body, field named) of a chat turn with `bad` text in each text field."""
    return [
        ({"message": f"hello {bad} world", "user_id": user}, "message"),
        ({"message": "hello", "user_id": user, "context": ["fine", f"bad {bad}"]}, "context.1"),
        ({"message": "hello", "user_id": f"{user}{bad}"}, "user_id"),
    ]


@pytest.mark.parametrize("kind", BAD_TEXTS)
@pytest.mark.parametrize("path", ["/chat", "/async-chat", "/stream-chat"])
def test_seed_turn_routes_refuse_unstorable_text(mesh, edge, pg, path, kind) -> None:
    bad, reason = BAD_TEXTS[kind]
    user = new_user()
    generated = generated_prompt_tokens(mesh)
    for body, field in turn_cases(user, bad):
        for stream in (False, True) if path == "/chat" else (False,):
            r = post_json(edge, "POST", path, {**body, "stream": stream})
            assert_refused(r, field, reason)
    assert stored_rows(pg, user) == 0
    assert generated_prompt_tokens(mesh) == generated  # no turn reached the engine


@pytest.mark.parametrize("kind", BAD_TEXTS)
def test_openai_completions_refuse_unstorable_text(mesh, edge, pg, kind) -> None:
    bad, reason = BAD_TEXTS[kind]
    user = new_user()
    generated = generated_prompt_tokens(mesh)
    cases = [
        ({"messages": [{"role": "user", "content": f"hi {bad}"}], "user": user}, "messages.0.content"),
        (
            {
                "messages": [
                    {"role": "system", "content": f"be {bad} terse"},
                    {"role": "user", "content": "hi"},
                ],
                "user": user,
            },
            "messages.0.content",
        ),
        (
            {
                "messages": [{"role": "user", "content": [{"type": "text", "text": f"hi {bad}"}]}],
                "user": user,
            },
            "messages.0.content",
        ),
        ({"messages": [{"role": "user", "content": "hi"}], "user": f"{user}{bad}"}, "user"),
        ({"messages": [{"role": "user", "content": "hi"}], "user": user, "stop": [f"x{bad}"]}, "stop"),
    ]
    for body, field in cases:
        for stream in (False, True):
            r = post_json(edge, "POST", "/v1/chat/completions", {**body, "stream": stream})
            assert_refused(r, field, reason)
            error = r.json()["error"]
            assert error["type"] == "invalid_request_error" and error["param"] == field
    assert stored_rows(pg, user) == 0
    assert generated_prompt_tokens(mesh) == generated


@pytest.mark.parametrize("kind", BAD_TEXTS)
def test_conversation_routes_refuse_unstorable_text(edge, pg, kind) -> None:
    bad, reason = BAD_TEXTS[kind]
    user = new_user()
    created = edge.post("/conversations", json={"user_id": user, "title": "Fine"})
    assert created.status_code == 201, created.text
    cid = created.json()["conversation_id"]
    before = stored_rows(pg, user)

    assert_refused(
        post_json(edge, "POST", "/conversations", {"user_id": user, "title": f"T{bad}"}), "title", reason
    )
    assert_refused(
        post_json(edge, "POST", "/conversations", {"user_id": f"{user}{bad}", "title": "T"}),
        "user_id",
        reason,
    )
    assert_refused(
        post_json(edge, "PUT", f"/conversations/{cid}/title", {"user_id": user, "title": f"New {bad}"}),
        "title",
        reason,
    )
    assert_refused(
        post_json(edge, "PUT", f"/conversations/{cid}/title", {"user_id": f"{user}{bad}", "title": "New"}),
        "user_id",
        reason,
    )
    assert stored_rows(pg, user) == before
    [title] = [c["title"] for c in edge.get(f"/conversations/{user}").json()["conversations"]]
    assert title == "Fine"


def test_a_nul_in_a_user_id_of_a_url_is_refused_too(edge) -> None:
    r = edge.get("/conversations/user-%00-nul")
    assert_refused(r, "user_id", BAD_TEXTS["nul"][1])
    r = edge.delete("/conversations/some-conversation", params={"user_id": "user-\x00-nul"})
    assert_refused(r, "user_id", BAD_TEXTS["nul"][1])
