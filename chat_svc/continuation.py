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

_CONVERSATION_ROLES = frozenset({types_pb2.ROLE_USER, types_pb2.ROLE_ASSISTANT, types_pb2.ROLE_TOOL})
_ASSISTANT = wire.role_name(types_pb2.ROLE_ASSISTANT)

# A message as its digest sees it: [role, content], with an assistant's calls or a tool result's call id after.
Entry = list[object]


def _calls(calls: Sequence[types_pb2.ToolCall]) -> list[list[str]]:
    return [[c.id, c.name, c.arguments] for c in calls]


def _entry(m: types_pb2.ChatMessage) -> Entry:
    entry: Entry = [wire.role_name(m.role), m.content]
    if m.tool_calls:
        entry.append(_calls(m.tool_calls))
    elif m.role == types_pb2.ROLE_TOOL:
        entry.append(m.tool_call_id)
    return entry


def _conversation(messages: Sequence[types_pb2.ChatMessage]) -> list[Entry]:
    return [_entry(m) for m in messages if m.role in _CONVERSATION_ROLES]


def _digest(conversation: list[Entry]) -> str:
    # JSON of [role, content, ...] lists: no separator in the content can make two conversations digest alike.
    return hashlib.sha256(orjson.dumps(conversation)).hexdigest()[:32]


def new_inputs(messages: Sequence[types_pb2.ChatMessage]) -> int:
    """How many of the prompt's last messages are this turn's own: its tool results (a tool turn), else the
    last message."""
    tools = 0
    while tools < len(messages) and messages[-1 - tools].role == types_pb2.ROLE_TOOL:
        tools += 1
    return tools or 1


def continues_digest(messages: Sequence[types_pb2.ChatMessage]) -> str:
    """The head a prompt continues: the digest of its conversation before the turn's own messages; "" when
    that holds no answer (nothing to continue: the turn starts a conversation)."""
    before = _conversation(messages[: -new_inputs(messages)])
    if all(entry[0] != _ASSISTANT for entry in before):
        return ""
    return _digest(before)


def head_digest(
    messages: Sequence[types_pb2.ChatMessage], answer: str, calls: Sequence[types_pb2.ToolCall] = ()
) -> str:
    """The head of the conversation once `answer` (and its tool calls) answers the prompt: what the next
    request continues."""
    last: Entry = [_ASSISTANT, answer]
    if calls:
        last.append(_calls(calls))
    return _digest([*_conversation(messages), last])
