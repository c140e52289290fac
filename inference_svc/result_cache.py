"""Answers of deterministic requests, kept in Redis and streamed back in chunks.

A request is deterministic when it samples greedily (temperature 0) or names a seed; then model, prompt and
sampling parameters fix the answer, so a repeat need not reach the engine. Sampled requests are never cached.
"""

from __future__ import annotations

import hashlib
import logging

import orjson
import redis.asyncio as redis

from inference_svc.engines.base import Delta, GenerationRequest

log = logging.getLogger(__name__)

# Deltas are replayed in chunks of about this many tokens: a stream, but not one message per token.
CHUNK_TOKENS = 16


def cache_key(model: str, request: GenerationRequest) -> str | None:
    """The key of a deterministic request, or None for a sampled one, and for one whose answer is more than
    text (tool calls, structured output, log probabilities), which is not cached."""
    if request.temperature > 0 and request.seed is None:
        return None
    if request.tools or request.response_format is not None or request.logprobs:
        return None
    payload = orjson.dumps(
        {
            "model": model,
            "messages": [[m.role, m.content] for m in request.messages],
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "seed": request.seed,
            "stop": request.stop,
            "presence_penalty": request.presence_penalty,
            "frequency_penalty": request.frequency_penalty,
            "logit_bias": sorted(request.logit_bias.items()),
        }
    )
    return "gen:" + hashlib.sha256(payload).hexdigest()


def chunk(deltas: list[Delta]) -> list[Delta]:
    """Merge consecutive deltas into chunks of about CHUNK_TOKENS tokens; the last keeps finish and usage."""
    chunks: list[Delta] = []
    text: list[str] = []
    tokens = 0
    for i, delta in enumerate(deltas):
        text.append(delta.text)
        tokens += delta.token_count
        if tokens >= CHUNK_TOKENS or i == len(deltas) - 1:
            chunks.append(
                Delta(
                    "".join(text), tokens, delta.finish_reason, delta.prompt_tokens, delta.completion_tokens
                )
            )
            text, tokens = [], 0
    return chunks


class ResultCache:
    """Redis-backed; any Redis failure degrades to a miss, never to a failed generation."""

    def __init__(self, client: redis.Redis | None, ttl_seconds: int) -> None:
        self.client = client
        self.ttl_seconds = ttl_seconds

    @property
    def enabled(self) -> bool:
        return self._client() is not None

    def _client(self) -> redis.Redis | None:
        """The client while caching is on, else None."""
        return self.client if self.ttl_seconds > 0 else None

    async def get(self, key: str) -> list[Delta] | None:
        client = self._client()
        if client is None:
            return None
        try:
            raw = await client.get(key)
        except (redis.RedisError, OSError):
            log.warning("result cache unavailable", exc_info=True)
            return None
        if raw is None:
            return None
        return [Delta(*item) for item in orjson.loads(raw)]

    async def put(self, key: str, deltas: list[Delta]) -> None:
        client = self._client()
        if client is None or not deltas:
            return
        payload = orjson.dumps(
            [
                [d.text, d.token_count, d.finish_reason, d.prompt_tokens, d.completion_tokens]
                for d in chunk(deltas)
            ]
        )
        try:
            await client.set(key, payload, ex=self.ttl_seconds)
        except (redis.RedisError, OSError):
            log.warning("result cache unavailable", exc_info=True)
