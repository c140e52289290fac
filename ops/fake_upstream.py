"""An instant fake OpenAI-compatible upstream, for gateway benchmarks (`chatterbot bench gateway`).

It answers every chat completion at once with the same 16 tokens, so that what a benchmark measures through
the mesh is the mesh, not the model:
  POST /v1/chat/completions   JSON `chat.completion`, or with `"stream": true` 16 `chat.completion.chunk`
                              events (the first carrying the role), a finish chunk, a usage chunk when
                              `stream_options.include_usage` asks for one, then `data: [DONE]`;
  GET  /v1/models             the one model, `fake` (any model name asked for is echoed back).
A bare ASGI app on uvicorn (httptools, uvloop when installed), no framework, no sleeps, the bodies built
once per model name: the upstream should cost as little CPU as it can, since it shares the cores of what is
measured. It checks no key. It listens on 127.0.0.1 only.

    python -m ops.fake_upstream --port 9100
"""

from __future__ import annotations

import argparse
import sys
import urllib.request
from collections.abc import Awaitable, Callable, MutableMapping
from functools import lru_cache
from typing import Any

import orjson

from ops.embedded import EmbeddedServer

MODEL = "fake"
TOKENS = (
    "The", " quick", " brown", " fox", " jumps", " over", " the", " lazy",
    " dog", " while", " seven", " owls", " watch", " from", " the", " barn.",
)  # fmt: skip
PROMPT_TOKENS = 12
COMPLETION_ID = "chatcmpl-fake"
CREATED = 1_700_000_000

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_JSON = [(b"content-type", b"application/json")]
_SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


def _usage() -> dict[str, int]:
    return {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": len(TOKENS),
        "total_tokens": PROMPT_TOKENS + len(TOKENS),
    }


@lru_cache(maxsize=64)
def completion_body(model: str) -> bytes:
    """The whole `chat.completion` answered for `model`."""
    return orjson.dumps(
        {
            "id": COMPLETION_ID,
            "object": "chat.completion",
            "created": CREATED,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(TOKENS)},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": _usage(),
        }
    )


@lru_cache(maxsize=64)
def stream_events(model: str, include_usage: bool) -> tuple[bytes, ...]:
    """The SSE events of a streamed answer for `model`, each a complete `data:` event."""

    def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        chunk = {
            "id": COMPLETION_ID,
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": model,
            "choices": choices,
            **extra,
        }
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    def choice(delta: dict[str, str], finish: str | None = None) -> list[dict[str, Any]]:
        return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]

    events = [
        event(choice({"role": "assistant", "content": token} if i == 0 else {"content": token}))
        for i, token in enumerate(TOKENS)
    ]
    events.append(event(choice({}, "stop")))
    if include_usage:
        events.append(event([], usage=_usage()))
    events.append(b"data: [DONE]\n\n")
    return tuple(events)


async def _read_body(receive: Receive) -> bytes:
    parts = []
    while True:
        message = await receive()
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(parts)


async def _answer(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """The ASGI app: two routes, everything else 404."""
    if scope["type"] != "http":
        return  # lifespan: nothing to set up
    path, method = scope["path"], scope["method"]
    if path == "/v1/models" and method == "GET":
        models = {
            "object": "list",
            "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "bench"}],
        }
        await _answer(send, 200, orjson.dumps(models), _JSON)
        return
    if path != "/v1/chat/completions" or method != "POST":
        await _answer(send, 404, b'{"error":{"message":"not found","code":404}}', _JSON)
        return
    try:
        request = orjson.loads(await _read_body(receive))
    except orjson.JSONDecodeError:
        await _answer(send, 400, b'{"error":{"message":"body is not JSON","code":400}}', _JSON)
        return
    model = str(request.get("model") or MODEL)
    if not request.get("stream"):
        await _answer(send, 200, completion_body(model), _JSON)
        return
    include_usage = bool((request.get("stream_options") or {}).get("include_usage"))
    await send({"type": "http.response.start", "status": 200, "headers": _SSE})
    # One body message per event, as a real upstream flushes each token: the gateway parses real framing.
    for chunk in stream_events(model, include_usage):
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


class FakeUpstreamServer(EmbeddedServer):
    """The fake upstream as a child process; `base_url` is what an OpenAI client (or the openai engine) uses."""

    def _command(self) -> list[str]:
        return [sys.executable, "-m", "ops.fake_upstream", "--host", self.host, "--port", str(self.port)]

    @property
    def url(self) -> str:
        return f"http://{self.dial_host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def _is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base_url}/models", timeout=1) as response:
                return response.status == 200 and MODEL.encode() in response.read()
        except OSError:
            return False


def serve(host: str, port: int) -> None:
    """Serve until SIGTERM or Ctrl-C."""
    import uvicorn

    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    uvicorn.run(
        app,
        host=host,
        port=port,
        loop=loop,
        http="httptools",
        lifespan="off",
        log_level="warning",
        access_log=False,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    args = parser.parse_args(argv)
    serve(args.host, args.port)
    return 0


__all__ = ["MODEL", "TOKENS", "FakeUpstreamServer", "app", "main", "serve"]

if __name__ == "__main__":
    sys.exit(main())
