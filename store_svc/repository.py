"""The store's data access: plain async functions over sharded asyncpg pools, returning plain dataclasses.

Every query is scoped by `user_id` (it leads every key), so a conversation id alone never reaches another
user's rows, and each query runs on the one shard that holds the user (`store_svc.sharding`). Writes that a
chat turn makes are one statement, one round trip. List and history reads go to the shard's read replica
when there is one.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg

from chatterbot import wire
from chatterbot.v1 import types_pb2
from store_svc.errors import InvalidInput, NotFound
from store_svc.partitions import ensure_partitions, is_missing_partition
from store_svc.sharding import ShardRouter

DEFAULT_PAGE_SIZE = 50
MAX_CONVERSATION_PAGE_SIZE = 200
MAX_MESSAGE_PAGE_SIZE = 500
DEFAULT_TITLE = "New conversation"
DEFAULT_JOB_TTL_SECONDS = 24 * 3600

MAX_USER_ID = wire.USER_ID_MAX
MAX_TITLE = 200
MAX_REQUEST_ID = wire.REQUEST_ID_MAX
MAX_CORRELATION_ID = 128
MAX_MODEL = 200
# A conversation's head digest (chat_svc sends 32 hex digits).
MAX_DIGEST = 64
# How much of the first user message becomes the title of a conversation created without one.
DERIVED_TITLE_CHARS = 60
# The calls of one answer, and so the results of one tool turn.
MAX_TOOL_CALLS = 128
MAX_TOOL_CALL_ID = wire.TOOL_CALL_ID_MAX
MAX_TOOL_NAME = 200
# A call's arguments, a tool result's content.
MAX_TOOL_TEXT = 1_000_000
_INT4_MAX = 2**31 - 1
# "Before the newest message": one statement (and one cached plan) serves the first page and the rest.
_NO_CURSOR = 2**63 - 1
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class User:
    user_id: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Conversation:
    user_id: str
    conversation_id: str
    title: str
    created_at: datetime
    updated_at: datetime
    message_count: int


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A function call an answer made; `arguments` is the JSON text the model wrote, kept as it is."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ToolResult:
    """The result of a tool call, to store as a tool message."""

    tool_call_id: str
    content: str
    token_count: int = 0


@dataclass(frozen=True, slots=True)
class Message:
    """A stored message; `model`, `request_id` and `tool_call_id` are "" and `processing_time` 0.0 where not
    set."""

    user_id: str
    message_id: int
    conversation_id: str
    role: str  # "system" | "user" | "assistant" | "tool"
    content: str
    token_count: int
    processing_time: float
    model: str
    request_id: str
    created_at: datetime
    # On an answer: the tools it called.
    tool_calls: tuple[ToolCall, ...] = ()
    # On a tool message: the call whose result it is.
    tool_call_id: str = ""


@dataclass(frozen=True, slots=True)
class Exchange:
    """A user message (or a tool turn's results) and its answer, as stored by `append_exchange`."""

    conversation: Conversation
    # None for a tool turn.
    user_message: Message | None
    assistant_message: Message
    # False when the request id had been stored before and nothing was written.
    created: bool
    # A tool turn's results, in the order they were stored (before the answer).
    tool_results: tuple[Message, ...] = ()


@dataclass(frozen=True, slots=True)
class ConversationPage:
    conversations: list[Conversation]
    # Opaque; "" on the last page.
    next_page_token: str


@dataclass(frozen=True, slots=True)
class MessagePage:
    # Oldest first.
    messages: list[Message]
    # Pass as `before_message_id` for the page before this one; 0 when there is none.
    next_before_message_id: int


@dataclass(frozen=True, slots=True)
class JobResult:
    """The outcome of a queued chat. `status` and `finish_reason` are the numbers of the proto enums
    (`JobStatus`, `FinishReason`): the store keeps them, it does not interpret them."""

    user_id: str
    correlation_id: str
    status: types_pb2.JobStatus
    response: str = ""
    conversation_id: str = ""
    processing_time: float = 0.0
    error: str = ""
    finish_reason: types_pb2.FinishReason = types_pb2.FINISH_REASON_UNSPECIFIED
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Set by the store.
    created_at: datetime | None = None
    updated_at: datetime | None = None
    expires_at: datetime | None = None


# --- SQL ----------------------------------------------------------------------------------------------------

_CONVERSATION_COLUMNS = "user_id, conversation_id, title, created_at, updated_at, message_count"
_MESSAGE_COLUMNS = (
    "user_id, message_id, conversation_id, role, content, token_count, processing_time, model, request_id, "
    "created_at"
)
# NULL but on exchanges with tools: the plain exchange neither writes nor returns them.
_TOOL_COLUMNS = "tool_calls, tool_call_id"
_JOB_COLUMNS = (
    "user_id, correlation_id, status, response, conversation_id, processing_time, error, finish_reason, "
    "prompt_tokens, completion_tokens, created_at, updated_at, expires_at"
)

_ENSURE_USER = """
INSERT INTO users (user_id) VALUES ($1) ON CONFLICT (user_id) DO NOTHING RETURNING user_id, created_at
"""
_GET_USER = "SELECT user_id, created_at FROM users WHERE user_id = $1"

# An id that exists already is left as it is, so a retried create is harmless.
_CREATE_CONVERSATION = f"""
WITH new_user AS (
    INSERT INTO users (user_id) VALUES ($1) ON CONFLICT (user_id) DO NOTHING
)
INSERT INTO conversations (user_id, conversation_id, title) VALUES ($1, $2, $3)
ON CONFLICT (user_id, conversation_id) DO NOTHING
RETURNING {_CONVERSATION_COLUMNS}
"""
_GET_CONVERSATION = f"""
SELECT {_CONVERSATION_COLUMNS} FROM conversations WHERE user_id = $1 AND conversation_id = $2
"""
# Two statements rather than one with "$2 IS NULL OR ...": a generic cached plan of that would not use the
# index range on updated_at.
_LIST_CONVERSATIONS_FIRST = f"""
SELECT {_CONVERSATION_COLUMNS} FROM conversations
WHERE user_id = $1
ORDER BY updated_at DESC, conversation_id
LIMIT $2
"""
_LIST_CONVERSATIONS_AFTER = f"""
SELECT {_CONVERSATION_COLUMNS} FROM conversations
WHERE user_id = $1 AND updated_at <= $2 AND (updated_at < $2 OR conversation_id > $3)
ORDER BY updated_at DESC, conversation_id
LIMIT $4
"""
_RENAME_CONVERSATION = f"""
UPDATE conversations SET title = $3, updated_at = now()
WHERE user_id = $1 AND conversation_id = $2
RETURNING {_CONVERSATION_COLUMNS}
"""
# Messages are deleted explicitly (the cascade would find none left) to count them.
_DELETE_CONVERSATION = """
WITH deleted_messages AS (
    DELETE FROM messages WHERE user_id = $1 AND conversation_id = $2 RETURNING 1
), deleted AS (
    DELETE FROM conversations WHERE user_id = $1 AND conversation_id = $2 RETURNING 1
)
SELECT (SELECT count(*) FROM deleted) AS conversations, (SELECT count(*) FROM deleted_messages) AS messages
"""
# The conversation row comes along even when it has no messages (or none before the cursor), which tells
# "empty" from "not yours".
_LIST_MESSAGES = f"""
SELECT m.* FROM conversations c
LEFT JOIN LATERAL (
    SELECT {_MESSAGE_COLUMNS}, {_TOOL_COLUMNS} FROM messages
    WHERE user_id = c.user_id AND conversation_id = c.conversation_id AND message_id < $3
    ORDER BY message_id DESC
    LIMIT $4
) m ON true
WHERE c.user_id = $1 AND c.conversation_id = $2
ORDER BY m.message_id DESC
"""

# One round trip for a whole turn. Data-modifying CTEs run once each, on one snapshot, and foreign keys are
# checked at the end of the statement, so the user and conversation may be created by this very statement.
# The conversation is the one named ($2), or with a continues digest ($11, NULL when the request names a
# conversation) the user's conversation whose head that is: FOR UPDATE, so that of two appends continuing one
# head, the one that waited finds the head moved on (READ COMMITTED rechecks the locked row) and takes $2, a
# new id, instead: a fork. Every append sets the head to $12 (NULL: nothing continues it by digest).
# The request id is claimed in exchange_requests first (a concurrent duplicate waits there for the first to
# commit, then claims nothing); a request id stored before inserts no message, so the conversation is neither
# created nor touched and the final SELECT is empty: the caller then reads the stored exchange. A NULL request
# id claims nothing and always inserts. The rows are inserted in order: the user message gets the smaller id.
# `$11 IS NOT NULL` stands first so that the cached generic plan skips the lookup outright for the appends
# that continue nothing (most of them), whatever the planner estimates for the user's conversations.
# The two statements below share all but the insert of the messages (`new_messages`).
_APPEND_TARGET = """
WITH new_user AS (
    INSERT INTO users (user_id) VALUES ($1::text) ON CONFLICT (user_id) DO NOTHING
),
continued AS (
    SELECT conversation_id FROM conversations
    WHERE $11::text IS NOT NULL AND user_id = $1::text AND head_digest = $11::text
    ORDER BY updated_at DESC, conversation_id
    LIMIT 1
    FOR UPDATE
),
target AS (
    SELECT coalesce((SELECT conversation_id FROM continued), $2::text) AS conversation_id
),
request AS (
    INSERT INTO exchange_requests (user_id, request_id, conversation_id)
    SELECT $1::text, $3::text, target.conversation_id FROM target WHERE $3::text IS NOT NULL
    ON CONFLICT (user_id, request_id) DO NOTHING
    RETURNING 1
),"""
_APPEND_CONVERSATION = """
conversation AS (
    INSERT INTO conversations AS c (user_id, conversation_id, title, message_count, head_digest)
    SELECT $1::text, (SELECT conversation_id FROM target), $10::text, count(*), $12::text
    FROM new_messages HAVING count(*) > 0
    ON CONFLICT (user_id, conversation_id) DO UPDATE
        SET message_count = c.message_count + excluded.message_count, updated_at = now(),
            head_digest = excluded.head_digest
    RETURNING title, created_at, updated_at, message_count
)
SELECT m.*, c.title, c.created_at AS conversation_created_at, c.updated_at AS conversation_updated_at,
       c.message_count
FROM new_messages m CROSS JOIN conversation c
ORDER BY m.message_id
"""
# A user message and a plain answer: the hot path (README's benchmarks), two rows of constants.
_APPEND_EXCHANGE = f"""{_APPEND_TARGET}
new_messages AS (
    INSERT INTO messages (user_id, conversation_id, role, content, token_count, processing_time, model,
                          request_id)
    SELECT $1::text, target.conversation_id, exchange.* FROM target CROSS JOIN (
        VALUES ('user', $4::text, $5::integer, NULL::double precision, NULL::text, $3::text),
               ('assistant', $6::text, $7::integer, $8::double precision, $9::text, $3::text)
    ) AS exchange
    WHERE $3::text IS NULL OR EXISTS (SELECT FROM request)
    RETURNING {_MESSAGE_COLUMNS}
),{_APPEND_CONVERSATION}"""
# An exchange with tools: the user message or the tool results, then the answer (the last of the arrays $4 to
# $7: roles, contents, token counts, tool call ids), whose processing time, model and tool calls are $8, $9
# and $13.
_APPEND_TOOL_EXCHANGE = f"""{_APPEND_TARGET}
new_messages AS (
    INSERT INTO messages (user_id, conversation_id, role, content, token_count, processing_time, model,
                          request_id, tool_calls, tool_call_id)
    SELECT $1::text, target.conversation_id, m.role, m.content, m.token_count,
           CASE WHEN m.role = 'assistant' THEN $8::double precision END,
           CASE WHEN m.role = 'assistant' THEN $9::text END,
           $3::text,
           CASE WHEN m.role = 'assistant' THEN $13::jsonb END,
           m.tool_call_id
    FROM target CROSS JOIN unnest($4::text[], $5::text[], $6::integer[], $7::text[]) WITH ORDINALITY
        AS m (role, content, token_count, tool_call_id, position)
    WHERE $3::text IS NULL OR EXISTS (SELECT FROM request)
    ORDER BY m.position
    RETURNING {_MESSAGE_COLUMNS}, {_TOOL_COLUMNS}
),{_APPEND_CONVERSATION}"""
# The request's created_at is its messages' (one transaction, one now()): the join reaches one partition.
_STORED_EXCHANGE = """
SELECT m.user_id, m.message_id, m.conversation_id, m.role, m.content, m.token_count, m.processing_time,
       m.model, m.request_id, m.created_at, m.tool_calls, m.tool_call_id,
       c.title, c.created_at AS conversation_created_at, c.updated_at AS conversation_updated_at,
       c.message_count
FROM exchange_requests r
JOIN conversations c ON c.user_id = r.user_id AND c.conversation_id = r.conversation_id
JOIN messages m ON m.user_id = r.user_id AND m.conversation_id = r.conversation_id
                AND m.created_at = r.created_at AND m.request_id = r.request_id
WHERE r.user_id = $1 AND r.request_id = $2 AND m.role IN ('user', 'tool', 'assistant')
ORDER BY m.message_id
"""

_PUT_JOB_RESULT = f"""
INSERT INTO job_results (user_id, correlation_id, status, response, conversation_id, processing_time, error,
                         finish_reason, prompt_tokens, completion_tokens, expires_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, now() + make_interval(secs => $11))
ON CONFLICT (user_id, correlation_id) DO UPDATE SET
    status = excluded.status,
    response = excluded.response,
    conversation_id = excluded.conversation_id,
    processing_time = excluded.processing_time,
    error = excluded.error,
    finish_reason = excluded.finish_reason,
    prompt_tokens = excluded.prompt_tokens,
    completion_tokens = excluded.completion_tokens,
    updated_at = now(),
    expires_at = excluded.expires_at
RETURNING {_JOB_COLUMNS}
"""
_GET_JOB_RESULT = f"""
SELECT {_JOB_COLUMNS} FROM job_results
WHERE user_id = $1 AND correlation_id = $2 AND expires_at > now()
"""
# Maintenance, the one query that spans users. SKIP LOCKED lets several replicas purge side by side.
_PURGE_EXPIRED_JOB_RESULTS = """
WITH doomed AS (
    SELECT user_id, correlation_id FROM job_results
    WHERE expires_at <= now()
    ORDER BY expires_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
DELETE FROM job_results j USING doomed d
WHERE j.user_id = d.user_id AND j.correlation_id = d.correlation_id
"""


class StoreRepository:
    """Users, conversations, messages and job results, each user's on the shard that holds them.

    Takes a `ShardRouter`, or one asyncpg pool for an unsharded store.
    """

    def __init__(
        self,
        shards: ShardRouter | asyncpg.Pool,
        *,
        default_job_ttl_seconds: int = DEFAULT_JOB_TTL_SECONDS,
        partitions_ahead_months: int = 3,
    ) -> None:
        self.shards = shards if isinstance(shards, ShardRouter) else ShardRouter([shards])
        self.default_job_ttl_seconds = default_job_ttl_seconds
        self.partitions_ahead_months = partitions_ahead_months

    # --- users ---

    async def ensure_user(self, user_id: str) -> tuple[User, bool]:
        """The user, created if missing; the flag is True when this call created it."""
        _check_user_id(user_id)
        async with self.shards.writer(user_id) as db:
            row = await db.fetchrow(_ENSURE_USER, user_id)
        if row is not None:
            return User(**row), True
        # A fresh statement: the insert's snapshot may predate a concurrent creator's commit.
        return await self.get_user(user_id), False

    async def get_user(self, user_id: str) -> User:
        """The user; `NotFound` if it was never stored."""
        _check_user_id(user_id)
        async with self.shards.writer(user_id) as db:
            row = await db.fetchrow(_GET_USER, user_id)
        if row is None:
            raise NotFound(f"user {user_id!r} not found")
        return User(**row)

    # --- conversations ---

    async def create_conversation(
        self, user_id: str, title: str = "", conversation_id: str = ""
    ) -> Conversation:
        """A new conversation (the user is created if missing); the id is generated when empty.

        Creating an id that exists already returns that conversation unchanged, so retries are safe.
        """
        _check_user_id(user_id)
        conversation_id = conversation_id or uuid.uuid4().hex
        _check_conversation_id(conversation_id)
        title = _check_title(title) or DEFAULT_TITLE
        async with self.shards.writer(user_id) as db:
            row = await db.fetchrow(_CREATE_CONVERSATION, user_id, conversation_id, title)
        if row is None:
            return await self.get_conversation(user_id, conversation_id)
        return Conversation(**row)

    async def get_conversation(self, user_id: str, conversation_id: str) -> Conversation:
        """The conversation; `NotFound` if this user has none with that id."""
        _check_user_id(user_id)
        _check_conversation_id(conversation_id)
        async with self.shards.writer(user_id) as db:
            row = await db.fetchrow(_GET_CONVERSATION, user_id, conversation_id)
        if row is None:
            raise _conversation_not_found(conversation_id)
        return Conversation(**row)

    async def list_conversations(
        self, user_id: str, page_size: int = 0, page_token: str = ""
    ) -> ConversationPage:
        """The user's conversations, most recently updated first, `page_size` (0 means 50) at a time."""
        _check_user_id(user_id)
        size = _page_size(page_size, MAX_CONVERSATION_PAGE_SIZE)
        cursor = _decode_page_token(page_token) if page_token else None
        async with self.shards.reader(user_id) as db:
            if cursor is not None:
                rows = await db.fetch(_LIST_CONVERSATIONS_AFTER, user_id, *cursor, size + 1)
            else:
                rows = await db.fetch(_LIST_CONVERSATIONS_FIRST, user_id, size + 1)
        conversations = [Conversation(**row) for row in rows[:size]]
        next_token = ""
        if len(rows) > size:
            last = conversations[-1]
            next_token = _encode_page_token(last.updated_at, last.conversation_id)
        return ConversationPage(conversations, next_token)

    async def rename_conversation(self, user_id: str, conversation_id: str, title: str) -> Conversation:
        """Set the conversation's title (and bump its update time); `NotFound` if it is not this user's."""
        _check_user_id(user_id)
        _check_conversation_id(conversation_id)
        title = _check_title(title)
        if not title:
            raise InvalidInput("title must not be empty")
        async with self.shards.writer(user_id) as db:
            row = await db.fetchrow(_RENAME_CONVERSATION, user_id, conversation_id, title)
        if row is None:
            raise _conversation_not_found(conversation_id)
        return Conversation(**row)

    async def delete_conversation(self, user_id: str, conversation_id: str) -> int:
        """Delete the conversation and its messages; return how many messages went. `NotFound` if not there."""
        _check_user_id(user_id)
        _check_conversation_id(conversation_id)
        async with self.shards.writer(user_id) as db:
            row = await db.fetchrow(_DELETE_CONVERSATION, user_id, conversation_id)
        assert row is not None  # the counts come back even when nothing was deleted
        if row["conversations"] == 0:
            raise _conversation_not_found(conversation_id)
        return row["messages"]

    # --- messages ---

    async def list_messages(
        self, user_id: str, conversation_id: str, page_size: int = 0, before_message_id: int = 0
    ) -> MessagePage:
        """The newest `page_size` (0 means 50) messages before `before_message_id` (0: from the newest),
        oldest first. `NotFound` if the conversation is not this user's."""
        _check_user_id(user_id)
        _check_conversation_id(conversation_id)
        if before_message_id < 0:
            raise InvalidInput("before_message_id must not be negative")
        size = _page_size(page_size, MAX_MESSAGE_PAGE_SIZE)
        async with self.shards.reader(user_id) as db:
            rows = await db.fetch(
                _LIST_MESSAGES, user_id, conversation_id, before_message_id or _NO_CURSOR, size + 1
            )
        if not rows:
            raise _conversation_not_found(conversation_id)
        if rows[0]["message_id"] is None:
            return MessagePage([], 0)
        newest_first = [_message(row) for row in rows[:size]]
        next_before = newest_first[-1].message_id if len(rows) > size else 0
        return MessagePage(newest_first[::-1], next_before)

    async def append_exchange(
        self,
        user_id: str,
        conversation_id: str,
        request_id: str,
        user_content: str,
        assistant_content: str,
        *,
        user_token_count: int = 0,
        assistant_token_count: int = 0,
        model: str = "",
        processing_time: float = 0.0,
        title: str = "",
        continues_digest: str = "",
        head_digest: str = "",
        tool_calls: Sequence[ToolCall] = (),
        tool_results: Sequence[ToolResult] = (),
    ) -> Exchange:
        """Store a user message and its answer, creating the user and conversation as needed.

        Idempotent on (user_id, request_id): a request id stored before writes nothing and returns the stored
        exchange with `created=False` (from the conversation it was first stored in). An empty request id
        opts out of that. An empty conversation id continues the user's conversation whose head digest is
        `continues_digest` (one of two racing continuations only; the other starts a new conversation), or
        else starts a new conversation; a new conversation is titled `title`, or else the start of the user
        message. The conversation's head digest becomes `head_digest` ("": none).

        `tool_calls` are the answer's. A tool turn stores `tool_results`, in order, in place of the user
        message (`user_content` must then be empty); a conversation it starts is titled from the answer.
        """
        _check_user_id(user_id)
        if conversation_id:
            continues_digest = ""  # a named conversation is the conversation
        conversation_id = conversation_id or uuid.uuid4().hex
        _check_conversation_id(conversation_id)
        _check_length("request_id", request_id, MAX_REQUEST_ID)
        _check_length("model", model, MAX_MODEL)
        _check_length("continues_digest", continues_digest, MAX_DIGEST)
        _check_length("head_digest", head_digest, MAX_DIGEST)
        _check_token_count(user_token_count)
        _check_token_count(assistant_token_count)
        _check_tool_calls(tool_calls)
        _check_tool_results(tool_results)
        if tool_results and (user_content or user_token_count):
            raise InvalidInput("a tool turn stores tool_results in place of the user message: not both")
        title = _check_title(title) or derive_title(assistant_content if tool_results else user_content)
        ids = (user_id, conversation_id, request_id or None)
        heads = (title, continues_digest or None, head_digest or None)
        args: tuple[object, ...]
        if not (tool_calls or tool_results):
            statement = _APPEND_EXCHANGE
            args = (
                *ids,
                user_content,
                user_token_count,
                assistant_content,
                assistant_token_count,
                processing_time,
                model or None,
                *heads,
            )
            stored = 2
        else:
            # (role, content, token count, tool call id) of each message, in the order they are stored.
            inputs: list[tuple[str, str, int, str | None]] = [
                ("tool", r.content, r.token_count, r.tool_call_id) for r in tool_results
            ] or [("user", user_content, user_token_count, None)]
            answer = ("assistant", assistant_content, assistant_token_count, None)
            roles, contents, counts, call_ids = map(list, zip(*inputs, answer, strict=True))
            statement = _APPEND_TOOL_EXCHANGE
            calls = _tool_calls_json(tool_calls)
            args = (*ids, roles, contents, counts, call_ids, processing_time, model or None, *heads, calls)
            stored = len(roles)
        rows = await self._append(user_id, statement, args)
        if len(rows) == stored:
            return _exchange(user_id, rows, created=True)
        # A replay: no rows.
        async with self.shards.writer(user_id) as db:
            replayed = await db.fetch(_STORED_EXCHANGE, user_id, request_id)
        return _exchange(user_id, replayed, created=bool(rows))

    async def _append(self, user_id: str, statement: str, args: tuple[object, ...]) -> list[asyncpg.Record]:
        try:
            async with self.shards.writer(user_id) as db:
                return await db.fetch(statement, *args)
        except asyncpg.exceptions.CheckViolationError as exc:
            if not is_missing_partition(exc):
                raise
        # This month's partition is missing (the maintenance task has not run yet): make it, once.
        await self.ensure_partitions()
        async with self.shards.writer(user_id) as db:
            return await db.fetch(statement, *args)

    # --- job results ---

    async def put_job_result(self, result: JobResult, ttl_seconds: int = 0) -> JobResult:
        """Insert or replace the result of a queued chat, kept for `ttl_seconds` (0: the default) from now."""
        _check_user_id(result.user_id)
        if not result.correlation_id:
            raise InvalidInput("correlation_id is required")
        _check_length("correlation_id", result.correlation_id, MAX_CORRELATION_ID)
        if result.conversation_id:
            _check_conversation_id(result.conversation_id)
        _check_token_count(result.prompt_tokens)
        _check_token_count(result.completion_tokens)
        ttl = ttl_seconds or self.default_job_ttl_seconds
        if ttl < 0:
            raise InvalidInput("ttl_seconds must not be negative")
        async with self.shards.writer(result.user_id) as db:
            row = await db.fetchrow(
                _PUT_JOB_RESULT,
                result.user_id,
                result.correlation_id,
                result.status,
                result.response,
                result.conversation_id,
                result.processing_time,
                result.error,
                result.finish_reason,
                result.prompt_tokens,
                result.completion_tokens,
                float(ttl),
            )
        assert row is not None  # an upsert returns its row
        return JobResult(**row)

    async def get_job_result(self, user_id: str, correlation_id: str) -> JobResult:
        """The stored result; `NotFound` if there is none or it has expired."""
        _check_user_id(user_id)
        if not correlation_id:
            raise InvalidInput("correlation_id is required")
        _check_length("correlation_id", correlation_id, MAX_CORRELATION_ID)
        async with self.shards.writer(user_id) as db:
            row = await db.fetchrow(_GET_JOB_RESULT, user_id, correlation_id)
        if row is None:
            raise NotFound(f"job result {correlation_id!r} not found")
        return JobResult(**row)

    async def purge_expired_job_results(self, limit: int = 1000) -> int:
        """Delete up to `limit` expired job results per shard; return how many went."""
        purged = 0
        for pool in self.shards.primaries:
            status = await pool.execute(_PURGE_EXPIRED_JOB_RESULTS, limit)
            purged += int(status.rsplit(" ", 1)[1])
        return purged

    # --- maintenance ---

    async def ensure_partitions(self, shard: int | None = None) -> int:
        """Create the monthly message partitions due (on one shard, or all); return how many were made."""
        pools = self.shards.primaries if shard is None else [self.shards.primaries[shard]]
        created = 0
        for pool in pools:
            created += await ensure_partitions(pool, self.partitions_ahead_months)
        return created


# --- rows to dataclasses ----------------------------------------------------------------------------------


def _message(row: asyncpg.Record) -> Message:
    calls = row.get("tool_calls")  # not a column the plain exchange returns
    return Message(
        user_id=row["user_id"],
        message_id=row["message_id"],
        conversation_id=row["conversation_id"],
        role=row["role"],
        content=row["content"],
        token_count=row["token_count"],
        processing_time=row["processing_time"] or 0.0,
        model=row["model"] or "",
        request_id=row["request_id"] or "",
        created_at=row["created_at"],
        tool_calls=tuple(ToolCall(**call) for call in json.loads(calls)) if calls else (),
        tool_call_id=row.get("tool_call_id") or "",
    )


def _exchange(user_id: str, rows: list[asyncpg.Record], *, created: bool) -> Exchange:
    messages = [_message(row) for row in rows]
    inputs = [m.role for m in messages[:-1]]
    if not messages or messages[-1].role != "assistant" or (inputs != ["user"] and set(inputs) != {"tool"}):
        raise RuntimeError(
            f"exchange of request {rows[0]['request_id']!r} is incomplete"
            if rows
            else "exchange vanished while it was being stored"
        )
    first = rows[0]
    conversation = Conversation(
        user_id=user_id,
        conversation_id=first["conversation_id"],
        title=first["title"],
        created_at=first["conversation_created_at"],
        updated_at=first["conversation_updated_at"],
        message_count=first["message_count"],
    )
    *before, answer = messages
    if inputs == ["user"]:
        return Exchange(conversation, before[0], answer, created)
    return Exchange(conversation, None, answer, created, tuple(before))


def _tool_calls_json(calls: Sequence[ToolCall]) -> str | None:
    if not calls:
        return None
    return json.dumps([{"id": c.id, "name": c.name, "arguments": c.arguments} for c in calls])


# --- validation and helpers -------------------------------------------------------------------------------


def derive_title(user_content: str) -> str:
    """A title from the start of the first user message: whitespace collapsed, cut at a word if it can be."""
    text = " ".join(user_content.split())
    if not text:
        return DEFAULT_TITLE
    if len(text) <= DERIVED_TITLE_CHARS:
        return text
    cut = text[: DERIVED_TITLE_CHARS - 1]
    if " " in cut[DERIVED_TITLE_CHARS // 2 :]:
        cut = cut.rsplit(" ", 1)[0]
    return cut.rstrip(" .,;:") + "…"


def _check_user_id(user_id: str) -> None:
    if not user_id:
        raise InvalidInput("user_id is required")
    _check_length("user_id", user_id, MAX_USER_ID)


def _check_conversation_id(conversation_id: str) -> None:
    if not conversation_id:
        raise InvalidInput("conversation_id is required")
    if not wire.is_conversation_id(conversation_id):
        raise InvalidInput(f"conversation_id must be {wire.CONVERSATION_ID_RULE}")


def _check_title(title: str) -> str:
    title = title.strip()
    _check_length("title", title, MAX_TITLE)
    return title


def _check_length(name: str, value: str, limit: int) -> None:
    if len(value) > limit:
        raise InvalidInput(f"{name} is longer than {limit} characters")


def _check_token_count(count: int) -> None:
    if not 0 <= count <= _INT4_MAX:
        raise InvalidInput(f"token count {count} is out of range")


def _check_text(name: str, value: str, limit: int, *, required: bool = False) -> None:
    """Tool texts are checked here, not left to the database: in JSON a NUL is an escape jsonb refuses."""
    if required and not value:
        raise InvalidInput(f"{name} is required")
    _check_length(name, value, limit)
    if "\x00" in value:
        raise InvalidInput(f"{name} holds a NUL character, which the store cannot keep")


def _check_tool_calls(calls: Sequence[ToolCall]) -> None:
    if len(calls) > MAX_TOOL_CALLS:
        raise InvalidInput(f"an answer makes at most {MAX_TOOL_CALLS} tool calls")
    for i, call in enumerate(calls):
        _check_text(f"tool_calls[{i}].id", call.id, MAX_TOOL_CALL_ID, required=True)
        _check_text(f"tool_calls[{i}].name", call.name, MAX_TOOL_NAME, required=True)
        _check_text(f"tool_calls[{i}].arguments", call.arguments, MAX_TOOL_TEXT)
    if len({call.id for call in calls}) != len(calls):
        raise InvalidInput("the tool calls of an answer need ids of their own")


def _check_tool_results(results: Sequence[ToolResult]) -> None:
    if len(results) > MAX_TOOL_CALLS:
        raise InvalidInput(f"a tool turn holds at most {MAX_TOOL_CALLS} tool results")
    for i, result in enumerate(results):
        _check_text(f"tool_results[{i}].tool_call_id", result.tool_call_id, MAX_TOOL_CALL_ID, required=True)
        _check_text(f"tool_results[{i}].content", result.content, MAX_TOOL_TEXT)
        _check_token_count(result.token_count)


def _page_size(requested: int, limit: int) -> int:
    if requested < 0:
        raise InvalidInput("page_size must not be negative")
    return min(requested or DEFAULT_PAGE_SIZE, limit)


def _conversation_not_found(conversation_id: str) -> NotFound:
    return NotFound(f"conversation {conversation_id!r} not found")


def _encode_page_token(updated_at: datetime, conversation_id: str) -> str:
    # Integer microseconds: the cursor must compare equal to the stored timestamp, exactly.
    micros = (updated_at - _EPOCH) // timedelta(microseconds=1)
    raw = json.dumps([micros, conversation_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_page_token(token: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        micros, conversation_id = json.loads(raw)
        if not isinstance(micros, int) or not isinstance(conversation_id, str):
            raise TypeError("bad page token shape")
        return _EPOCH + timedelta(microseconds=micros), conversation_id
    except (binascii.Error, ValueError, TypeError, OverflowError) as exc:
        raise InvalidInput("page_token is not valid") from exc
