"""Generate: pick the model, answer from the result cache when the request is deterministic, refuse when
the engine's queue is full, otherwise stream from the engine, measuring it the same way for every engine."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from chatterbot.labelled import observe_many, series
from inference_svc import metrics
from inference_svc.engines.base import (
    Delta,
    EngineState,
    EngineUnavailable,
    GenerationRequest,
    Overloaded,
    ToolCallDelta,
)
from inference_svc.models import ModelRegistry
from inference_svc.result_cache import ResultCache, cache_key


@dataclass
class Generator:
    models: ModelRegistry
    cache: ResultCache
    max_waiting: int

    async def generate(
        self, request: GenerationRequest, cache_only: bool = False
    ) -> AsyncGenerator[tuple[str, Delta], None]:
        """Yield (model id, delta); closing the iterator early aborts the generation in the engine.

        With `cache_only`, only a cached answer is given; anything else is refused as Overloaded."""
        model, engine = self.models.resolve(request.model)
        if engine.state() is not EngineState.READY:
            raise EngineUnavailable(f"model {model} is {engine.state().value}")
        key = cache_key(model, request)
        if key is not None:
            cached = await self.cache.get(key)
            if cached is not None:
                metrics.CACHE_HITS.labels(model).inc()
                for delta in cached:
                    yield model, delta
                return
            metrics.CACHE_MISSES.labels(model).inc()
        if cache_only:
            metrics.REJECTED.labels(model).inc()
            raise Overloaded("shedding load: only cached answers of deterministic requests are served")
        if engine.load().waiting >= self.max_waiting:
            metrics.REJECTED.labels(model).inc()
            raise Overloaded(f"{engine.load().waiting} requests are waiting for {model}; retry later")
        produced: list[Delta] = []
        async with contextlib.aclosing(measured(model, engine.generate(request))) as deltas:
            async for delta in deltas:
                if key is not None:
                    produced.append(delta)
                yield model, delta
        if key is not None and produced and produced[-1].finish_reason in ("stop", "length"):
            await self.cache.put(key, produced)


_ttft, _itl, _tokens = series(metrics.TTFT), series(metrics.ITL), series(metrics.TOKENS)
_prompt_tokens, _aborts = series(metrics.PROMPT_TOKENS), series(metrics.ABORTS)


async def measured(model: str, deltas: AsyncGenerator[Delta, None]) -> AsyncGenerator[Delta, None]:
    """An engine's deltas, unchanged, with the engine metrics observed: here once, the same for every engine.

    Time to first token runs from the request reaching the engine (queueing included) to the first delta that
    carries tokens. A later delta of n tokens observes n inter-token latencies of its gap / n, as vLLM counts
    tokens that come out of one step together. The final delta adds the prompt tokens. A stream is aborted
    when the engine ends it with finish_reason "abort", or when its consumer closes it or is cancelled before
    the final delta; an engine error is a failure, not an abort. Closing this closes the engine's iterator.
    """
    arrived = last = time.perf_counter()
    first = True
    ended = failed = False
    async with contextlib.aclosing(deltas) as source:
        try:
            async for delta in source:
                n = delta.token_count
                if n > 0:
                    now = time.perf_counter()
                    if first:
                        _ttft(model).observe(now - arrived)
                        first = False
                    else:
                        observe_many(_itl(model), (now - last) / n, n)
                    last = now
                    _tokens(model).inc(n)
                if delta.finish_reason is not None:
                    ended = True
                    _prompt_tokens(model).inc(delta.prompt_tokens)
                    if delta.finish_reason == "abort":
                        _aborts(model).inc()
                yield delta
        except Exception:
            failed = True
            raise
        finally:
            # GeneratorExit (closed) and CancelledError get here without setting either flag.
            if not ended and not failed:
                _aborts(model).inc()


async def coalesce(
    source: AsyncGenerator[tuple[str, Delta], None],
) -> AsyncGenerator[tuple[str, Delta], None]:
    """Forward deltas as they come; when the reader is behind, send everything ready as one merged delta.

    The source runs in its own task feeding a queue, so a slow reader never slows the engine, and a reader
    that goes away (the call is cancelled) cancels the task, which closes the source: the engine's abort.
    """
    # None marks the end of the source; an exception is handed to the reader, which raises it.
    queue: asyncio.Queue[tuple[str, Delta] | Exception | None] = asyncio.Queue()

    async def pump() -> None:
        try:
            async with contextlib.aclosing(source) as items:
                async for item in items:
                    queue.put_nowait(item)
            queue.put_nowait(None)
        except Exception as exc:
            queue.put_nowait(exc)

    task = asyncio.create_task(pump())
    try:
        while True:
            item = await queue.get()
            if item is None:
                return
            if isinstance(item, Exception):
                raise item
            model, delta = item
            while not queue.empty():
                peek = queue.get_nowait()
                if peek is None or isinstance(peek, Exception):
                    yield model, delta
                    if peek is None:
                        return
                    raise peek
                _, more = peek
                delta = merged(delta, more)
            yield model, delta
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def whole(
    source: AsyncGenerator[tuple[str, Delta], None],
) -> AsyncGenerator[tuple[str, Delta], None]:
    """The whole answer as one delta, once the source is done (each tool call in one piece); closing it early
    closes the source."""
    async with contextlib.aclosing(source) as deltas:
        items = [item async for item in deltas]
    if items:
        yield items[-1][0], merged(*(delta for _, delta in items))


def merged(*deltas: Delta) -> Delta:
    """Consecutive deltas as one: texts, token counts and log probabilities joined, the pieces of each tool
    call joined into one piece, and the last delta's finish reason and usage."""
    end = deltas[-1]
    calls: dict[int, ToolCallDelta] = {}
    for delta in deltas:
        for piece in delta.tool_calls:
            call = calls.get(piece.index)
            calls[piece.index] = (
                piece
                if call is None
                else ToolCallDelta(
                    piece.index,
                    call.id or piece.id,
                    call.name or piece.name,
                    call.arguments + piece.arguments,
                )
            )
    return Delta(
        "".join(d.text for d in deltas),
        sum(d.token_count for d in deltas),
        end.finish_reason,
        end.prompt_tokens,
        end.completion_tokens,
        tuple(calls[i] for i in sorted(calls)),
        tuple(lp for d in deltas for lp in d.logprobs),
    )
