"""Recent turns of a conversation: a capped Redis list of zstd-compressed turns with an idle TTL.

Ordering (README, "Context"): every change to a conversation's list happens under that conversation's Redis
lock (SET NX with a token and an expiry, the protocol of redis-py's `Lock`: it frees itself after
`lock_timeout` if its holder died). A change takes the lock and reads the list in one round trip, and writes
and frees the lock in a second. Under the lock:
- the turns of one append stay together and in the order given, and appends never interleave;
- appended turns are kept in the order of their `created_at`, which the servicer stamps when a request
  arrives, before it waits for the lock: appends racing for the lock end up in arrival order either way.
  Turns rebuilt from history keep history's order and stay before anything appended later (their own
  timestamps come from another clock and are not compared);
- a turn whose (request id, role) is among the newest turns already is not stored again, so a retried
  append, or one that races a rebuild from history that already holds it, changes nothing;
- a missing list (expired, evicted, flushed) is rebuilt from history (store_svc) before anything is
  appended, so the list is always the newest turns of the conversation, never a fragment of them; the
  turns that start a conversation (`new_conversation`) need no history read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

import orjson
import redis.asyncio as redis
import zstandard
from redis.asyncio.client import Pipeline
from redis.exceptions import LockError

from chatterbot.tokens import TokenCounter, approx_token_count

log = logging.getLogger(__name__)

# Loads the newest `limit` turns of a conversation from history, oldest first; None when it has none.
HistoryLoader = Callable[[str, str, int], Awaitable["list[Turn] | None"]]

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# Level 3 is zstd's default: several hundred MB/s, and chat text still shrinks by about half.
_compressor = zstandard.ZstdCompressor(level=3)
_decompressor = zstandard.ZstdDecompressor()
# How many of the newest turns an append reads to drop duplicates and place late arrivals.
TAIL_TURNS = 16
# How often a waiting append asks for the lock again.
LOCK_POLL_SECONDS = 0.005
# Frees the lock only for the holder of its token (redis-py's `Lock` releases the same way).
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


@dataclass(frozen=True)
class Turn:
    role: str
    content: str
    token_count: int
    created_at: float  # unix seconds
    request_id: str = ""
    # Where the turn sorts among its conversation's turns: the arrival time of an appended turn, 0 for a turn
    # rebuilt from history.
    order: float = 0.0


@dataclass(frozen=True)
class Context:
    turns: list[Turn]  # oldest first
    token_count: int
    truncated: bool


def context_key(user_id: str, conversation_id: str) -> str:
    # Scoped by user: a conversation id alone never reaches another user's turns. The hash tag keeps one
    # conversation (its list and its lock) on one Redis Cluster slot.
    return f"ctx:{{{user_id}:{conversation_id}}}"


def lock_key(user_id: str, conversation_id: str) -> str:
    return f"ctxlock:{{{user_id}:{conversation_id}}}"


def encode_turn(turn: Turn) -> bytes:
    """One list element: the turn as JSON, zstd-compressed."""
    payload = {
        "role": turn.role,
        "content": turn.content,
        "tokens": turn.token_count,
        "at": turn.created_at,
        "rid": turn.request_id,
        "ord": turn.order,
    }
    return _compressor.compress(orjson.dumps(payload))


def decode_turn(raw: bytes | str) -> dict[str, Any]:
    """The stored fields of one list element (elements written before compression are plain JSON)."""
    if isinstance(raw, bytes) and raw[:4] == _ZSTD_MAGIC:
        raw = _decompressor.decompress(raw)
    fields: dict[str, Any] = orjson.loads(raw)
    return fields


def _turn(raw: bytes | str) -> Turn:
    d = decode_turn(raw)
    return Turn(d["role"], d["content"], d["tokens"], d["at"], d.get("rid", ""), d.get("ord", d["at"]))


def fit_budget(turns: list[Turn], budget: int) -> Context:
    """The newest turns whose token counts sum to at most `budget`, oldest first."""
    kept: list[Turn] = []
    used = 0
    for turn in reversed(turns):
        if used + turn.token_count > budget:
            break
        kept.append(turn)
        used += turn.token_count
    kept.reverse()
    return Context(kept, used, truncated=len(kept) < len(turns))


class TurnStore:
    """Turns per conversation in Redis: append, read (rebuilding from history on a miss), clear."""

    def __init__(
        self,
        client: redis.Redis,
        max_turns: int,
        ttl_seconds: int,
        *,
        history: HistoryLoader | None = None,
        lock_timeout: float = 10.0,
        lock_wait: float | None = None,
        count_tokens: TokenCounter = approx_token_count,
    ) -> None:
        self.client = client
        self.max_turns = max_turns
        self.ttl_seconds = ttl_seconds
        self.history = history
        self.lock_timeout = lock_timeout
        self.lock_wait = lock_timeout if lock_wait is None else lock_wait
        self.count_tokens = count_tokens

    async def append(
        self, user_id: str, conversation_id: str, turns: list[Turn], *, new_conversation: bool = False
    ) -> int:
        """Append turns in `created_at` order, under the conversation's lock; return how many it keeps.

        Token counts are computed here, once, for turns that come without one. 0 means nothing was written:
        the list was missing and history could not be read, so the next read rebuilds it instead.
        `new_conversation` says history holds nothing before these turns, so a missing list is not rebuilt.
        """
        turns = [
            replace(t, token_count=t.token_count or self.count_tokens(t.content), order=t.created_at)
            for t in turns
        ]
        key = context_key(user_id, conversation_id)
        async with self._locked(user_id, conversation_id, -TAIL_TURNS) as (held, tail):
            if tail:
                return await self._append_after(key, [_turn(raw) for raw in tail], turns, held)
            if new_conversation:
                return await self._replace(key, turns, held)
            return await self._rebuild(key, user_id, conversation_id, turns, held)

    async def read(self, user_id: str, conversation_id: str) -> tuple[list[Turn], bool] | None:
        """All kept turns, oldest first, and whether they were just rebuilt from history; None when the
        conversation has no turns (or is unknown to history)."""
        key = context_key(user_id, conversation_id)
        raw = await self.client.lrange(key, 0, -1)
        if raw:
            return [_turn(item) for item in raw], False
        if self.history is None:
            return None
        async with self._locked(user_id, conversation_id, 0) as (held, raw):
            # An append or another reader may have filled it while this one waited for the lock.
            if raw:
                return [_turn(item) for item in raw], False
            loaded = await self.history(user_id, conversation_id, self.max_turns)
            if not loaded:
                return None
            await self._replace(key, loaded, held)
            return loaded, True

    @contextlib.asynccontextmanager
    async def _locked(
        self, user_id: str, conversation_id: str, start: int
    ) -> AsyncIterator[tuple[_Held, list]]:
        """Hold the conversation's lock, with its list from `start` read in the same round trip; the lock is
        freed on leaving unless a write already freed it. `LockError` after `lock_wait`."""
        key = context_key(user_id, conversation_id)
        held = _Held(lock_key(user_id, conversation_id), secrets.token_hex(16))
        give_up = time.monotonic() + self.lock_wait
        while True:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.set(held.name, held.token, nx=True, px=max(1, int(self.lock_timeout * 1000)))
                pipe.lrange(key, start, -1)
                taken, raw = await pipe.execute()
            if taken:
                break
            if time.monotonic() >= give_up:
                raise LockError(f"context lock {held.name} still held after {self.lock_wait:g} s")
            await asyncio.sleep(LOCK_POLL_SECONDS)
        try:
            yield held, raw
        finally:
            if not held.released:
                await self.client.eval(_RELEASE, 1, held.name, held.token)

    async def clear(self, user_id: str, conversation_id: str) -> None:
        await self.client.delete(context_key(user_id, conversation_id))

    async def _rebuild(
        self, key: str, user_id: str, conversation_id: str, turns: list[Turn], held: _Held
    ) -> int:
        if self.history is None:
            return await self._replace(key, turns, held)
        try:
            loaded = await self.history(user_id, conversation_id, self.max_turns)
        except Exception:
            # Writing only these turns would hide the earlier ones from every read until the list expires.
            log.warning(
                "history unavailable; context left to be rebuilt on the next read",
                exc_info=True,
                extra={"conversation_id": conversation_id},
            )
            return 0
        if loaded is None:
            return await self._replace(key, turns, held)
        # History was written before the context (chat_svc stores the exchange first): it may hold these turns.
        stored = {(t.request_id, t.role) for t in loaded if t.request_id}
        return await self._replace(
            key, loaded + [t for t in turns if (t.request_id, t.role) not in stored], held
        )

    async def _append_after(self, key: str, tail: list[Turn], turns: list[Turn], held: _Held) -> int:
        if turns and turns[0].order < tail[0].order and len(tail) == TAIL_TURNS:
            # Arrived before all of the newest turns (rare: many turns were waiting for the lock): place it
            # among everything kept.
            tail = [_turn(raw) for raw in await self.client.lrange(key, 0, -1)]
        seen = {(t.request_id, t.role) for t in tail if t.request_id}
        new = [t for t in turns if not (t.request_id and (t.request_id, t.role) in seen)]
        async with self.client.pipeline(transaction=True) as pipe:
            if new and new[0].order < tail[-1].order:
                # A request that arrived earlier got the lock later: put it where it belongs. The sort is
                # stable, so turns of one request, and equal times, keep their order.
                pipe.ltrim(key, 0, -(len(tail) + 1))
                pipe.rpush(key, *(encode_turn(t) for t in sorted(tail + new, key=lambda t: t.order)))
            elif new:
                pipe.rpush(key, *(encode_turn(t) for t in new))
            pipe.ltrim(key, -self.max_turns, -1)
            pipe.expire(key, self.ttl_seconds)
            pipe.llen(key)
            results = await held.release_after(pipe)
        return int(results[-1])

    async def _replace(self, key: str, turns: list[Turn], held: _Held) -> int:
        kept = turns[-self.max_turns :]
        if not kept:
            return 0
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            pipe.rpush(key, *(encode_turn(t) for t in kept))
            pipe.expire(key, self.ttl_seconds)
            await held.release_after(pipe)
        return len(kept)


@dataclass
class _Held:
    """A conversation lock this append holds: its key and token, and whether it is free again."""

    name: str
    token: str
    released: bool = False

    async def release_after(self, pipe: Pipeline) -> list:
        """Run the pipeline's writes and free the lock in the same transaction; the writes' results."""
        pipe.eval(_RELEASE, 1, self.name, self.token)
        results = await pipe.execute()
        self.released = True
        return results[:-1]
