"""A simulated vLLM engine for machines without a model.

Text is deterministic for a prompt and seed and opens with a label saying it is simulated (and what the
engine was given, which makes the simulator useful for checking what the mesh sends). Timing follows a
simple model of a vLLM server: at most `max_num_seqs` sequences run at once and the rest wait in FIFO
order; the first token comes `ttft` after a sequence gets its slot, then one token every `itl`.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from chatterbot.settings import Settings
from chatterbot.tokens import approx_token_count
from inference_svc import metrics
from inference_svc.engines.base import Delta, EngineState, GenerationRequest, ModelInfo, UnknownModel

_WORDS = ["the", "a", "model", "answer", "token", "stream", "context", "budget", "cluster", "latency", "request", "reply", "shard", "queue", "replica", "cache", "prompt", "engine", "batch", "sequence", "user", "history", "message", "simulated", "turn", "vector", "kernel", "memory", "page", "window", "signal", "output", "input", "value", "system", "service", "network", "store", "result", "event", "worker", "stream", "deadline", "breaker"]


@dataclass(frozen=True)
class SimTiming:
    ttft_s: float
    itl_s: float
    max_num_seqs: int


class SimEngine:
    """Deterministic, clearly labelled simulated generation with a vLLM-like timing model."""

    name = "sim"

    def __init__(self, model: str, timing: SimTiming, seed: int = 0, max_model_len: int = 8192) -> None:
        self.model = model
        self.timing = timing
        self.seed = seed
        self.max_model_len = max_model_len
        self._slots = asyncio.Semaphore(timing.max_num_seqs)
        self._running: dict[str, asyncio.Task | None] = {}
        self._state = EngineState.LOADING

    @classmethod
    def from_settings(cls, settings: Settings) -> SimEngine:
        timing = SimTiming(settings.sim_ttft_ms / 1000, settings.sim_itl_ms / 1000, settings.sim_max_num_seqs)
        return cls(settings.model_name, timing, settings.sim_seed)

    async def start(self) -> None:
        self._state = EngineState.READY

    async def stop(self) -> None:
        self._state = EngineState.FAILED

    def state(self) -> EngineState:
        return self._state

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(self.model, self.name, self._state, self.max_model_len, True)]

    @property
    def running(self) -> int:
        return len(self._running)

    async def abort(self, request_id: str) -> None:
        task = self._running.get(request_id)
        if task is not None:
            task.cancel()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        if request.model and request.model != self.model:
            raise UnknownModel(request.model)
        prompt_tokens = sum(approx_token_count(m.content) for m in request.messages)
        arrived = time.perf_counter()
        metrics.WAITING.labels(self.model).inc()
        try:
            await self._slots.acquire()
        finally:
            metrics.WAITING.labels(self.model).dec()
        self._running[request.request_id] = asyncio.current_task()
        metrics.RUNNING.labels(self.model).inc()
        metrics.PROMPT_TOKENS.labels(self.model).inc(prompt_tokens)
        completed = 0
        finished = False
        try:
            words, finish = self._script(request, prompt_tokens)
            await asyncio.sleep(self.timing.ttft_s)
            metrics.TTFT.labels(self.model).observe(time.perf_counter() - arrived)
            last = time.perf_counter()
            for i, word in enumerate(words):
                if i:
                    await asyncio.sleep(self.timing.itl_s)
                    now = time.perf_counter()
                    metrics.ITL.labels(self.model).observe(now - last)
                    last = now
                completed += 1
                metrics.TOKENS.labels(self.model).inc()
                is_last = i == len(words) - 1
                yield Delta(
                    text=word if i == 0 else " " + word,
                    token_count=1,
                    finish_reason=finish if is_last else None,
                    prompt_tokens=prompt_tokens if is_last else 0,
                    completion_tokens=completed if is_last else 0,
                )
            finished = True
        finally:
            if not finished:
                metrics.ABORTS.labels(self.model).inc()
            self._running.pop(request.request_id, None)
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
        # Most answers stop on their own before max_tokens; a quarter run to the limit.
        natural = rng.randint(max(1, request.max_tokens // 2), request.max_tokens * 4 // 3 + 1)
        length = min(natural, request.max_tokens)
        words = (label + [rng.choice(_WORDS) for _ in range(max(0, length - len(label)))])[:length]
        return words, "length" if natural >= request.max_tokens else "stop"
