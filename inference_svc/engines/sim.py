"""A simulated vLLM server on one GPU, for machines without a model.

Text is deterministic for a prompt and seed and opens with a label saying it is simulated and what the engine
was given (messages, prompt tokens), which makes the simulator useful for checking what the mesh sends.

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
import hashlib
import random
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from chatterbot.settings import Settings
from chatterbot.tokens import approx_token_count
from inference_svc import metrics
from inference_svc.engines.base import (
    Delta,
    EngineLoad,
    EngineState,
    GenerationRequest,
    InvalidRequest,
    ModelInfo,
    UnknownModel,
)

_WORDS = [
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
        prompt_tokens = sum(approx_token_count(m.content) for m in request.messages)
        if prompt_tokens >= self.max_model_len:
            raise InvalidRequest(
                f"prompt has {prompt_tokens} tokens; the model's window is {self.max_model_len}"
            )
        words, finish = self._script(request, prompt_tokens)
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
            for i, word in enumerate(words):
                if i:
                    due += self.timing.itl(self._running)
                    await asyncio.sleep(max(0.0, due - loop.time()))
                last = i == len(words) - 1
                yield Delta(
                    text=word if i == 0 else " " + word,
                    token_count=1,
                    finish_reason=finish if last else None,
                    prompt_tokens=prompt_tokens if last else 0,
                    completion_tokens=len(words) if last else 0,
                )
        finally:
            self._tasks.pop(request.request_id, None)
            self._running -= 1
            metrics.RUNNING.labels(self.model).dec()
            self._slots.release()

    def _script(self, request: GenerationRequest, prompt_tokens: int) -> tuple[list[str], str]:
        """The words of the answer and why it ends, fixed by the prompt and seed."""
        digest = hashlib.sha256()
        for m in request.messages:
            digest.update(f"{m.role}\0{m.content}\0".encode())
        seed = request.seed if request.seed is not None else self.seed
        rng = random.Random(int.from_bytes(digest.digest()[:8], "big") ^ seed)
        label = f"[simulated {self.model}: {len(request.messages)} messages, {prompt_tokens} prompt tokens]".split()
        natural = len(label) + 1 + int(rng.expovariate(1 / max(1, self.timing.mean_output_tokens)))
        length = min(natural, request.max_tokens)
        body = [rng.choice(_WORDS) for _ in range(max(0, length - len(label)))]
        words = (label + body)[:length]
        for stop in request.stop:
            text = " ".join(words)
            if stop and stop in text:
                kept = text[: text.index(stop)].split(" ")
                return [w for w in kept if w] or words[:1], "stop"
        return words, "length" if natural >= request.max_tokens else "stop"
