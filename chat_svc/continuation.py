"""Which stored conversation a whole-prompt turn that names none continues: digests of its prompt.

An OpenAI-style client names no conversation; it resends the conversation so far with every request. After
each such exchange the stored conversation keeps the digest of its user and assistant messages, answer
included, as its head (store_svc's `head_digest`). The next request of that client holds the same messages
before its new user message, so the digest of those is the head it continues, and the store finds the
conversation by it. Two unrelated requests that open alike continue nothing and are two conversations.

System messages are left out: they are instructions, not the conversation, and a client may change them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import orjson

from chatterbot import wire
from chatterbot.v1 import types_pb2

_CONVERSATION_ROLES = frozenset({types_pb2.ROLE_USER, types_pb2.ROLE_ASSISTANT})
_ASSISTANT = wire.role_name(types_pb2.ROLE_ASSISTANT)


def _conversation(messages: Sequence[types_pb2.ChatMessage]) -> list[tuple[str, str]]:
    return [(wire.role_name(m.role), m.content) for m in messages if m.role in _CONVERSATION_ROLES]


def _digest(conversation: list[tuple[str, str]]) -> str:
    # JSON of [role, content] pairs: no separator in the content can make two conversations digest alike.
    return hashlib.sha256(orjson.dumps(conversation)).hexdigest()[:32]


def continues_digest(messages: Sequence[types_pb2.ChatMessage]) -> str:
    """The head a prompt continues: the digest of its conversation before the last message; "" when that
    holds no answer (nothing to continue: the turn starts a conversation)."""
    before = _conversation(messages[:-1])
    if all(role != _ASSISTANT for role, _ in before):
        return ""
    return _digest(before)


def head_digest(messages: Sequence[types_pb2.ChatMessage], answer: str) -> str:
    """The head of the conversation once `answer` answers the prompt: what the next request continues."""
    return _digest([*_conversation(messages), (_ASSISTANT, answer)])
