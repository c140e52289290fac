"""A simulated vLLM server on one GPU, for machines without a model.

Text is deterministic for a prompt and seed and opens with a label saying it is simulated and what the engine
was given (messages, prompt tokens, the tool results it answers), which makes the simulator useful for
checking what the mesh sends. The rest of the OpenAI surface is simulated as deterministically:
- tools: offered with `tool_choice` "required", a function's name, or "auto" (unless the prompt ends with
  tool results: those it answers in text, so that an agent's loop ends), the answer is one call of the named
  function, or else of the first, with arguments that `engines.json_instances` builds from its `parameters`
  schema, streamed as OpenAI streams calls (a piece with the id and name, then the arguments in pieces);
  finish_reason "tool_calls" ("stop" for a call forced by name, as vLLM and OpenAI finish it).
  `parallel_tool_calls` changes nothing for a single call.
- response_format: `json_object` answers `{"text": "<the text answer>"}`, `json_schema` a document of the
  schema; both come in pieces, and max_tokens cuts them short as it cuts vLLM's guided decoding.
- Body words are drawn uniformly from a word list, or, with presence or frequency penalties, with the weights
  vLLM's definition gives each word (logit - frequency_penalty * count - presence_penalty * [count > 0],
  counting the words generated before it, the label's among them); log probabilities follow those weights,
  and every other token (the label, the JSON around the text, documents and calls) is certain.
- Refused (`Unsupported`): logit_bias, as the simulator has no token vocabulary, and a schema
  `engines.json_instances` cannot honour (naming `response_format` or `tools`).

Timing follows vLLM's continuous batching:
- at most `max_num_seqs` sequences run at once; the rest wait in FIFO order;
- time to first token = queue wait + `ttft` + `prefill_per_token` * prompt tokens;
- inter-token latency grows with the number of running sequences, linearly from `itl_1` (one sequence) to
  `itl_max` (`max_num_seqs` sequences), the shape `vllm bench serve` shows for decode-bound batches;
- an answer stops on its own after an exponentially distributed number of tokens (mean
  `mean_output_tokens`), or at `max_tokens`, whichever comes first.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import math
import random
import re
from collections import Counter
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import orjson

from chatterbot.settings import Settings
from chatterbot.tokens import approx_token_count
from inference_svc import metrics
from inference_svc.engines.base import (
    TOOL_CHOICE_MODES,
    Delta,
    EngineLoad,
    EngineState,
    GenerationRequest,
    InvalidRequest,
    Message,
    ModelInfo,
    TokenLogprob,
    ToolCallDelta,
    TopLogprob,
    UnknownModel,
    Unsupported,
)
from inference_svc.engines.json_instances import UnsupportedSchema, instance

# The words of an answer's body.
WORDS = [
    "the",
    "a",
    "model",
    "answer",
    "token",
    "stream",
    "context",
    "budget",
    "cluster",
    "latency",
    "request",
    "reply",
    "shard",
    "queue",
    "replica",
    "cache",
    "prompt",
    "engine",
    "batch",
    "sequence",
    "user",
    "history",
    "message",
    "simulated",
    "turn",
    "vector",
    "kernel",
    "memory",
    "page",
    "window",
    "signal",
    "output",
    "input",
    "value",
    "system",
    "service",
    "network",
    "store",
    "result",
    "event",
    "worker",
    "deadline",
    "breaker",
]
_INDEX = {word: i for i, word in enumerate(WORDS)}
_UNIFORM = [math.log(1 / len(WORDS))] * len(WORDS)
# The log probability vLLM reports for a token that cannot be chosen.
IMPOSSIBLE_LOGPROB = -9999.0

# How a body word was drawn: its index in WORDS and every word's log probability at that draw; None for a
# token that was certain.
_Draw = tuple[int, list[float]] | None


@dataclass(frozen=True)
class SimTiming:
    """The timing model; seconds, except counts."""

    ttft: float
    prefill_per_token: float
    itl_1: float
    itl_max: float
    max_num_seqs: int
    mean_output_tokens: int

    def itl(self, running: int) -> float:
        """Inter-token latency with `running` sequences in the batch."""
        if self.max_num_seqs <= 1:
            return self.itl_1
        share = (min(max(running, 1), self.max_num_seqs) - 1) / (self.max_num_seqs - 1)
        return self.itl_1 + (self.itl_max - self.itl_1) * share

    def first_token_after_slot(self, prompt_tokens: int) -> float:
        return self.ttft + self.prefill_per_token * prompt_tokens

    @classmethod
    def from_settings(cls, settings: Settings) -> SimTiming:
        return cls(
            ttft=settings.sim_ttft_ms / 1000,
            prefill_per_token=settings.sim_prefill_ms_per_token / 1000,
            itl_1=settings.sim_itl_ms / 1000,
            itl_max=settings.sim_itl_at_max_ms / 1000,
            max_num_seqs=settings.sim_max_num_seqs,
            mean_output_tokens=settings.sim_mean_output_tokens,
        )


class SimEngine:
    """Deterministic, clearly labelled simulated generation with a vLLM-like timing model."""

    name = "sim"

    def __init__(
        self, model: str, timing: SimTiming, seed: int = 0, max_model_len: int = 8192, is_default: bool = True
    ) -> None:
        self.model = model
        self.timing = timing
        self.seed = seed
        self.max_model_len = max_model_len
        self.is_default = is_default
        self._slots = asyncio.Semaphore(timing.max_num_seqs)
        self._tasks: dict[str, asyncio.Task] = {}
        self._running = 0
        self._waiting = 0
        self._state = EngineState.LOADING

    @classmethod
    def from_settings(
        cls, settings: Settings, model: str | None = None, is_default: bool = True
    ) -> SimEngine:
        return cls(
            model or settings.model_name,
            SimTiming.from_settings(settings),
            settings.sim_seed,
            settings.sim_max_model_len,
            is_default,
        )

    async def start(self) -> None:
        self._state = EngineState.READY

    async def stop(self) -> None:
        self._state = EngineState.FAILED

    def state(self) -> EngineState:
        return self._state

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(self.model, self.name, self._state, self.max_model_len, self.is_default)]

    def load(self) -> EngineLoad:
        return EngineLoad(self._running, self._waiting)

    async def abort(self, request_id: str) -> None:
        task = self._tasks.get(request_id)
        if task is not None:
            task.cancel()

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[Delta, None]:
        if request.model and request.model != self.model:
            raise UnknownModel(request.model)
        if request.logit_bias:
            raise Unsupported("logit_bias", "the simulated engine has no token vocabulary to bias")
        prompt_tokens = _prompt_tokens(request)
        if prompt_tokens >= self.max_model_len:
            raise InvalidRequest(
                f"prompt has {prompt_tokens} tokens; the model's window is {self.max_model_len}"
            )
        steps, finish = self._answer(request, prompt_tokens)
        loop = asyncio.get_running_loop()
        # The queue gauges stay here: only the engine knows who holds a slot and who waits for one. Latency,
        # token and abort metrics are measured once, for every engine, in inference_svc.generation.
        self._waiting += 1
        metrics.WAITING.labels(self.model).inc()
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
            metrics.WAITING.labels(self.model).dec()
        self._running += 1
        metrics.RUNNING.labels(self.model).inc()
        task = asyncio.current_task()
        if task is not None:
            self._tasks[request.request_id] = task
        try:
            await asyncio.sleep(self.timing.first_token_after_slot(prompt_tokens))
            # Tokens follow a schedule rather than a chain of sleeps, so event-loop lag does not accumulate.
            due = loop.time()
            for i, step in enumerate(steps):
                if i:
                    due += self.timing.itl(self._running)
                    await asyncio.sleep(max(0.0, due - loop.time()))
                if i == len(steps) - 1:
                    step = dataclasses.replace(
                        step, finish_reason=finish, prompt_tokens=prompt_tokens, completion_tokens=len(steps)
                    )
                yield step
        finally:
            self._tasks.pop(request.request_id, None)
            self._running -= 1
            metrics.RUNNING.labels(self.model).dec()
            self._slots.release()

    def _answer(self, request: GenerationRequest, prompt_tokens: int) -> tuple[list[Delta], str]:
        """The answer's deltas, a token each (finish reason and usage not yet on the last), and why it ends:
        fixed by the prompt and seed."""
        rng = self._rng(request)
        results = _tool_results(request.messages)
        choice = request.effective_tool_choice
        form = request.response_format
        if choice != "none" and not (choice == "auto" and results):
            # A call forced by name finishes as "stop", as vLLM and OpenAI finish it; a chosen one "tool_calls".
            steps, finish = (
                _call(request, choice, rng),
                "tool_calls" if choice in ("auto", "required") else "stop",
            )
        elif form is not None and form.type == "json_schema":
            pieces = _pieces(_document(form.schema, "response_format"))
            steps, finish = _steps(pieces, [None] * len(pieces), request), "stop"
        else:
            about = f"{len(request.messages)} messages, {prompt_tokens} prompt tokens"
            if results:
                about += f", {results} tool results"
            words, draws, finish = self._words(request, rng, f"[simulated {self.model}: {about}]".split())
            if form is None:
                steps = _steps(_spaced(words), draws, request)
            else:  # json_object: the text in an object
                escaped = [orjson.dumps(word).decode()[1:-1] for word in words]
                steps = _steps(['{"text": "', *_spaced(escaped), '"}'], [None, *draws, None], request)
        if len(steps) > request.max_tokens:
            steps, finish = steps[: request.max_tokens], "length"
        return steps, finish

    def _rng(self, request: GenerationRequest) -> random.Random:
        """The answer's randomness, fixed by the prompt and seed."""
        digest = hashlib.sha256()
        for m in request.messages:
            digest.update(f"{m.role}\0{m.content}\0".encode())
            for call in m.tool_calls:
                digest.update(f"{call.id}\0{call.name}\0{call.arguments}\0".encode())
            if m.tool_call_id:
                digest.update(f"{m.tool_call_id}\0".encode())
        seed = request.seed if request.seed is not None else self.seed
        return random.Random(int.from_bytes(digest.digest()[:8], "big") ^ seed)

    def _words(
        self, request: GenerationRequest, rng: random.Random, label: list[str]
    ) -> tuple[list[str], list[_Draw], str]:
        """The words of a text answer, how each was drawn (with logprobs asked for), and why it ends."""
        natural = len(label) + 1 + int(rng.expovariate(1 / max(1, self.timing.mean_output_tokens)))
        length = min(natural, request.max_tokens)
        count = max(0, length - len(label))
        if request.presence_penalty or request.frequency_penalty:
            picks = _penalized(rng, label, count, request.presence_penalty, request.frequency_penalty)
            body = [WORDS[i] for i, _ in picks]
        else:
            body = [rng.choice(WORDS) for _ in range(count)]
            picks = [(_INDEX[word], _UNIFORM) for word in body] if request.logprobs else []
        words = (label + body)[:length]
        draws: list[_Draw] = [*([None] * len(label)), *picks][:length] if request.logprobs else []
        for stop in request.stop:
            text = " ".join(words)
            if stop and stop in text:
                kept = [w for w in text[: text.index(stop)].split(" ") if w] or words[:1]
                return kept, draws[: len(kept)], "stop"
        return words, draws, "length" if natural >= request.max_tokens else "stop"


def _prompt_tokens(request: GenerationRequest) -> int:
    """The prompt's length: the messages, the calls in them, and the definitions of the offered tools."""
    return sum(
        approx_token_count(m.content) + sum(approx_token_count(c.name + c.arguments) for c in m.tool_calls)
        for m in request.messages
    ) + sum(
        approx_token_count(t.name + t.description + orjson.dumps(t.parameters).decode())
        for t in request.tools
    )


def _tool_results(messages: list[Message]) -> int:
    """How many tool results end the prompt."""
    count = 0
    for m in reversed(messages):
        if m.role != "tool":
            break
        count += 1
    return count


def _penalized(
    rng: random.Random, generated: list[str], count: int, presence: float, frequency: float
) -> list[tuple[int, list[float]]]:
    """`count` words drawn one after another with vLLM's presence and frequency penalties on the words
    generated before each, starting with `generated`."""
    seen = Counter(generated)
    draws = []
    for _ in range(count):
        logits = [-frequency * seen[w] - presence * (seen[w] > 0) for w in WORDS]
        top = max(logits)
        weights = [math.exp(x - top) for x in logits]
        log_total = top + math.log(sum(weights))
        i = rng.choices(range(len(WORDS)), weights)[0]
        seen[WORDS[i]] += 1
        draws.append((i, [x - log_total for x in logits]))
    return draws


def _call(request: GenerationRequest, choice: str, rng: random.Random) -> list[Delta]:
    """One call of the function `choice` names, or else of the first offered: a piece with its id and name,
    then its arguments in pieces."""
    named = (t for t in request.tools if t.name == choice)
    tool = request.tools[0] if choice in TOOL_CHOICE_MODES else next(named, None)
    if tool is None:
        raise InvalidRequest(f"tool_choice names {choice!r}, which is not one of the tools")
    arguments = "{}" if tool.parameters is None else _document(tool.parameters, "tools")
    call_id = f"call_{rng.getrandbits(96):024x}"
    return [
        Delta("", 1, tool_calls=(ToolCallDelta(0, call_id, tool.name),)),
        *(Delta("", 1, tool_calls=(ToolCallDelta(0, arguments=piece),)) for piece in _pieces(arguments)),
    ]


def _document(schema: Any, param: str) -> str:
    """A JSON document valid against `schema`; a schema the builder cannot honour is refused as `param`."""
    try:
        return json.dumps(instance(schema), ensure_ascii=False)
    except UnsupportedSchema as exc:
        raise Unsupported(
            param, f"the simulated engine cannot build a document for this schema: {exc}"
        ) from None


def _pieces(text: str) -> list[str]:
    """JSON text in tokens: each run of spaces with the word after it."""
    return re.findall(r"\s*\S+", text)


def _spaced(words: list[str]) -> list[str]:
    """Words as the tokens of a text: each after the first with its space."""
    return [word if i == 0 else " " + word for i, word in enumerate(words)]


def _steps(pieces: list[str], draws: list[_Draw], request: GenerationRequest) -> list[Delta]:
    """A delta for each token, with its log probabilities when they are asked for."""
    if not request.logprobs:
        return [Delta(piece, 1) for piece in pieces]
    return [
        Delta(piece, 1, logprobs=(_logprob(piece, draw, request.top_logprobs),))
        for piece, draw in zip(pieces, draws, strict=True)
    ]


def _logprob(token: str, draw: _Draw, top: int) -> TokenLogprob:
    """`token`'s log probability and the `top` likeliest tokens in its place, itself first: a body word's by
    the weights it was drawn with; any other token is certain, and the alternatives impossible."""
    prefix = " " if token.startswith(" ") else ""
    logprob = 0.0 if draw is None else draw[1][draw[0]]
    ranked = [(token, logprob)]
    if top > 1:
        if draw is None:
            others = [(w, IMPOSSIBLE_LOGPROB) for w in WORDS if prefix + w != token]
        else:
            chosen, logprobs = draw
            order = sorted((i for i in range(len(WORDS)) if i != chosen), key=lambda i: -logprobs[i])
            others = [(WORDS[i], logprobs[i]) for i in order]
        ranked += [(prefix + w, lp) for w, lp in others[: top - 1]]
    return TokenLogprob(
        token, logprob, token.encode(), tuple(TopLogprob(t, lp, t.encode()) for t, lp in ranked[:top])
    )
