"""Server-sent events are framed as the spec says: lines end only at CR, LF or CRLF. Unicode's own line and
paragraph separators (U+2028, U+2029, U+0085), which JSON leaves raw inside strings, stay inside one `data:`
line on every streaming route.

The routes are driven through a mesh of this module's own whose `openai` engine streams from a small
OpenAI-compatible upstream served here, the only engine that can put such characters into tokens.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import httpx_sse
import openai
import orjson
import pytest
import uvicorn
from httpx_sse._decoders import SSEDecoder, SSELineDecoder
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from edge.sse import encode
from ops.launcher import Mesh
from tests.meshes import API_KEY, own_mesh

SEPARATORS = {"LINE SEPARATOR": "\u2028", "PARAGRAPH SEPARATOR": "\u2029", "NEXT LINE": "\u0085"}
# Tokens the upstream streams: each separator inside a token, at its start and at its end.
TOKENS = ["Line\u2028separated", " \u2029paragraph", " next line\u0085", " and\u2028\u2029\u0085all", "."]
ANSWER = "".join(TOKENS)
UPSTREAM_KEY = "upstream-key"
UPSTREAM_MODEL = "separator-model"
MODEL_ID = "chatterbot-separators"


def decode(stream: bytes) -> list[httpx_sse.ServerSentEvent]:
    """The events of `stream`, parsed as the SSE spec says (httpx-sse's decoder)."""
    lines, decoder, events = SSELineDecoder(), SSEDecoder(), []
    for line in [*lines.decode(stream.decode()), *lines.flush()]:
        event = decoder.decode(line.rstrip("\n"))
        if event is not None:
            events.append(event)
    return events


# --- edge.sse.encode against the spec ---


def test_single_line_data_is_one_data_line() -> None:
    assert encode({"id": "7", "data": '{"token":"hi"}'}) == b'id: 7\r\ndata: {"token":"hi"}\r\n\r\n'


def test_event_name_and_empty_data() -> None:
    assert encode({"event": "error", "data": ""}) == b"event: error\r\ndata: \r\n\r\n"


@pytest.mark.parametrize(
    ("data", "lines"),
    [
        ("one\ntwo", ["one", "two"]),
        ("one\r\ntwo", ["one", "two"]),
        ("one\rtwo", ["one", "two"]),
        ("one\r\n\r\ntwo\n", ["one", "", "two", ""]),
    ],
)
def test_cr_lf_and_crlf_each_start_a_new_data_line(data: str, lines: list[str]) -> None:
    body = encode({"data": data}).decode()
    assert body == "".join(f"data: {line}\r\n" for line in lines) + "\r\n"
    [event] = decode(body.encode())
    assert event.data == "\n".join(lines)


@pytest.mark.parametrize("char", [*SEPARATORS.values(), "\x0b", "\x0c", "\x1c", "\x1d", "\x1e"], ids=repr)
def test_other_line_breaks_stay_inside_one_data_line(char: str) -> None:
    data = orjson.dumps({"token": f"a{char}b"}).decode()
    body = encode({"id": "1", "data": data})
    assert body == f"id: 1\r\ndata: {data}\r\n\r\n".encode()
    [event] = decode(body)
    assert orjson.loads(event.data) == {"token": f"a{char}b"}


# --- every streaming route, through a mesh whose engine streams those characters ---


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def upstream_app() -> Starlette:
    """An OpenAI-compatible upstream that answers every prompt with TOKENS."""

    async def models(request: Request) -> Response:
        return JSONResponse(
            {"object": "list", "data": [{"id": UPSTREAM_MODEL, "object": "model", "max_model_len": 4096}]}
        )

    async def completions(request: Request) -> Response:
        if request.headers.get("authorization") != f"Bearer {UPSTREAM_KEY}":
            return JSONResponse({"error": {"message": "bad key", "code": 401}}, status_code=401)
        return StreamingResponse(stream(), media_type="text/event-stream")

    def chunk(delta: dict, finish: str | None = None) -> bytes:
        body = {
            "id": "chatcmpl-upstream",
            "object": "chat.completion.chunk",
            "model": UPSTREAM_MODEL,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        return b"data: " + orjson.dumps(body) + b"\n\n"  # orjson leaves U+2028, U+2029, U+0085 raw

    async def stream() -> AsyncIterator[bytes]:
        yield chunk({"role": "assistant"})
        for token in TOKENS:
            yield chunk({"content": token})
        yield chunk({}, "stop")
        usage = {"prompt_tokens": 9, "completion_tokens": len(TOKENS), "total_tokens": 9 + len(TOKENS)}
        yield b"data: " + orjson.dumps({"id": "chatcmpl-upstream", "choices": [], "usage": usage}) + b"\n\n"
        yield b"data: [DONE]\n\n"

    return Starlette(
        routes=[Route("/v1/models", models), Route("/v1/chat/completions", completions, methods=["POST"])]
    )


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    """The upstream's base URL; uvicorn serves it from a thread of its own (the tests block)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(upstream_app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "the upstream did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=5)


@pytest.fixture(scope="module")
def separator_mesh(servers, tmp_path_factory, upstream) -> Iterator[Mesh]:
    """A mesh on its own NATS (its queued jobs reach only its workers) with the `openai` engine."""
    with own_mesh(
        servers,
        tmp_path_factory,
        "sse-framing-mesh",
        own_nats=True,
        inference_engine="openai",
        model_name=MODEL_ID,
        openai_base_url=upstream,
        openai_api_key=UPSTREAM_KEY,
        openai_model=UPSTREAM_MODEL,
        openai_timeout_seconds=10,
    ) as mesh:
        yield mesh


@pytest.fixture
def edge_client(separator_mesh: Mesh) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=separator_mesh.edge_url, headers={"X-API-Key": API_KEY}, timeout=30) as c:
        yield c


def read_events(edge: httpx.Client, method: str, path: str, **kwargs) -> list[httpx_sse.ServerSentEvent]:
    """Every event of a stream, read as the SSE spec says (not with iter_lines, which splits at U+2028)."""
    with httpx_sse.connect_sse(edge, method, path, **kwargs) as source:
        assert source.response.status_code == 200, source.response.read()
        assert source.response.headers["content-type"].startswith("text/event-stream")
        return list(source.iter_sse())


def seed_answer(events: list[httpx_sse.ServerSentEvent]) -> str:
    """The answer of a seed stream ({token, done} events, then [DONE]); each data is one whole JSON body."""
    assert [e.event for e in events] == ["message"] * len(events), [e.data for e in events]
    assert events[-1].data == "[DONE]"
    bodies = [orjson.loads(e.data) for e in events[:-1]]
    assert bodies[-1]["done"] is True and bodies[-1]["finish_reason"] == "stop"
    assert all(body["done"] is False for body in bodies[:-1])
    return "".join(body["token"] for body in bodies)


def test_chat_stream_keeps_separators_inside_tokens(edge_client) -> None:
    body = {"message": "Say it with separators", "user_id": "user-sse-chat", "stream": True}
    events = read_events(edge_client, "POST", "/chat", json=body)
    assert seed_answer(events) == ANSWER


def test_queued_stream_keeps_separators_inside_tokens(edge_client) -> None:
    accepted = edge_client.post(
        "/stream-chat", json={"message": "Queue it with separators", "user_id": "user-sse-queued"}
    )
    assert accepted.status_code == 200, accepted.text
    events = read_events(edge_client, "GET", accepted.json()["stream_endpoint"])
    assert seed_answer(events) == ANSWER


def test_openai_stream_keeps_separators_inside_deltas(separator_mesh) -> None:
    with openai.OpenAI(
        base_url=f"{separator_mesh.edge_url}/v1", api_key=API_KEY, max_retries=0, timeout=30
    ) as client:
        stream = client.chat.completions.create(
            model=MODEL_ID,
            messages=[{"role": "user", "content": "Complete it with separators"}],
            user="user-sse-openai",
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == ANSWER
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_streams_record_time_to_first_token_and_token_events(edge_client) -> None:
    read_events(
        edge_client,
        "POST",
        "/chat",
        json={"message": "Count it", "user_id": "user-sse-meter", "stream": True},
    )
    metrics = {
        (sample.name, sample.labels.get("route")): sample.value
        for family in text_string_to_metric_families(edge_client.get("/metrics").text)
        for sample in family.samples
    }
    assert metrics[("chatterbot_edge_time_to_first_token_seconds_count", "/chat")] >= 1
    # Tokens that arrive together may travel as one event; there is at least one.
    assert metrics[("chatterbot_edge_stream_events_total", "/chat")] >= 1
