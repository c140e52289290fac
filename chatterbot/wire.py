"""The wire vocabulary every component speaks: role and finish-reason names, id rules, usage, text rules.

Each fact is written here once. The proto enums are the typed form; the names are what JSON bodies, job
events and engines use.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

from chatterbot.v1 import types_pb2

# --- roles ---

ROLE_VALUES: Final[Mapping[str, types_pb2.Role]] = {
    "system": types_pb2.ROLE_SYSTEM,
    "user": types_pb2.ROLE_USER,
    "assistant": types_pb2.ROLE_ASSISTANT,
    "tool": types_pb2.ROLE_TOOL,
}
ROLE_NAMES: Final[Mapping[int, str]] = {value: name for name, value in ROLE_VALUES.items()}
# Roles a whole prompt (ChatTurn.messages) may hold.
PROMPT_ROLES: Final[frozenset[int]] = frozenset(ROLE_NAMES)


def role_name(role: int) -> str:
    """The JSON name of a Role; raises KeyError for ROLE_UNSPECIFIED or an unknown value."""
    return ROLE_NAMES[role]


def role_value(name: str) -> types_pb2.Role:
    """The Role of a JSON name; ROLE_UNSPECIFIED for a name the mesh does not know."""
    return ROLE_VALUES.get(name, types_pb2.ROLE_UNSPECIFIED)


# The trailer of an INVALID_ARGUMENT that names the refused parameter in the OpenAI API's terms
# (`logit_bias`, `response_format`, ...): an engine cannot honour it.
PARAM_TRAILER: Final = "param"


# --- finish reasons ---

FINISH_VALUES: Final[Mapping[str, types_pb2.FinishReason]] = {
    "stop": types_pb2.FINISH_REASON_STOP,
    "length": types_pb2.FINISH_REASON_LENGTH,
    "abort": types_pb2.FINISH_REASON_ABORT,
    "tool_calls": types_pb2.FINISH_REASON_TOOL_CALLS,
}
FINISH_NAMES: Final[Mapping[int, str]] = {value: name for name, value in FINISH_VALUES.items()}


def finish_name(reason: int) -> str | None:
    """The JSON name of a FinishReason; None while unspecified (a turn still running)."""
    return FINISH_NAMES.get(reason)


def finish_value(
    name: str | None, default: types_pb2.FinishReason = types_pb2.FINISH_REASON_STOP
) -> types_pb2.FinishReason:
    """The FinishReason of a JSON name; `default` for an empty or unknown name."""
    return FINISH_VALUES.get(name or "", default)


# --- usage ---


def usage_pb(prompt_tokens: int, completion_tokens: int) -> types_pb2.Usage:
    """A Usage message; the total is always the sum."""
    return types_pb2.Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def usage_dict(usage: types_pb2.Usage) -> dict[str, int]:
    """A Usage message as JSON bodies and job events carry it."""
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def usage_from_dict(usage: Mapping[str, Any] | None) -> types_pb2.Usage:
    """The Usage of a JSON object (missing counts are 0)."""
    usage = usage or {}
    return usage_pb(int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0)))


# --- ids ---

USER_ID_MIN: Final = 3
USER_ID_MAX: Final = 50
CONVERSATION_ID_PATTERN: Final = r"^[A-Za-z0-9_.:-]{1,64}$"
REQUEST_ID_MAX: Final = 128
# The longest tool call id the mesh keeps (a call's id, and a tool result's tool_call_id).
TOOL_CALL_ID_MAX: Final = 200
# The most alternatives a generated token's log probability may come with (OpenAI's top_logprobs).
TOP_LOGPROBS_MAX: Final = 20
_CONVERSATION_ID = re.compile(CONVERSATION_ID_PATTERN)


def is_user_id(user_id: str) -> bool:
    """Whether `user_id` follows the seed API's rule (3 to 50 characters)."""
    return USER_ID_MIN <= len(user_id) <= USER_ID_MAX


def is_conversation_id(conversation_id: str) -> bool:
    """Whether `conversation_id` is 1 to 64 of A-Z a-z 0-9 _ . : -."""
    # fullmatch: the pattern's `$` (kept for JSON Schema) would also let a trailing newline through.
    return _CONVERSATION_ID.fullmatch(conversation_id) is not None


USER_ID_RULE: Final = f"{USER_ID_MIN} to {USER_ID_MAX} characters"
CONVERSATION_ID_RULE: Final = "1 to 64 of A-Z a-z 0-9 _ . : -"


# --- text the store can keep ---


def text_problem(text: str) -> str | None:
    """Why PostgreSQL could not store `text` (a NUL, or a lone surrogate that is not Unicode), or None."""
    if "\x00" in text:
        return "must not contain the NUL character (U+0000)"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"is not valid Unicode: lone surrogate U+{ord(text[exc.start]):04X} at position {exc.start}"
    return None
