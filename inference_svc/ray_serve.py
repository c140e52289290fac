"""InferenceService's engines as a Ray Serve application with an OpenAI-compatible HTTP ingress.

Each replica of the `ChatterBotEngine` deployment runs one engine, built by `inference_svc.engines.create_engine`
from Settings (`sim` on CPU, `vllm` on a GPU node), behind a FastAPI ingress:
- `POST /v1/chat/completions`: streamed (server-sent events, `stream_options.include_usage` honoured) or whole;
- `GET /v1/models`: the model this application serves;
- `GET /-/engine`: this replica's counters (sequences running and waiting in the engine, streams completed,
  aborted and failed), its replica id and pid, for operators and tests.

inference_svc reaches it with the `openai` engine (`CHATTERBOT_OPENAI_BASE_URL=http://<serve>:8000/v1`), exactly
as it reaches `ray.serve.llm`'s OpenAI app on GPUs, so Ray stays out of inference_svc's image. Serve's HTTP
proxy spreads requests over the replicas, its autoscaler sizes the deployment on ongoing requests, and a
client that disconnects makes Serve cancel the request inside the replica: the stream's generator gets
CancelledError and closes the engine's iterator, so the sequence leaves the batch (the engine's abort).

The Serve config passes the engine, the model and any Settings to `app_builder` as `args`
(deploy/ray/serve.yaml); `CHATTERBOT_*` variables in the replicas' runtime_env reach Settings too.

This is the one module that imports Ray: `pip install -e '.[ray]'`. Its annotations stay evaluated (no
`from __future__ import annotations`): Serve builds the FastAPI routes from the methods' signatures.
"""

import contextlib
import os
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from chatterbot.settings import Settings
from inference_svc.engines import create_engine
from inference_svc.engines.base import (
    Delta,
    Engine,
    EngineError,
    EngineState,
    EngineTimeout,
    EngineUnavailable,
    GenerationRequest,
    InvalidRequest,
    Message,
    Overloaded,
    ResponseFormat,
    TokenLogprob,
    Tool,
    ToolCall,
    UnknownModel,
    Unsupported,
)
from inference_svc.generation import merged

DEPLOYMENT = "ChatterBotEngine"

# --- the OpenAI chat completions request, as much of it as the engines take ---


class _Function(BaseModel):
    name: str
    arguments: str = ""


class _ToolCallIn(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: _Function


class _MessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | None = None
    tool_calls: list[_ToolCallIn] = Field(default_factory=list)
    tool_call_id: str = ""
    name: str = ""


class _FunctionDef(BaseModel):
    name: str
    description: str = ""
    parameters: dict[str, Any] | None = None
    strict: bool = False


class _ToolIn(BaseModel):
    type: Literal["function"] = "function"
    function: _FunctionDef


class _NamedToolChoice(BaseModel):
    type: Literal["function"] = "function"
    function: _Function


class _JsonSchema(BaseModel):
    name: str = ""
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool = False


class _ResponseFormatIn(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: _JsonSchema | None = None


class _StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The body of `POST /v1/chat/completions`; fields an engine has no use for are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str = ""
    messages: list[_MessageIn] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: _StreamOptions | None = None
    tools: list[_ToolIn] = Field(default_factory=list)
    tool_choice: Literal["auto", "none", "required"] | _NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: _ResponseFormatIn | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[int, float] = Field(default_factory=dict)
    logprobs: bool = False
    top_logprobs: int = Field(0, ge=0, le=20)

    def generation(self, request_id: str) -> GenerationRequest:
        """The engine's request for this body."""
        choice = self.tool_choice
        form = self.response_format
        return GenerationRequest(
            request_id=request_id,
            messages=[
                Message(
                    m.role,
                    m.content or "",
                    tuple(ToolCall(c.id, c.function.name, c.function.arguments) for c in m.tool_calls),
                    m.tool_call_id,
                    m.name,
                )
                for m in self.messages
            ],
            max_tokens=self.max_completion_tokens or self.max_tokens or GenerationRequest.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or ()),
            model=self.model,
            whole=not self.stream,
            tools=tuple(
                Tool(t.function.name, t.function.description, t.function.parameters, t.function.strict)
                for t in self.tools
            ),
            tool_choice=choice.function.name if isinstance(choice, _NamedToolChoice) else choice or "",
            parallel_tool_calls=self.parallel_tool_calls,
            response_format=None
            if form is None or form.type == "text"
            else ResponseFormat(
                form.type,
                form.json_schema.schema_ if form.json_schema else None,
                form.json_schema.name if form.json_schema else "",
                form.json_schema.strict if form.json_schema else False,
            ),
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias=dict(self.logit_bias),
            logprobs=self.logprobs,
            top_logprobs=self.top_logprobs,
        )


# --- what goes back, as the OpenAI API spells it ---


def _http_status(exc: EngineError) -> int:
    """The HTTP status an engine error is answered with; the `openai` engine maps each back to its error."""
    if isinstance(exc, UnknownModel):
        return 404
    if isinstance(exc, InvalidRequest):
        return 400
    if isinstance(exc, Overloaded):
        return 429
    if isinstance(exc, EngineTimeout):
        return 504
    if isinstance(exc, EngineUnavailable):
        return 503
    return 502


def _error_body(exc: EngineError) -> dict[str, Any]:
    status = _http_status(exc)
    message = f"model {exc} is not served here" if isinstance(exc, UnknownModel) else str(exc)
    return {
        "error": {
            "message": message,
            "type": "invalid_request_error" if status < 500 else "server_error",
            "param": exc.param if isinstance(exc, Unsupported) else None,
            "code": status,
        }
    }


def _logprobs(tokens: tuple[TokenLogprob, ...]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": t.token,
                "logprob": t.logprob,
                "bytes": list(t.bytes),
                "top_logprobs": [
                    {"token": a.token, "logprob": a.logprob, "bytes": list(a.bytes)} for a in t.top_logprobs
                ],
            }
            for t in tokens
        ]
    }


def _tool_calls(delta: Delta) -> list[dict[str, Any]]:
    calls = []
    for piece in delta.tool_calls:
        call: dict[str, Any] = {"index": piece.index, "function": {"arguments": piece.arguments}}
        if piece.id:
            call |= {"id": piece.id, "type": "function"}
        if piece.name:
            call["function"]["name"] = piece.name
        calls.append(call)
    return calls


def _usage(last: Delta) -> dict[str, int]:
    return {
        "prompt_tokens": last.prompt_tokens,
        "completion_tokens": last.completion_tokens,
        "total_tokens": last.prompt_tokens + last.completion_tokens,
    }


@dataclass
class _Completion:
    """One answer's identity, shared by its chunks."""

    id: str
    model: str
    created: int

    def chunk(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> bytes:
        body: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if usage is not None:
            body["usage"] = usage
        return b"data: " + orjson.dumps(body) + b"\n\n"

    def delta_chunk(self, delta: Delta) -> bytes:
        piece: dict[str, Any] = {}
        if delta.text:
            piece["content"] = delta.text
        if delta.tool_calls:
            piece["tool_calls"] = _tool_calls(delta)
        choice = {
            "index": 0,
            "delta": piece,
            "logprobs": _logprobs(delta.logprobs) if delta.logprobs else None,
            "finish_reason": delta.finish_reason,
        }
        return self.chunk([choice])

    def whole(self, answer: Delta) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": answer.text or None}
        if answer.tool_calls:
            message["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in answer.tool_calls
            ]
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": _logprobs(answer.logprobs) if answer.logprobs else None,
                    "finish_reason": answer.finish_reason,
                }
            ],
            "usage": _usage(answer),
        }


DONE = b"data: [DONE]\n\n"


@dataclass
class ReplicaCounters:
    """What this replica's streams came to: `aborted` counts those whose client left before the end."""

    completed: int = 0
    aborted: int = 0
    failed: int = 0


api = FastAPI(title="ChatterBot engine on Ray Serve", docs_url=None, redoc_url=None)


@serve.deployment(name=DEPLOYMENT, health_check_period_s=5, health_check_timeout_s=10)
@serve.ingress(api)
class ChatterBotEngine:
    """One engine per replica behind OpenAI's chat completions API."""

    # Serve awaits an async constructor: the engine starts before the replica takes requests.
    async def __init__(  # type: ignore[misc]
        self, engine: str = "sim", model: str = "", settings: dict[str, Any] | None = None
    ) -> None:
        self.settings = Settings(**(settings or {}))
        self.engine: Engine = create_engine(
            engine, self.settings, model or self.settings.model_name, is_default=True
        )
        await self.engine.start()
        self.model = self.engine.models()[0].id
        self.counters = ReplicaCounters()

    async def __del__(self) -> None:
        await self.engine.stop()

    def check_health(self) -> None:
        """Serve's health check: a replica whose engine failed is replaced."""
        if self.engine.state() is EngineState.FAILED:
            raise RuntimeError(f"engine {self.engine.name} for {self.model} failed")

    @api.get("/v1/models")
    def list_models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": info.id,
                    "object": "model",
                    "created": 0,
                    "owned_by": "chatterbot",
                    "max_model_len": info.max_model_len,
                }
                for info in self.engine.models()
            ],
        }

    @api.get("/-/engine")
    def engine_stats(self) -> dict[str, Any]:
        load = self.engine.load()
        return {
            "replica": serve.get_replica_context().replica_id.unique_id,
            "pid": os.getpid(),
            "engine": self.engine.name,
            "model": self.model,
            "state": self.engine.state().value,
            "running": load.running,
            "waiting": load.waiting,
            "completed": self.counters.completed,
            "aborted": self.counters.aborted,
            "failed": self.counters.failed,
        }

    @api.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Response:
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex
        answer = _Completion(f"chatcmpl-{uuid.uuid4().hex}", body.model or self.model, int(time.time()))
        deltas = self._counted(self.engine.generate(body.generation(rid)))
        try:
            # The first delta is awaited before any byte is sent, so a request the engine refuses is
            # answered with its status rather than with a stream that fails.
            first = await anext(deltas)
            if not body.stream:
                rest = [delta async for delta in deltas]
                return JSONResponse(answer.whole(merged(first, *rest)))
        except EngineError as exc:
            return JSONResponse(_error_body(exc), status_code=_http_status(exc))
        except BaseException:  # cancelled: the client left before the answer began
            await deltas.aclose()
            raise
        usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(
            self._events(answer, first, deltas, usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )

    async def _events(
        self, answer: _Completion, first: Delta, deltas: AsyncGenerator[Delta, None], usage: bool
    ) -> AsyncIterator[bytes]:
        """The answer as server-sent events; an engine error mid-stream is an `error` event, never a quiet
        end. A client that leaves makes Serve cancel this generator, which closes the engine's."""
        async with contextlib.aclosing(deltas):
            yield answer.chunk(
                [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
            )
            last = first
            yield answer.delta_chunk(first)
            try:
                async for delta in deltas:
                    last = delta
                    yield answer.delta_chunk(delta)
            except EngineError as exc:
                yield b"data: " + orjson.dumps(_error_body(exc)) + b"\n\n"
                yield DONE
                return
            if usage:
                yield answer.chunk([], _usage(last))
            yield DONE

    async def _counted(self, deltas: AsyncGenerator[Delta, None]) -> AsyncGenerator[Delta, None]:
        """The engine's deltas, counted into this replica's counters; closing this closes the engine's."""
        ended = failed = False
        async with contextlib.aclosing(deltas) as source:
            try:
                async for delta in source:
                    if delta.finish_reason is not None:
                        ended = True
                    yield delta
            except Exception:
                failed = True
                raise
            finally:
                if failed:
                    self.counters.failed += 1
                elif ended:
                    self.counters.completed += 1
                else:  # closed or cancelled before the end: its client left
                    self.counters.aborted += 1


def app_builder(args: dict[str, Any]) -> serve.Application:
    """The application a Serve config names (`import_path: inference_svc.ray_serve:app_builder`): its `args`
    are `engine` (sim | vllm), `model` and `settings` (Settings fields, e.g. `sim_max_num_seqs`)."""
    unknown = set(args) - {"engine", "model", "settings"}
    if unknown:
        raise ValueError(f"unknown args {sorted(unknown)} (expected engine, model, settings)")
    # `bind` is what @serve.deployment adds to the class, which type checkers do not see.
    return ChatterBotEngine.bind(  # type: ignore[attr-defined]
        args.get("engine", "sim"), args.get("model", ""), args.get("settings") or {}
    )
