"""Recent turns of a conversation, kept as a capped Redis list with an idle TTL."""

from __future__ import annotations

from dataclasses import dataclass

import orjson
import redis.asyncio as redis

from chatterbot.tokens import approx_token_count


@dataclass(frozen=True)
class Turn:
    role: str
    content: str
    token_count: int
    created_at: float  # unix seconds
    request_id: str = ""


@dataclass(frozen=True)
class Context:
    turns: list[Turn]  # oldest first
    token_count: int
    truncated: bool


def context_key(user_id: str, conversation_id: str) -> str:
    # Scoped by user: a conversation id alone never reaches another user's turns. The hash tag keeps one
    # conversation on one Redis Cluster slot.
    return f"ctx:{{{user_id}:{conversation_id}}}"


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
    """Turns per conversation in Redis: append, read within a budget, clear."""

    def __init__(self, client: redis.Redis, max_turns: int, ttl_seconds: int) -> None:
        self.client = client
        self.max_turns = max_turns
        self.ttl_seconds = ttl_seconds

    async def append(self, user_id: str, conversation_id: str, turns: list[Turn]) -> int:
        """Append turns (token counts computed here when missing); returns how many the conversation keeps."""
        key = context_key(user_id, conversation_id)
        encoded = [
            orjson.dumps(
                {
                    "role": t.role,
                    "content": t.content,
                    "tokens": t.token_count or approx_token_count(t.content),
                    "at": t.created_at,
                    "rid": t.request_id,
                }
            )
            for t in turns
        ]
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.rpush(key, *encoded)
            pipe.ltrim(key, -self.max_turns, -1)
            pipe.expire(key, self.ttl_seconds)
            pipe.llen(key)
            results = await pipe.execute()
        return int(results[-1])

    async def read(self, user_id: str, conversation_id: str) -> list[Turn] | None:
        """All kept turns, oldest first; None when the conversation has nothing cached."""
        raw = await self.client.lrange(context_key(user_id, conversation_id), 0, -1)
        if not raw:
            return None
        turns = []
        for item in raw:
            d = orjson.loads(item)
            turns.append(Turn(d["role"], d["content"], d["tokens"], d["at"], d.get("rid", "")))
        return turns

    async def clear(self, user_id: str, conversation_id: str) -> None:
        await self.client.delete(context_key(user_id, conversation_id))
