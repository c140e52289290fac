"""API keys in PostgreSQL, on the control shard.

Keys are not sharded by user: a key is found by its hash before anyone knows whose it is (and service and admin
keys belong to no user). They live on shard 0, the control shard: shards are positional and only ever
appended, so shard 0 is the one shard that every store_svc replica agrees on before, during and after a
rebalance, and the rebalance never touches `api_keys`. The table is small (one row per key) and every read is
one unique-index probe on `key_hash`; the edge and chat_svc cache the answers for a few seconds.

Only hashes reach this module (`chatterbot.api_keys.hash_key`); the key itself is never sent to the store.
"""

from __future__ import annotations

import json
import secrets

import asyncpg

from chatterbot import wire
from chatterbot.api_keys import KINDS, USER, ApiKeyRecord, RouteLimits, route_limit
from store_svc.errors import InvalidInput, NotFound
from store_svc.sharding import ShardRouter

CONTROL_SHARD = 0

MAX_PREFIX = 32
MAX_NAME = 200
MAX_USER_ID = wire.USER_ID_MAX
_INT4_MAX = 2**31 - 1

_COLUMNS = (
    "key_id, prefix, kind, coalesce(user_id, '') AS user_id, name, requests_per_minute, tokens_per_minute, "
    "created_at, revoked_at, route_limits::text AS route_limits"
)
_CREATE = f"""
INSERT INTO api_keys (
    key_id, key_hash, prefix, kind, user_id, name, requests_per_minute, tokens_per_minute, route_limits
)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb)
RETURNING {_COLUMNS}
"""
_GET_BY_HASH = f"SELECT {_COLUMNS} FROM api_keys WHERE key_hash = $1"
_LIST = f"SELECT {_COLUMNS} FROM api_keys ORDER BY created_at, key_id"
_LIST_FOR_USER = f"SELECT {_COLUMNS} FROM api_keys WHERE user_id = $1 ORDER BY created_at, key_id"
# An exact key id wins over a prefix that happens to equal it; a prefix must name one key.
_MATCHES = (
    "SELECT key_id FROM api_keys WHERE key_id = $1 OR prefix = $1 ORDER BY (key_id = $1) DESC FOR UPDATE"
)
_UPDATE = f"""
UPDATE api_keys SET
    requests_per_minute = coalesce($2, requests_per_minute),
    tokens_per_minute = coalesce($3, tokens_per_minute),
    route_limits = coalesce($4::jsonb, route_limits)
WHERE key_id = $1
RETURNING {_COLUMNS}
"""
_REVOKE = f"""
UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE key_id = $1
RETURNING {_COLUMNS}
"""


class ApiKeyRepository:
    """Create, find by hash, list and revoke API keys; all on one pool (the control shard's primary)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    @classmethod
    def on_control_shard(cls, shards: ShardRouter) -> ApiKeyRepository:
        return cls(shards.primaries[CONTROL_SHARD])

    async def create(
        self,
        key_hash: bytes,
        prefix: str,
        kind: str,
        *,
        user_id: str = "",
        name: str = "",
        requests_per_minute: int = 0,
        tokens_per_minute: int = 0,
        route_limits: RouteLimits = (),
    ) -> ApiKeyRecord:
        """Store a new key by its hash; its id is generated."""
        _check_hash(key_hash)
        if not prefix or len(prefix) > MAX_PREFIX:
            raise InvalidInput(f"prefix must be 1 to {MAX_PREFIX} characters")
        if kind not in KINDS:
            raise InvalidInput(f"kind must be one of {', '.join(KINDS)}")
        if kind == USER and not 1 <= len(user_id) <= MAX_USER_ID:
            raise InvalidInput(f"a user key needs a user_id of 1 to {MAX_USER_ID} characters")
        if kind != USER and user_id:
            raise InvalidInput(f"a {kind} key acts for every user; it takes no user_id")
        if len(name) > MAX_NAME:
            raise InvalidInput(f"name is longer than {MAX_NAME} characters")
        _check_limits(requests_per_minute, tokens_per_minute)
        limits_json = _limits_json(route_limits)
        try:
            row = await self.pool.fetchrow(
                _CREATE,
                secrets.token_hex(8),
                key_hash,
                prefix,
                kind,
                user_id or None,
                name,
                requests_per_minute,
                tokens_per_minute,
                limits_json,
            )
        except asyncpg.exceptions.UniqueViolationError:
            raise InvalidInput("a key with this hash exists already") from None
        assert row is not None
        return _record(row)

    async def get_by_hash(self, key_hash: bytes) -> ApiKeyRecord:
        """The key with this hash, revoked or not; `NotFound` if there is none."""
        _check_hash(key_hash)
        row = await self.pool.fetchrow(_GET_BY_HASH, key_hash)
        if row is None:
            raise NotFound("no such API key")
        return _record(row)

    async def list_keys(self, user_id: str = "") -> list[ApiKeyRecord]:
        """Every key, oldest first (revoked ones too); only `user_id`'s when given."""
        rows = await (self.pool.fetch(_LIST_FOR_USER, user_id) if user_id else self.pool.fetch(_LIST))
        return [_record(row) for row in rows]

    async def revoke(self, key_id_or_prefix: str) -> ApiKeyRecord:
        """Revoke the key with this id (or this prefix, if only one key has it); revoking twice is harmless."""
        if not key_id_or_prefix:
            raise InvalidInput("name the key to revoke by its id or prefix")
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(_REVOKE, await _one_key(conn, key_id_or_prefix))
        assert row is not None
        return _record(row)

    async def update_limits(
        self,
        key_id_or_prefix: str,
        *,
        requests_per_minute: int | None = None,
        tokens_per_minute: int | None = None,
        route_limits: RouteLimits | None = None,
    ) -> ApiKeyRecord:
        """Change a key's limits (None: leave as is; `route_limits` replaces the whole list)."""
        if not key_id_or_prefix:
            raise InvalidInput("name the key to update by its id or prefix")
        _check_limits(requests_per_minute or 0, tokens_per_minute or 0)
        limits_json = None if route_limits is None else _limits_json(route_limits)
        async with self.pool.acquire() as conn, conn.transaction():
            key_id = await _one_key(conn, key_id_or_prefix)
            row = await conn.fetchrow(_UPDATE, key_id, requests_per_minute, tokens_per_minute, limits_json)
        assert row is not None
        return _record(row)


async def _one_key(conn: asyncpg.Connection, key_id_or_prefix: str) -> str:
    """The id of the key named by its id or by a prefix only one key has (locked for the transaction)."""
    matches = [row["key_id"] for row in await conn.fetch(_MATCHES, key_id_or_prefix)]
    if not matches:
        raise NotFound(f"no API key with id or prefix {key_id_or_prefix!r}")
    if len(matches) > 1 and matches[0] != key_id_or_prefix:
        raise InvalidInput(f"{len(matches)} keys have the prefix {key_id_or_prefix!r}: use the key id")
    return str(matches[0])


def _check_limits(requests_per_minute: int, tokens_per_minute: int) -> None:
    for label, value in (
        ("requests_per_minute", requests_per_minute),
        ("tokens_per_minute", tokens_per_minute),
    ):
        if not 0 <= value <= _INT4_MAX:
            raise InvalidInput(f"{label} {value} is out of range")


def _limits_json(route_limits: RouteLimits) -> str:
    checked = []
    for route, spec in route_limits:
        try:
            checked.append(route_limit(f"{route}={spec}"))
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
    return json.dumps([{"route": route, "limit": spec} for route, spec in checked])


def _record(row: asyncpg.Record) -> ApiKeyRecord:
    values = dict(row)
    values["route_limits"] = tuple((r["route"], r["limit"]) for r in json.loads(values["route_limits"]))
    return ApiKeyRecord(**values)


def _check_hash(key_hash: bytes) -> None:
    if len(key_hash) != 32:
        raise InvalidInput("key_hash must be the 32-byte SHA-256 of the key")
