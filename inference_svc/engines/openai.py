"""Any OpenAI-compatible upstream (a `vllm serve` fleet, Ray Serve LLM, llama.cpp, Ollama) as an engine.

Streams `POST {base_url}/chat/completions` with `stream: true` and `stream_options.include_usage`, or asks
for the whole answer (`stream: false`) when its caller takes it whole, over one `engines.http1.Http1Client`
(created in `start()`, closed in `stop()`): connections are kept alive and pooled, and a stream read to its end
hands its connection back for the next request.

Tools, tool choice, parallel calls, response format, penalties, logit bias and log probabilities go upstream
as the OpenAI API spells them, only those the request sets, and so do the prompt's tool calls and results.
What comes back is read as it is written: streamed `delta.tool_calls` pieces (index, id, name, arguments),
a whole answer's `message.tool_calls` (each call one piece), `logprobs.content` entries, and the legacy
finish reason "function_call" as "tool_calls". Chunks are read for calls and log probabilities only when the
request offers tools or asks for log probabilities, so a plain stream costs no more per chunk.

Upstream failures map to the engine errors that `inference_svc.servicer.engine_status` turns into gRPC status:

| upstream                                   | engine error        | gRPC                |
|--------------------------------------------|---------------------|---------------------|
| connection refused/reset, 5xx, pool or connect timeout (nothing was sent) | `EngineUnavailable` | UNAVAILABLE |
| no response or no next chunk in `timeout`, 408 | `EngineTimeout` | DEADLINE_EXCEEDED   |
| 429                                        | `Overloaded`        | RESOURCE_EXHAUSTED  |
| 401, 403                                   | `UpstreamRejected`  | FAILED_PRECONDITION |
| 404 naming the model                       | `UnknownModel`      | NOT_FOUND           |
| 404 of the path (a wrong base URL), other 4xx | `UpstreamRejected` | FAILED_PRECONDITION |
| 400, 413, 422 (e.g. prompt too long)       | `InvalidRequest`    | INVALID_ARGUMENT    |
| 400, 422 whose error names its `param`     | `Unsupported`       | INVALID_ARGUMENT, with the param |
| an `{"error": ...}` event mid-stream        | by its `code`, as above (500 if none) |    |
| a stream that ends without a finish reason, or breaks off | `EngineUnavailable` | UNAVAILABLE |
| a 200 that is not `text/event-stream`      | `EngineUnavailable` | UNAVAILABLE         |

429 is `Overloaded` rather than `EngineUnavailable`: the upstream is shedding load, which is exactly what
RESOURCE_EXHAUSTED tells callers (degrade or shed at once; do not retry into it), and it is the standard
HTTP-to-gRPC mapping of 429.

Usage comes from the upstream's usage chunk. An upstream that sends none is counted here instead: one token
per chunk (or per log probability, when they are asked for), and an approximate prompt length. Closing the
iterator early closes the HTTP response (and its connection), so the upstream sees the client go away and can
abort the request (vLLM does).

Health: `start()` probes `GET {base_url}/models`; READY when the upstream answers, FAILED when it does not.
An upstream that cannot be reached or answers 5xx makes the engine FAILED; while it is, the engine probes again
every `RECOVERY_PROBE_SECONDS` (and a stream that completes marks it READY at once), so a service whose
upstream was down serves again as soon as it is back. A stream that breaks off after the upstream answered
(a replica behind a Ray Serve or vLLM fleet's proxy died mid-answer) fails that request only: the upstream
itself still serves, and the next request goes to a replica that lives.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import orjson

from chatterbot.labelled import series
from chatterbot.settings import Settings
from chatterbot.tokens import approx_token_count
from inference_svc import metrics
from inference_svc.engines.base import (
    TOOL_CHOICE_MODES,
    Delta,
    EngineError,
    EngineLoad,
    EngineState,
    EngineTimeout,
    EngineUnavailable,
    GenerationRequest,
    InvalidRequest,
    Message,
    ModelInfo,
    Overloaded,
    TokenLogprob,
    ToolCallDelta,
    TopLogprob,
    UnknownModel,
    Unsupported,
    UpstreamRejected,
)
from inference_svc.engines.http1 import ConnectFailed, Http1Client, HttpError, ReadTimeout, Response
from inference_svc.engines.sse import EventDecoder

log = logging.getLogger(__name__)


_running = series(metrics.RUNNING)

# Idle pooled connections are closed after this long; upstreams keep theirs alive for about as long.
KEEPALIVE_SECONDS = 30.0
# How often a FAILED engine asks its upstream whether it serves again.
RECOVERY_PROBE_SECONDS = 1.0


class OpenAIEngine:
    """One model behind an OpenAI-compatible `/v1/chat/completions` endpoint."""

    name = "openai"

    def __init__(
        self,
        base_url: str,
        api_key: str,
        upstream_model: str,
        *,
        model_id: str | None = None,
        timeout: float = 60.0,
        is_default: bool = True,
    ) -> None:
        """`base_url` ends in `/v1`; `upstream_model` is the name the upstream knows; `model_id` the id
        clients ask for (default: `upstream_model`); `timeout` bounds connecting and each wait for a chunk;
        `is_default` marks the model requests get when they name none."""
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.upstream_model = upstream_model
        self.model_id = model_id or upstream_model
        self.timeout = timeout
        self.is_default = is_default
        self._client: Http1Client | None = None
        self._state = EngineState.LOADING
        self._max_model_len = 0
        self._running: dict[str, Response | None] = {}  # by request id; None until headers
        self._abort_requested: set[str] = set()
        self._recovery: asyncio.Task[None] | None = None

    @classmethod
    def from_settings(
        cls, settings: Settings, model: str | None = None, *, is_default: bool = True
    ) -> OpenAIEngine:
        """The engine for `model` (default: `settings.model_name`) at `settings.openai_base_url`."""
        model_id = model or settings.model_name
        return cls(
            settings.openai_base_url,
            settings.openai_api_key,
            settings.openai_model or model_id,
            model_id=model_id,
            timeout=settings.openai_timeout_seconds,
            is_default=is_default,
        )

    # --- lifecycle ---

    async def start(self) -> None:
        """Open the client and probe the upstream; an unreachable upstream leaves the engine FAILED."""
        if not self.base_url:
            self._state = EngineState.FAILED
            raise ValueError("the openai engine needs a base URL (CHATTERBOT_OPENAI_BASE_URL)")
        self._state = EngineState.LOADING
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        # `timeout` bounds connecting and each wait for data, not a whole (long) stream. The pool holds as
        # many connections as the service runs streams at once.
        self._client = Http1Client(
            self.base_url,
            headers=headers,
            connect_timeout=self.timeout,
            read_timeout=self.timeout,
            keepalive_seconds=KEEPALIVE_SECONDS,
        )
        try:
            await self.probe()
        except EngineError as exc:
            log.warning("openai upstream %s is not ready: %s", self.base_url, exc)
            self._recover()

    async def stop(self) -> None:
        self._state = EngineState.FAILED
        # Without a client no prober starts again, and a running one ends.
        client, self._client = self._client, None
        recovery, self._recovery = self._recovery, None
        if recovery is not None:
            recovery.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await recovery
        if client is not None:
            await client.close()

    def _recover(self) -> None:
        """Probe the upstream in the background until it serves again (one prober at a time)."""
        if self._client is None or (self._recovery is not None and not self._recovery.done()):
            return
        self._recovery = asyncio.get_running_loop().create_task(self._probe_until_ready())

    async def _probe_until_ready(self) -> None:
        while self._state is EngineState.FAILED and self._client is not None:
            await asyncio.sleep(RECOVERY_PROBE_SECONDS)
            with contextlib.suppress(EngineError):
                await self.probe()
        if self._state is EngineState.READY:
            log.info("openai upstream %s serves again", self.base_url)

    async def probe(self) -> None:
        """Ask the upstream for its models; READY if it answers, FAILED (and the error raised) if not."""
        try:
            async with await self._http().request("GET", "/models") as response:
                text = await response.text()
                if response.status != 200:
                    raise _status_error(response.status, text, self.upstream_model)
                for card in orjson.loads(text).get("data", []):
                    if card.get("id") == self.upstream_model and card.get("max_model_len"):
                        self._max_model_len = int(card["max_model_len"])
        except HttpError as exc:
            self._state = EngineState.FAILED
            raise _transport_error(exc) from exc
        except (EngineError, ValueError):
            self._state = EngineState.FAILED
            raise
        self._state = EngineState.READY

    def state(self) -> EngineState:
        return self._state

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(self.model_id, self.name, self._state, self._max_model_len, self.is_default)]

    def load(self) -> EngineLoad:
        """Streams open upstream; the upstream's own queue is not visible from here."""
        return EngineLoad(len(self._running), 0)

    # --- requests ---

    async def abort(self, request_id: str) -> None:
        """End the request's stream with finish_reason "abort", closing its upstream response."""
        if request_id not in self._running:
            return
        self._abort_requested.add(request_id)
        response = self._running[request_id]
        if response is not None:
            # A read in progress fails at once; the stream sees the flag and ends as aborted.
            response.close()

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[Delta, None]:
        if request.model and request.model != self.model_id:
            raise UnknownModel(request.model)
        client = self._http()
        body: dict[str, Any] = {
            "model": self.upstream_model,
            "messages": [_message(m) for m in request.messages],
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "stream": not request.whole,
        }
        if not request.whole:
            body["stream_options"] = {"include_usage": True}
        if request.seed is not None:
            body["seed"] = request.seed
        if request.stop:
            body["stop"] = list(request.stop)
        _set_options(body, request)

        rid = request.request_id
        self._running[rid] = None
        # The gauge mirrors load(): streams open upstream, which only this engine sees. Latency, token and
        # abort metrics are measured once, for every engine, in inference_svc.generation.
        _running(self.model_id).inc()
        try:
            answer = self._whole(client, rid, body) if request.whole else self._streamed(client, rid, body)
            async with contextlib.aclosing(answer) as deltas:
                async for delta in deltas:
                    yield delta
        finally:
            self._running.pop(rid, None)
            self._abort_requested.discard(rid)
            _running(self.model_id).dec()

    @contextlib.asynccontextmanager
    async def _post(self, client: Http1Client, rid: str, body: dict[str, Any]) -> AsyncIterator[Response]:
        """The upstream's response to `body`, registered for abort(); an error status raised as an engine
        error. Transport failures become engine errors too (none for a request that was aborted). Only
        failures before the upstream answered make the engine FAILED: after a 200, they are this request's."""
        answered = False
        try:
            async with await client.request(
                "POST",
                "/chat/completions",
                orjson.dumps(body),
                {"Content-Type": "application/json", "X-Request-Id": rid},
            ) as response:
                self._running[rid] = response
                if response.status != 200:
                    raise _status_error(response.status, await response.text(), self.upstream_model)
                answered = True
                yield response
        except HttpError as exc:
            if rid not in self._abort_requested:
                error = _transport_error(exc)
                raise (error if answered else self._failed(error)) from exc
        except EngineUnavailable as exc:
            raise (exc if answered else self._failed(exc)) from None

    async def _streamed(
        self, client: Http1Client, rid: str, body: dict[str, Any]
    ) -> AsyncGenerator[Delta, None]:
        """The answer as the upstream streams it (`stream: true`)."""
        chunks = 0  # content chunks sent on: the token count when the upstream reports no usage
        finish: str | None = None
        usage: dict[str, Any] | None = None
        # Only answers that may carry tool calls or log probabilities have chunks worth reading for them.
        rich = "tools" in body or "logprobs" in body
        async with self._post(client, rid, body) as response:
            if response.content_type != "text/event-stream":
                raise EngineUnavailable(f"upstream answered {response.content_type!r}, not an event stream")
            async for batch in _chunks(response):
                if rid in self._abort_requested:
                    break
                # The text of the chunks that arrived together goes on as one delta: a turn that fell behind
                # its upstream catches up in one step instead of one per chunk.
                texts: list[str] = []
                for chunk in batch:
                    _raise_error_event(chunk, self.upstream_model)
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    for choice in chunk.get("choices") or ():
                        delta = choice.get("delta") or {}
                        text = delta.get("content")
                        if rich:
                            piece = _delta(text, delta.get("tool_calls"), choice.get("logprobs"))
                            if piece is not None:
                                chunks += piece.token_count
                                yield piece
                        elif text:
                            texts.append(text)
                        if choice.get("finish_reason"):
                            finish = choice["finish_reason"]
                if texts:
                    chunks += len(texts)
                    yield Delta(text="".join(texts), token_count=len(texts))
        yield self._last(rid, finish, usage, chunks, body)

    async def _whole(
        self, client: Http1Client, rid: str, body: dict[str, Any]
    ) -> AsyncGenerator[Delta, None]:
        """The answer in one piece (`stream: false`): one response for the upstream to send and this to read."""
        answer: Delta | None = None
        finish: str | None = None
        usage: dict[str, Any] | None = None
        async with self._post(client, rid, body) as response:
            raw = await response.read()
            try:
                payload = orjson.loads(raw)
            except orjson.JSONDecodeError:
                raise EngineUnavailable(f"upstream answered with no JSON: {raw[:200]!r}") from None
            _raise_error_event(payload, self.upstream_model)
            usage = payload.get("usage")
            for choice in payload.get("choices") or ():
                message = choice.get("message") or {}
                answer = _delta(message.get("content"), message.get("tool_calls"), choice.get("logprobs"))
                finish = choice.get("finish_reason")
                break
        counted = answer.token_count if answer is not None else 0
        if answer is not None and rid not in self._abort_requested:
            yield answer
        yield self._last(rid, finish, usage, counted, body)

    def _last(
        self, rid: str, finish: str | None, usage: dict[str, Any] | None, counted: int, body: dict[str, Any]
    ) -> Delta:
        """The final delta: finish reason and token counts (`counted` tokens were already sent on)."""
        if rid in self._abort_requested:
            finish = "abort"
        elif finish == "function_call":  # the legacy name of a call's finish
            finish = "tool_calls"
        if finish is None:
            raise EngineUnavailable("upstream ended the answer without a finish reason")
        if usage:
            prompt_tokens = int(usage.get("prompt_tokens") or 0)
            completion_tokens = int(usage.get("completion_tokens") or counted)
        else:
            prompt_tokens = sum(approx_token_count(m["content"] or "") for m in body["messages"])
            completion_tokens = counted
        if finish != "abort":
            self._state = EngineState.READY
        return Delta(
            text="",
            # Upstreams may pack several tokens in a chunk; the last delta makes the counts add up.
            token_count=max(0, completion_tokens - counted),
            finish_reason=finish,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
        )

    def _http(self) -> Http1Client:
        if self._client is None:
            raise EngineUnavailable(f"openai engine for {self.model_id} is not started")
        return self._client

    def _failed(self, exc: EngineError) -> EngineError:
        """An upstream that cannot serve makes this engine unhealthy until a probe or a stream succeeds."""
        if isinstance(exc, EngineUnavailable):
            self._state = EngineState.FAILED
            self._recover()
        return exc


def _message(m: Message) -> dict[str, Any]:
    """A prompt message as the OpenAI API spells it: an assistant's calls (content null when it has none), a
    tool result's call id and function name."""
    if m.role == "tool":
        return {"role": "tool", "content": m.content, "tool_call_id": m.tool_call_id} | (
            {"name": m.name} if m.name else {}
        )
    if not m.tool_calls:
        return {"role": m.role, "content": m.content}
    return {
        "role": m.role,
        "content": m.content or None,
        "tool_calls": [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in m.tool_calls
        ],
    }


def _set_options(body: dict[str, Any], request: GenerationRequest) -> None:
    """The request's tools, structured output, penalties and log probabilities into `body`, as the OpenAI
    API spells them: only those set. Tool choice and parallel calls go with tools only, as OpenAI requires."""
    if request.tools:
        body["tools"] = [
            {
                "type": "function",
                "function": {"name": t.name}
                | ({"description": t.description} if t.description else {})
                | ({"parameters": t.parameters} if t.parameters is not None else {})
                | ({"strict": True} if t.strict else {}),
            }
            for t in request.tools
        ]
        choice = request.tool_choice
        if choice:
            body["tool_choice"] = (
                choice if choice in TOOL_CHOICE_MODES else {"type": "function", "function": {"name": choice}}
            )
        if request.parallel_tool_calls is not None:
            body["parallel_tool_calls"] = request.parallel_tool_calls
    form = request.response_format
    if form is not None and form.type == "json_schema":
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": ({"name": form.name} if form.name else {})
            | {"schema": form.schema}
            | ({"strict": True} if form.strict else {}),
        }
    elif form is not None:
        body["response_format"] = {"type": form.type}
    if request.presence_penalty:
        body["presence_penalty"] = request.presence_penalty
    if request.frequency_penalty:
        body["frequency_penalty"] = request.frequency_penalty
    if request.logit_bias:
        body["logit_bias"] = {str(token): bias for token, bias in request.logit_bias.items()}
    if request.logprobs:
        body["logprobs"] = True
        if request.top_logprobs:
            body["top_logprobs"] = request.top_logprobs


def _delta(text: str | None, calls: list[Any] | None, logprobs: dict[str, Any] | None) -> Delta | None:
    """A streamed choice's delta or a whole answer's message as a Delta: its text, the pieces of its tool
    calls and one TokenLogprob per token (their count its token count); None when it carries none of them."""
    pieces = tuple(
        ToolCallDelta(
            int(call.get("index", i)),
            call.get("id") or "",
            (call.get("function") or {}).get("name") or "",
            (call.get("function") or {}).get("arguments") or "",
        )
        for i, call in enumerate(calls or ())
    )
    tokens = tuple(_token_logprob(entry) for entry in (logprobs or {}).get("content") or ())
    if not (text or pieces or tokens):
        return None
    return Delta(text or "", len(tokens) or 1, tool_calls=pieces, logprobs=tokens)


def _token_logprob(entry: dict[str, Any]) -> TokenLogprob:
    """An entry of `logprobs.content`; its bytes come as a list of ints, or null."""
    alternatives = tuple(
        TopLogprob(t["token"], float(t["logprob"]), bytes(t.get("bytes") or ()))
        for t in entry.get("top_logprobs") or ()
    )
    return TokenLogprob(
        entry["token"], float(entry["logprob"]), bytes(entry.get("bytes") or ()), alternatives
    )


async def _chunks(response: Response) -> AsyncGenerator[list[dict[str, Any]], None]:
    """The JSON payloads of the upstream's server-sent events up to `[DONE]`, those of one read together
    (engines.sse reads the stream by the spec's line rules). After `[DONE]` the body is read to its end, so
    that its connection goes back to the pool instead of closing."""
    decoder = EventDecoder()
    done = False
    async for data in response:
        if done:
            continue
        batch: list[dict[str, Any]] = []
        for event in decoder.feed(data):
            if event.data == "[DONE]":
                done = True
                break
            batch.append(orjson.loads(event.data))
        if batch:
            yield batch


def _raise_error_event(payload: dict[str, Any], model: str) -> None:
    """Raise the engine error an `{"error": ...}` payload (a mid-stream error event) stands for."""
    if "error" not in payload:
        return
    error = payload["error"] if isinstance(payload["error"], dict) else {"message": payload["error"]}
    raise _status_error(int(error.get("code") or 500), str(error.get("message")), model)


def _transport_error(exc: HttpError) -> EngineError:
    # Nothing reached the upstream when connecting failed: UNAVAILABLE tells callers a retry is safe.
    if isinstance(exc, ConnectFailed):
        return EngineUnavailable(f"upstream not reachable: {exc!r}")
    if isinstance(exc, ReadTimeout):
        return EngineTimeout(f"upstream did not answer in time: {exc!r}")
    return EngineUnavailable(f"upstream failed: {exc!r}")


def _status_error(status: int, body: str, model: str) -> EngineError:
    reason, param = _error(body)
    message = f"upstream answered {status}: {reason}"
    if status in (400, 422) and param:
        # The upstream names the parameter it refuses (OpenAI's error `param`): callers learn which.
        return Unsupported(param, message)
    if status in (401, 403):
        return UpstreamRejected(message)
    if status == 404:
        # A 404 about the model says the upstream does not serve it; any other 404 is a wrong base URL.
        return UnknownModel(message) if "model" in body.lower() else UpstreamRejected(message)
    if status in (400, 413, 422):
        return InvalidRequest(message)
    if status == 429:
        return Overloaded(message)
    if status == 408:
        return EngineTimeout(message)
    if status >= 500:
        return EngineUnavailable(message)
    return UpstreamRejected(message)


def _error(body: str) -> tuple[str, str]:
    """The `error.message` of an OpenAI-style error body (else the start of the body), and its `error.param`
    (vLLM's older bodies put both at the top level)."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:200], ""
    if not isinstance(payload, dict):
        return body[:200], ""
    error: dict[str, Any] = payload["error"] if isinstance(payload.get("error"), dict) else payload
    param = error["param"] if isinstance(error.get("param"), str) else ""
    if error.get("message"):
        return str(error["message"])[:500], param
    if payload.get("detail"):
        return str(payload["detail"])[:500], param
    return body[:200], param
