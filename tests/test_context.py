"""context_svc's turn store on a real Valkey: zstd, TTL, token counts, the conversation lock, rebuilds."""

from __future__ import annotations

import asyncio
import random
import time
import uuid

import orjson
import pytest
import redis.asyncio as aredis
import redis.exceptions

from chatterbot.tokens import approx_token_count, token_counter
from context_svc.turns import Turn, TurnStore, context_key, fit_budget, lock_key

TTL = 600


@pytest.fixture
async def client(servers):
    c = aredis.Redis.from_url(servers.valkey.url)
    try:
        yield c
    finally:
        await c.aclose()


def conversation() -> tuple[str, str]:
    return f"user-{uuid.uuid4().hex[:8]}", f"conv-{uuid.uuid4().hex[:8]}"


def exchange(rid: str, at: float, question: str = "q", answer: str = "a") -> list[Turn]:
    return [Turn("user", question, 0, at, rid), Turn("assistant", answer, 0, at, rid)]


async def test_turns_are_stored_zstd_compressed_with_the_ttl(client):
    store = TurnStore(client, 64, TTL)
    user, conv = conversation()
    answer = "PostgreSQL keeps history; Redis keeps the recent turns. " * 40
    await store.append(user, conv, exchange("r1", time.time(), answer=answer))

    raw = await client.lrange(context_key(user, conv), 0, -1)
    assert all(item[:4] == b"\x28\xb5\x2f\xfd" for item in raw), "zstd frames"
    assert len(raw[1]) < len(answer) // 4
    assert 0 < await client.ttl(context_key(user, conv)) <= TTL
    turns, rebuilt = await store.read(user, conv)
    assert [t.content for t in turns] == ["q", answer] and not rebuilt


async def test_turns_written_before_compression_are_still_read(client):
    store = TurnStore(client, 64, TTL)
    user, conv = conversation()
    legacy = {"role": "user", "content": "plain JSON", "tokens": 3, "at": 1.0, "rid": "r0"}
    await client.rpush(context_key(user, conv), orjson.dumps(legacy))
    await store.append(user, conv, exchange("r1", 2.0))
    turns, _ = await store.read(user, conv)
    assert [t.content for t in turns] == ["plain JSON", "q", "a"]


async def test_token_counts_are_computed_once_per_turn_and_stored(client):
    calls = []

    def count(text: str) -> int:
        calls.append(text)
        return approx_token_count(text)

    store = TurnStore(client, 64, TTL, count_tokens=count)
    user, conv = conversation()
    await store.append(
        user,
        conv,
        [Turn("user", "x" * 40, 0, 1.0, "r1"), Turn("assistant", "counted by the model", 7, 1.0, "r1")],
    )
    for _ in range(3):
        turns, _ = await store.read(user, conv)
    assert [t.token_count for t in turns] == [10, 7]
    assert calls == ["x" * 40]


def test_the_token_approximation_is_declared_and_a_tokenizer_can_replace_it():
    assert token_counter("") is approx_token_count
    assert (
        approx_token_count("") == 0 and approx_token_count("a") == 1 and approx_token_count("abcdefgh") == 2
    )


def test_get_context_keeps_the_newest_turns_within_the_budget():
    turns = [Turn("user", f"t{i}", 10, float(i)) for i in range(6)]
    fitted = fit_budget(turns, 25)
    assert [t.content for t in fitted.turns] == ["t4", "t5"]
    assert fitted.token_count == 20 and fitted.truncated
    assert fit_budget(turns, 1000).turns == turns and not fit_budget(turns, 1000).truncated


async def test_concurrent_appends_keep_request_order_and_never_interleave(client):
    store = TurnStore(client, 200, TTL)
    user, conv = conversation()
    await store.append(user, conv, exchange("r-first", 0.0))

    async def turn(i: int) -> None:
        # Requests stamped in order 1..40 reach the lock in a shuffled order.
        await asyncio.sleep(random.random() * 0.02)
        await store.append(user, conv, exchange(f"r{i:02d}", float(i), f"q{i}", f"a{i}"))

    order = list(range(1, 41))
    random.shuffle(order)
    await asyncio.gather(*(turn(i) for i in order))

    turns, _ = await store.read(user, conv)
    assert [t.request_id for t in turns] == ["r-first"] * 2 + [
        f"r{i:02d}" for i in range(1, 41) for _ in (0, 1)
    ]
    assert [t.role for t in turns] == ["user", "assistant"] * 41


async def test_a_retried_append_is_not_stored_twice(client):
    store = TurnStore(client, 64, TTL)
    user, conv = conversation()
    await store.append(user, conv, exchange("r1", 1.0))
    assert await store.append(user, conv, exchange("r1", 1.5)) == 2
    assert await store.append(user, conv, exchange("r2", 2.0)) == 4


async def test_an_append_waits_for_the_conversations_lock(client):
    store = TurnStore(client, 64, TTL, lock_wait=0.2)
    user, conv = conversation()
    # Another holder of the conversation's lock (any client speaking redis-py's lock protocol).
    async with client.lock(lock_key(user, conv), timeout=10):
        with pytest.raises(redis.exceptions.LockError):
            await store.append(user, conv, exchange("r1", 1.0))
    assert await client.exists(context_key(user, conv)) == 0

    patient = TurnStore(client, 64, TTL, lock_wait=5)
    held = client.lock(lock_key(user, conv), timeout=10)
    await held.acquire()
    append = asyncio.create_task(patient.append(user, conv, exchange("r1", 1.0)))
    await asyncio.sleep(0.2)
    assert not append.done()
    await held.release()
    assert await asyncio.wait_for(append, 5) == 2


async def test_every_append_frees_the_lock_it_took(client):
    async def history(user_id: str, conversation_id: str, limit: int) -> list[Turn]:
        raise ConnectionError("store is down")

    store = TurnStore(client, 64, TTL, history=history)
    user, conv = conversation()
    lock = lock_key(user, conv)
    assert await store.append(user, conv, exchange("r1", 1.0)) == 0  # nothing written
    assert await client.exists(lock) == 0
    assert await store.append(user, conv, exchange("r1", 1.0), new_conversation=True) == 2
    assert await client.exists(lock) == 0
    assert await store.append(user, conv, exchange("r2", 2.0)) == 4
    assert await client.exists(lock) == 0
    # A lock that expired under a slow holder and went to another is not freed by the first.
    await client.set(lock, "someone else")
    with pytest.raises(redis.exceptions.LockError):
        await TurnStore(client, 64, TTL, lock_wait=0.05).append(user, conv, exchange("r3", 3.0))
    assert await client.get(lock) == b"someone else"


async def test_the_turns_that_start_a_conversation_need_no_history_read(client):
    loads = []

    async def history(user_id: str, conversation_id: str, limit: int) -> list[Turn]:
        loads.append(conversation_id)
        return exchange("r0", 0.5, "stored q", "stored a")

    store = TurnStore(client, 64, TTL, history=history)
    user, new, old = "user-" + uuid.uuid4().hex[:8], "conv-new", "conv-old"
    assert await store.append(user, new, exchange("r1", 1.0), new_conversation=True) == 2
    assert loads == []
    assert await store.append(user, old, exchange("r1", 1.0)) == 4
    assert loads == [old]


async def test_a_missing_list_is_rebuilt_from_history_on_read(client):
    loads = []

    async def history(user_id: str, conversation_id: str, limit: int) -> list[Turn]:
        loads.append((user_id, conversation_id, limit))
        return exchange("r1", 1.0, "stored q", "stored a")

    store = TurnStore(client, 64, TTL, history=history)
    user, conv = conversation()
    turns, rebuilt = await store.read(user, conv)
    assert rebuilt and [t.content for t in turns] == ["stored q", "stored a"]
    turns, rebuilt = await store.read(user, conv)
    assert not rebuilt and [t.content for t in turns] == ["stored q", "stored a"]
    assert loads == [(user, conv, 64)]
    assert 0 < await client.ttl(context_key(user, conv)) <= TTL


async def test_an_append_to_a_missing_list_rebuilds_it_without_duplicating_stored_turns(client):
    async def history(user_id: str, conversation_id: str, limit: int) -> list[Turn]:
        # The store already has this turn's exchange: chat_svc stores it before appending to the context.
        return exchange("r1", 1.0, "old q", "old a") + exchange("r2", 2.0, "new q", "new a")

    store = TurnStore(client, 64, TTL, history=history)
    user, conv = conversation()
    assert await store.append(user, conv, exchange("r2", 3.0, "new q", "new a")) == 4
    turns, _ = await store.read(user, conv)
    assert [t.content for t in turns] == ["old q", "old a", "new q", "new a"]


async def test_an_append_while_history_is_unreachable_leaves_the_list_to_the_next_read(client):
    async def history(user_id: str, conversation_id: str, limit: int) -> list[Turn]:
        raise ConnectionError("store is down")

    store = TurnStore(client, 64, TTL, history=history)
    user, conv = conversation()
    assert await store.append(user, conv, exchange("r2", 3.0)) == 0
    assert await client.exists(context_key(user, conv)) == 0


async def test_an_unknown_conversation_starts_a_fresh_list(client):
    async def history(user_id: str, conversation_id: str, limit: int) -> None:
        return None

    store = TurnStore(client, 64, TTL, history=history)
    user, conv = conversation()
    assert await store.read(user, conv) is None
    assert await store.append(user, conv, exchange("r1", 1.0)) == 2


async def test_turns_rebuilt_from_history_stay_before_later_appends_whatever_their_clock(client):
    async def history(user_id: str, conversation_id: str, limit: int) -> list[Turn]:
        # The database's clock runs ahead of context_svc's.
        return exchange("r1", time.time() + 3600, "stored q", "stored a")

    store = TurnStore(client, 64, TTL, history=history)
    user, conv = conversation()
    await store.read(user, conv)
    await store.append(user, conv, exchange("r2", time.time(), "next q", "next a"))
    turns, _ = await store.read(user, conv)
    assert [t.content for t in turns] == ["stored q", "stored a", "next q", "next a"]
