"""Load tests for any ChatterBot edge, run with the stock `locust` command.

    locust -f tests/load/locustfile.py --host http://127.0.0.1:8000            # the web UI
    locust -f tests/load/locustfile.py --host URL --headless -u 200 -r 20 -t 5m StreamingUser

User classes (pick one or several by name; all run when none is named):
- `StreamingUser`: the seed's streaming scenario, `POST /stream-chat` then `GET /stream/{id}` read to `[DONE]`.
- `ConcurrentUser`: the seed's concurrent-users mix: sync `/chat`, `/async-chat` polled on
  `/check-response/{id}`, and `/chat` with `stream: true`.
- `SoakUser`: the long-running profile: a few users keep one conversation each going turn after turn, slowly,
  for as long as the run lasts (run it for hours; watch p99 and failures stay flat).
- `OpenAIUser`: `POST /v1/chat/completions`, whole and streamed, as an OpenAI SDK client would call it.
- `GrpcUser`: `ChatService.Chat` and `ChatService.StreamChat` called directly on chat_svc's gRPC port
  (ghz-style), with per-RPC latency.

Besides each request's latency, streamed requests report time to first token (`TTFT` rows, milliseconds) and
tokens per second (`TPS` rows; the "response time" column holds tokens/s) in locust's stats.

Settings (environment): `CHATTERBOT_API_KEY` (default: `api_key` of `.chatterbot/up.json`, which `chatterbot
up` writes), `CHATTERBOT_GRPC_CHAT` (host:port of chat_svc; default: `grpc.chat` of up.json),
`CHATTERBOT_LOAD_MAX_TOKENS` (answer length asked for, default 64), `CHATTERBOT_LOAD_MODEL` (OpenAI users;
default: the first of `GET /v1/models`). Use a key whose limits allow the load: static keys are not rate
limited unless `CHATTERBOT_RATE_LIMIT_STATIC_KEYS` is set.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.experimental.gevent
from locust import HttpUser, User, between, constant_pacing, events, task

from chatterbot.v1 import chat_pb2, chat_pb2_grpc

# grpc's own threads do not mix with gevent's monkey-patched ones unless told.
grpc.experimental.gevent.init_gevent()

_UP_JSON = Path(os.environ.get("CHATTERBOT_UP_JSON", ".chatterbot/up.json"))


def _up() -> dict[str, Any]:
    try:
        return json.loads(_UP_JSON.read_text())
    except (OSError, ValueError):
        return {}


API_KEY = os.environ.get("CHATTERBOT_API_KEY") or _up().get("api_key", "")
GRPC_CHAT = os.environ.get("CHATTERBOT_GRPC_CHAT") or _up().get("grpc", {}).get("chat", "127.0.0.1:50051")
MAX_TOKENS = int(os.environ.get("CHATTERBOT_LOAD_MAX_TOKENS", "64"))


_LINE_END = re.compile(rb"\r\n|\r|\n")


def _user_id() -> str:
    return f"load-{uuid.uuid4().hex[:12]}"


def _fire(request_type: str, name: str, value: float, *, exception: BaseException | None = None) -> None:
    events.request.fire(
        request_type=request_type,
        name=name,
        response_time=value,
        response_length=0,
        exception=exception,
        context={},
    )


class _StreamTimer:
    """Time to first token and tokens per second of one stream, reported as locust stats rows."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.started = time.perf_counter()
        self.first: float | None = None
        self.tokens = 0

    def token(self, text: str) -> None:
        if not text:
            return
        if self.first is None:
            self.first = time.perf_counter()
            _fire("TTFT", self.name, (self.first - self.started) * 1000)
        self.tokens += 1

    def done(self) -> None:
        if self.first is None or self.tokens < 2:
            return
        seconds = time.perf_counter() - self.first
        if seconds > 0:
            _fire("TPS", self.name, (self.tokens - 1) / seconds)


def sse_events(lines: Iterator[bytes]) -> Iterator[tuple[str, str]]:
    """(event, data) of a text/event-stream, framed on CR, LF and CRLF only as the SSE spec says."""
    event, data = "message", []
    for raw in lines:
        line = raw.decode()
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                event = value
            elif field == "data":
                data.append(value)
    if data:
        yield event, "\n".join(data)


def _lines(response: Any) -> Iterator[bytes]:
    """The lines of a streamed response body, split on CR, LF and CRLF only."""
    buffer = b""
    for chunk in response.iter_content(chunk_size=None):
        buffer += chunk
        # A CR at the very end may be the first half of a CRLF: keep it for the next read.
        end = len(buffer) - 1 if buffer.endswith(b"\r") else len(buffer)
        *complete, rest = _LINE_END.split(buffer[:end])
        buffer = rest + buffer[end:]
        yield from complete
    if buffer.rstrip(b"\r"):
        yield buffer.rstrip(b"\r")


class _ChatterBotUser(HttpUser):
    abstract = True

    def on_start(self) -> None:
        self.client.headers["X-API-Key"] = API_KEY
        self.user_id = _user_id()

    def body(self, message: str, **extra: Any) -> dict[str, Any]:
        return {"message": message, "user_id": self.user_id, "max_tokens": MAX_TOKENS, **extra}

    def read_stream(self, path: str, name: str, timer_name: str) -> None:
        """Read a seed stream (`{"token", "done"}` events, then `[DONE]`); a stream that ends early fails."""
        timer = _StreamTimer(timer_name)
        with self.client.get(path, name=name, stream=True, catch_response=True, timeout=120) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
                return
            finished = False
            for kind, data in sse_events(_lines(response)):
                if kind == "error":
                    response.failure(f"error event: {data}")
                    return
                if data == "[DONE]":
                    finished = True
                    break
                event = json.loads(data)
                if event.get("error"):
                    response.failure(f"stream error: {event['error']}")
                    return
                timer.token(event.get("token", ""))
            if not finished:
                response.failure("stream ended before [DONE]")
                return
            timer.done()
            response.success()


class StreamingUser(_ChatterBotUser):
    """The seed's streaming scenario: queue a streamed chat, then read its stream to the end."""

    wait_time = between(0.5, 1.5)

    @task
    def stream_chat(self) -> None:
        with self.client.post(
            "/stream-chat", json=self.body("Tell me about streams"), catch_response=True
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
                return
            correlation_id = response.json()["correlation_id"]
        self.read_stream(f"/stream/{correlation_id}", "/stream/[id]", "/stream/[id]")


class ConcurrentUser(_ChatterBotUser):
    """The seed's concurrent-users mix of sync, async-and-poll and streamed chats."""

    wait_time = between(0.5, 2)

    @task(3)
    def sync_chat(self) -> None:
        self.client.post("/chat", json=self.body("Hello there"))

    @task(2)
    def async_chat(self) -> None:
        with self.client.post("/async-chat", json=self.body("Answer when you can"), catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")
                return
            correlation_id = r.json()["correlation_id"]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with self.client.get(
                f"/check-response/{correlation_id}", name="/check-response/[id]", catch_response=True
            ) as r:
                if r.status_code != 200:
                    r.failure(f"HTTP {r.status_code}: {r.text[:200]}")
                    return
                status = r.json().get("status")
                if status == "failed":
                    r.failure(f"job failed: {r.json().get('error')}")
                    return
                if status != "pending":
                    return
            time.sleep(0.2)
        _fire("POLL", "/check-response/[id]", 60_000, exception=TimeoutError("no answer within 60 s"))

    @task(2)
    def streamed_chat(self) -> None:
        timer = _StreamTimer("/chat stream")
        with self.client.post(
            "/chat",
            json=self.body("Stream it", stream=True),
            name="/chat stream",
            stream=True,
            catch_response=True,
            timeout=120,
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
                return
            for kind, data in sse_events(_lines(response)):
                if kind == "error":
                    response.failure(f"error event: {data}")
                    return
                if data == "[DONE]":
                    timer.done()
                    response.success()
                    return
                timer.token(json.loads(data).get("token", ""))
            response.failure("stream ended before [DONE]")


class SoakUser(_ChatterBotUser):
    """Long-running: each user keeps one conversation going, a turn every few seconds."""

    wait_time = constant_pacing(5)

    def on_start(self) -> None:
        super().on_start()
        self.conversation_id = ""

    @task
    def next_turn(self) -> None:
        body = self.body(
            "And then?", **({"conversation_id": self.conversation_id} if self.conversation_id else {})
        )
        with self.client.post("/chat", json=body, name="/chat soak", catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")
                return
            self.conversation_id = r.json()["conversation_id"]


class OpenAIUser(HttpUser):
    """`POST /v1/chat/completions`, whole and streamed."""

    wait_time = between(0.2, 1)

    def on_start(self) -> None:
        self.client.headers["Authorization"] = f"Bearer {API_KEY}"
        self.user = _user_id()
        self.model = os.environ.get("CHATTERBOT_LOAD_MODEL") or ""
        if not self.model:
            models = self.client.get("/v1/models", name="/v1/models").json()
            self.model = models["data"][0]["id"]

    def _body(self, **extra: Any) -> dict[str, Any]:
        return {
            "model": self.model,
            "messages": [{"role": "user", "content": f"Hello from {self.user}"}],
            "max_tokens": MAX_TOKENS,
            "user": self.user,
            **extra,
        }

    @task
    def completion(self) -> None:
        with self.client.post("/v1/chat/completions", json=self._body(), catch_response=True) as r:
            if r.status_code != 200 or not r.json()["choices"][0]["message"]["content"]:
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")

    @task
    def streamed_completion(self) -> None:
        timer = _StreamTimer("/v1/chat/completions stream")
        with self.client.post(
            "/v1/chat/completions",
            json=self._body(stream=True),
            name="/v1/chat/completions stream",
            stream=True,
            catch_response=True,
            timeout=120,
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
                return
            for _, data in sse_events(_lines(response)):
                if data == "[DONE]":
                    timer.done()
                    response.success()
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    response.failure(f"stream error: {chunk['error']}")
                    return
                for choice in chunk.get("choices", []):
                    timer.token(choice.get("delta", {}).get("content") or "")
            response.failure("stream ended before [DONE]")


class GrpcUser(User):
    """ChatService called directly, as a partner service would (`Chat` and `StreamChat`)."""

    wait_time = between(0.2, 1)

    def on_start(self) -> None:
        self.channel = grpc.insecure_channel(GRPC_CHAT)
        self.stub = chat_pb2_grpc.ChatServiceStub(self.channel)
        self.metadata = (("x-api-key", API_KEY),)
        self.user_id = _user_id()

    def on_stop(self) -> None:
        self.channel.close()

    def _turn(self, message: str) -> chat_pb2.ChatTurn:
        return chat_pb2.ChatTurn(user_id=self.user_id, message=message, max_tokens=MAX_TOKENS)

    @task
    def chat(self) -> None:
        started = time.perf_counter()
        try:
            reply = self.stub.Chat(
                chat_pb2.ChatRequest(turn=self._turn("Hello")), metadata=self.metadata, timeout=60
            )
        except grpc.RpcError as exc:
            _fire("grpc", "ChatService/Chat", (time.perf_counter() - started) * 1000, exception=exc)
            return
        events.request.fire(
            request_type="grpc",
            name="ChatService/Chat",
            response_time=(time.perf_counter() - started) * 1000,
            response_length=len(reply.response),
            exception=None,
            context={},
        )

    @task
    def stream_chat(self) -> None:
        timer = _StreamTimer("ChatService/StreamChat")
        started = time.perf_counter()
        size = 0
        try:
            for message in self.stub.StreamChat(
                chat_pb2.StreamChatRequest(turn=self._turn("Stream to me")),
                metadata=self.metadata,
                timeout=120,
            ):
                timer.token(message.text)
                size += len(message.text)
        except grpc.RpcError as exc:
            _fire("grpc", "ChatService/StreamChat", (time.perf_counter() - started) * 1000, exception=exc)
            return
        timer.done()
        events.request.fire(
            request_type="grpc",
            name="ChatService/StreamChat",
            response_time=(time.perf_counter() - started) * 1000,
            response_length=size,
            exception=None,
            context={},
        )
