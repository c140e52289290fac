"""Generate: pick the model, answer from the result cache when the request is deterministic, refuse when
the engine's queue is full, otherwise stream from the engine."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from inference_svc import metrics
from inference_svc.engines.base import Delta, EngineState, EngineUnavailable, GenerationRequest, Overloaded
from inference_svc.models import ModelRegistry
from inference_svc.result_cache import ResultCache, cache_key


@dataclass
class Generator:
    models: ModelRegistry
    cache: ResultCache
    max_waiting: int

    async def generate(
        self, request: GenerationRequest, cache_only: bool = False
    ) -> AsyncIterator[tuple[str, Delta]]:
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
        async with contextlib.aclosing(engine.generate(request)) as deltas:
            async for delta in deltas:
                if key is not None:
                    produced.append(delta)
                yield model, delta
        if key is not None and produced and produced[-1].finish_reason in ("stop", "length"):
            await self.cache.put(key, produced)


async def coalesce(source: AsyncIterator[tuple[str, Delta]]) -> AsyncIterator[tuple[str, Delta]]:
    """Forward deltas as they come; when the reader is behind, send everything ready as one merged delta.

    The source runs in its own task feeding a queue, so a slow reader never slows the engine, and a reader
    that goes away (the call is cancelled) cancels the task, which closes the source: the engine's abort.
    """
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump() -> None:
        try:
            async with contextlib.aclosing(source) as items:
                async for item in items:
                    queue.put_nowait(item)
            queue.put_nowait(done)
        except Exception as exc:  # handed to the reader, which raises it
            queue.put_nowait(exc)

    task = asyncio.create_task(pump())
    try:
        while True:
            item = await queue.get()
            if item is done:
                return
            if isinstance(item, Exception):
                raise item
            model, delta = item
            while not queue.empty():
                peek = queue.get_nowait()
                if peek is done or isinstance(peek, Exception):
                    yield model, delta
                    if peek is done:
                        return
                    raise peek
                _, more = peek
                delta = Delta(
                    delta.text + more.text,
                    delta.token_count + more.token_count,
                    more.finish_reason,
                    more.prompt_tokens,
                    more.completion_tokens,
                )
            yield model, delta
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def whole(source: AsyncIterator[tuple[str, Delta]]) -> AsyncIterator[tuple[str, Delta]]:
    """The whole answer as one delta, once the source is done; closing it early closes the source."""
    text: list[str] = []
    tokens = 0
    last: tuple[str, Delta] | None = None
    async with contextlib.aclosing(source) as items:
        async for last in items:
            text.append(last[1].text)
            tokens += last[1].token_count
    if last is not None:
        model, end = last
        yield model, Delta("".join(text), tokens, end.finish_reason, end.prompt_tokens, end.completion_tokens)
