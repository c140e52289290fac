"""CHATTERBOT_CONTEXT_TOKENIZER counts every turn: the user's turn is counted once, with the configured
tokenizer, and history (store_svc) and context (context_svc) keep that count, for direct and queued turns."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from chatterbot.tokens import approx_token_count, token_counter
from context_svc.turns import context_key, decode_turn
from ops.launcher import Mesh
from tests.clients import wait_done
from tests.meshes import API_KEY, Servers, ShardConnections, own_mesh

pytest.importorskip("tokenizers")

# Twelve words in 23 characters: the word-level tokenizer below counts 12, the approximation 6.
TEXT = "a b c d e f g h i j k l"


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A word-level tokenizer.json: one token per whitespace-separated word."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


@pytest.fixture(scope="module")
def counting_mesh(
    servers: Servers, tmp_path_factory: pytest.TempPathFactory, tokenizer_path: Path
) -> Iterator[Mesh]:
    # NATS of its own: another mesh's workers (which count otherwise) must not take this mesh's jobs.
    with own_mesh(
        servers, tmp_path_factory, "tokens", own_nats=True, context_tokenizer=str(tokenizer_path)
    ) as m:
        yield m


@pytest.fixture
def client(counting_mesh: Mesh) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=counting_mesh.edge_url, headers={"X-API-Key": API_KEY}, timeout=30) as c:
        yield c


def stored_user_counts(pg: ShardConnections, user_id: str, conversation_id: str) -> list[int]:
    rows = (
        pg.user(user_id)
        .execute(
            "SELECT token_count FROM messages WHERE user_id = %s AND conversation_id = %s AND role = 'user'",
            (user_id, conversation_id),
        )
        .fetchall()
    )
    return [r[0] for r in rows]


def context_user_counts(valkey: redis.Redis, user_id: str, conversation_id: str) -> list[int]:
    turns = [decode_turn(raw) for raw in valkey.lrange(context_key(user_id, conversation_id), 0, -1)]
    return [t["tokens"] for t in turns if t["role"] == "user"]


def test_the_tokenizer_and_the_approximation_count_the_text_differently(tokenizer_path):
    assert token_counter(str(tokenizer_path))(TEXT) == 12
    assert approx_token_count(TEXT) == 6


def test_a_direct_turn_keeps_the_tokenizers_count_in_history_and_context(client, pg, valkey):
    r = client.post("/chat", json={"message": TEXT, "user_id": "user-tokens-1", "max_tokens": 20})
    assert r.status_code == 200, r.text
    conversation_id = r.json()["conversation_id"]
    assert stored_user_counts(pg, "user-tokens-1", conversation_id) == [12]
    assert context_user_counts(valkey, "user-tokens-1", conversation_id) == [12]


def test_a_queued_turn_keeps_the_tokenizers_count_in_history_and_context(client, pg, valkey):
    r = client.post("/async-chat", json={"message": TEXT, "user_id": "user-tokens-2", "max_tokens": 20})
    assert r.status_code == 200, r.text
    done = wait_done(client, r.json()["correlation_id"])
    assert done["response"].startswith("[simulated"), done
    conversation_id = done["conversation_id"]
    assert stored_user_counts(pg, "user-tokens-2", conversation_id) == [12]
    assert context_user_counts(valkey, "user-tokens-2", conversation_id) == [12]
