"""API keys, shared by the edge and the gRPC surface of chat_svc: their shape, their hash, and the resolver
that turns a key into a caller.

Two sources of keys:
- Static keys from settings (`CHATTERBOT_API_KEYS` are service keys, `CHATTERBOT_ADMIN_KEYS` admin keys), for
  development, tests and load tests; `chatterbot up` generates a pair.
- Keys made by `chatterbot keys create`: `cb_` + 43 URL-safe characters (256 random bits), shown once, stored
  by store_svc as their SHA-256 (on the control shard, see `store_svc/keys.py`). A plain SHA-256 is enough
  for keys this random: there is no dictionary to try and no preimage to find, so a slow, salted password
  hash would only cost CPU on every lookup and forbid finding a key by its hash in one index probe.

`KeyResolver` checks the static keys, then asks store_svc (`GetApiKey` by hash) and caches the answer for
`CHATTERBOT_API_KEY_CACHE_SECONDS` (default 5), and "no such key" for at most a second, so a revoked key stops
working within the cache time and a flood of unknown keys does not turn into a flood of lookups. Concurrent
lookups of one key share one call. A key that is neither static nor shaped like a generated key is refused
without a lookup.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import grpc
from limits import parse_many

from chatterbot.breaker import CircuitOpenError
from chatterbot.status import InvalidArgument
from chatterbot.v1 import store_pb2

if TYPE_CHECKING:
    from chatterbot.guarded_client import GuardedClient
    from chatterbot.settings import Settings
    from chatterbot.v1.store_pb2_grpc import StoreServiceAsyncStub

# The gRPC metadata key (the HTTP header is X-API-Key).
API_KEY_METADATA = "x-api-key"
# Generated keys start with this; static keys may look like anything.
KEY_PREFIX = "cb_"
# How much of a key is kept and shown to recognise it ("cb_" and 8 characters, 48 bits: not enough to guess
# the rest by, plenty to tell keys apart).
DISPLAY_PREFIX_CHARS = 11
MAX_KEY_CHARS = 256

USER = "user"
SERVICE = "service"
ADMIN = "admin"
KINDS = (USER, SERVICE, ADMIN)

NEGATIVE_CACHE_SECONDS = 1.0
CACHE_MAX_ENTRIES = 10_000
LOOKUP_TIMEOUT_SECONDS = 2.0


def generate_key() -> str:
    """A new random key (256 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> bytes:
    """What is stored of a key: the SHA-256 of its UTF-8 text."""
    return hashlib.sha256(key.encode()).digest()


def display_prefix(key: str) -> str:
    """The start of a key, as shown in `chatterbot keys list`."""
    return key[:DISPLAY_PREFIX_CHARS]


RouteLimits = tuple[tuple[str, str], ...]


def route_limit(entry: str) -> tuple[str, str]:
    """`/stream-chat=600/minute` (several limits joined by ';') as (route, limit); ValueError when malformed."""
    route, sep, spec = entry.partition("=")
    route, spec = route.strip(), spec.strip()
    if not sep or not route.startswith("/") or not spec:
        raise ValueError(f"rate limit {entry!r} is not route=limit (e.g. /stream-chat=600/minute)")
    try:
        parse_many(spec)
    except ValueError as exc:
        raise ValueError(f"rate limit {entry!r}: {spec!r} is not a limit such as 600/minute") from exc
    return route, spec


def route_limits_text(route_limits: RouteLimits) -> str:
    """Route limits as `chatterbot keys` and settings write them: `/chat=20/minute,/stream-chat=600/minute`."""
    return ",".join(f"{route}={spec}" for route, spec in route_limits)


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    """A stored key: everything but the key itself."""

    key_id: str
    prefix: str
    kind: str  # USER | SERVICE | ADMIN
    user_id: str = ""
    name: str = ""
    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    created_at: datetime | None = None
    revoked_at: datetime | None = None
    # (route, limit) pairs: the key's own per-route limits (see `route_limit`).
    route_limits: RouteLimits = ()

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a valid key speaks for, and its limits (0: none of its own)."""

    key_id: str
    kind: str
    user_id: str = ""
    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    # A key from settings rather than from the store.
    static: bool = False
    route_limits: RouteLimits = ()

    @property
    def has_own_limits(self) -> bool:
        """Whether the key carries limits of its own, which replace the edge's route defaults."""
        return bool(self.route_limits or self.requests_per_minute or self.tokens_per_minute)

    @property
    def admin(self) -> bool:
        return self.kind == ADMIN

    def may_act_for(self, user_id: str) -> bool:
        """A user key acts for its own user only; service and admin keys for anyone."""
        return self.kind != USER or hmac.compare_digest(self.user_id.encode(), user_id.encode())

    @classmethod
    def of(cls, record: ApiKeyRecord) -> Principal:
        return cls(
            record.key_id,
            record.kind,
            record.user_id,
            record.requests_per_minute,
            record.tokens_per_minute,
            route_limits=record.route_limits,
        )


class KeyLookupUnavailable(Exception):
    """store_svc could not be asked about a key; the caller should answer "unavailable", not "forbidden"."""


Lookup = Callable[[bytes], Awaitable[ApiKeyRecord | None]]


class KeyResolver:
    """Static keys first, then store_svc by hash, behind a short in-process cache."""

    def __init__(
        self,
        *,
        service_keys: Sequence[str] = (),
        admin_keys: Sequence[str] = (),
        lookup: Lookup | None = None,
        cache_seconds: float = 5.0,
        negative_cache_seconds: float = NEGATIVE_CACHE_SECONDS,
        max_entries: int = CACHE_MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # By hash: a dict probe on the hash reveals nothing about the key through its timing.
        self._static: dict[bytes, Principal] = {}
        for kind, keys in ((SERVICE, service_keys), (ADMIN, admin_keys)):
            for key in keys:
                digest = hash_key(key)
                self._static[digest] = Principal(f"static-{digest.hex()[:12]}", kind, static=True)
        self._lookup = lookup
        self.cache_seconds = cache_seconds
        self.negative_cache_seconds = min(negative_cache_seconds, cache_seconds)
        self._max_entries = max_entries
        self._clock = clock
        self._cache: OrderedDict[bytes, tuple[float, Principal | None]] = OrderedDict()
        self._inflight: dict[bytes, asyncio.Task[Principal | None]] = {}

    @classmethod
    def from_settings(cls, settings: Settings, lookup: Lookup | None) -> KeyResolver:
        return cls(
            service_keys=settings.api_keys,
            admin_keys=settings.admin_keys,
            lookup=lookup,
            cache_seconds=settings.api_key_cache_seconds,
        )

    def peek(self, key: str) -> tuple[bool, Principal | None]:
        """(known, principal) without asking the store: known is False when only a lookup can tell."""
        if len(key) > MAX_KEY_CHARS:
            return True, None
        digest = hash_key(key)
        if digest in self._static:
            return True, self._static[digest]
        if self._lookup is None or not key.startswith(KEY_PREFIX):
            return True, None
        entry = self._cache.get(digest)
        if entry is not None:
            expires, principal = entry
            if self._clock() < expires:
                return True, principal
            del self._cache[digest]
        return False, None

    async def resolve(self, key: str) -> Principal | None:
        """The caller a key speaks for; None for an unknown or revoked key. Raises `KeyLookupUnavailable`."""
        known, principal = self.peek(key)
        if known:
            return principal
        digest = hash_key(key)
        task = self._inflight.get(digest)
        if task is None:
            # A task of its own: a caller that goes away does not cancel the lookup the others wait for.
            task = asyncio.ensure_future(self._fetch(digest))
            self._inflight[digest] = task
            task.add_done_callback(lambda done: self._settled(digest, done))
        return await asyncio.shield(task)

    async def _fetch(self, digest: bytes) -> Principal | None:
        assert self._lookup is not None
        record = await self._lookup(digest)
        principal = None if record is None or record.revoked else Principal.of(record)
        self._remember(digest, principal)
        return principal

    def _settled(self, digest: bytes, task: asyncio.Task[Principal | None]) -> None:
        self._inflight.pop(digest, None)
        if not task.cancelled():
            # Retrieved, so a failure whose callers all went away is not logged as "never retrieved".
            task.exception()

    def forget(self) -> None:
        """Drop every cached answer (static keys stay)."""
        self._cache.clear()

    def _remember(self, digest: bytes, principal: Principal | None) -> None:
        ttl = self.cache_seconds if principal is not None else self.negative_cache_seconds
        if ttl <= 0:
            return
        self._cache[digest] = (self._clock() + ttl, principal)
        self._cache.move_to_end(digest)
        while len(self._cache) > self._max_entries:
            self._cache.popitem(last=False)


# --- store_svc: the wire form of a key, and the lookup over a guarded client ---------------------------------


_KIND_NUMBERS: dict[str, store_pb2.ApiKeyKind] = {
    USER: store_pb2.API_KEY_KIND_USER,
    SERVICE: store_pb2.API_KEY_KIND_SERVICE,
    ADMIN: store_pb2.API_KEY_KIND_ADMIN,
}
_KIND_NAMES: dict[int, str] = {number: kind for kind, number in _KIND_NUMBERS.items()}


class UnknownKeyKind(InvalidArgument, ValueError):
    """An `ApiKeyKind` number that names no kind (UNSPECIFIED, or one newer than this code)."""


def kind_to_pb(kind: str) -> store_pb2.ApiKeyKind:
    """The `store_pb2.ApiKeyKind` of USER, SERVICE or ADMIN; KeyError for anything else."""
    return _KIND_NUMBERS[kind]


def kind_from_pb(number: int) -> str:
    """The kind of a `store_pb2.ApiKeyKind`; `UnknownKeyKind` (a ValueError, and INVALID_ARGUMENT when a
    servicer lets it through) for UNSPECIFIED or an unknown number."""
    try:
        return _KIND_NAMES[number]
    except KeyError:
        raise UnknownKeyKind(f"unknown API key kind {number}") from None


def record_to_pb(record: ApiKeyRecord) -> store_pb2.ApiKey:
    """An `ApiKeyRecord` as a `store_pb2.ApiKey`."""
    pb = store_pb2.ApiKey(
        key_id=record.key_id,
        prefix=record.prefix,
        kind=kind_to_pb(record.kind),
        user_id=record.user_id,
        name=record.name,
        requests_per_minute=record.requests_per_minute,
        tokens_per_minute=record.tokens_per_minute,
        route_limits=[store_pb2.RouteLimit(route=route, limit=spec) for route, spec in record.route_limits],
    )
    if record.created_at is not None:
        pb.create_time.FromDatetime(record.created_at)
    if record.revoked_at is not None:
        pb.revoke_time.FromDatetime(record.revoked_at)
    return pb


def record_from_pb(pb: store_pb2.ApiKey) -> ApiKeyRecord:
    """A `store_pb2.ApiKey` as an `ApiKeyRecord`."""
    return ApiKeyRecord(
        key_id=pb.key_id,
        prefix=pb.prefix,
        kind=kind_from_pb(pb.kind),
        user_id=pb.user_id,
        name=pb.name,
        requests_per_minute=pb.requests_per_minute,
        tokens_per_minute=pb.tokens_per_minute,
        created_at=pb.create_time.ToDatetime(tzinfo=UTC) if pb.HasField("create_time") else None,
        revoked_at=pb.revoke_time.ToDatetime(tzinfo=UTC) if pb.HasField("revoke_time") else None,
        route_limits=tuple((r.route, r.limit) for r in pb.route_limits),
    )


def store_lookup(
    store: GuardedClient[StoreServiceAsyncStub], timeout: float = LOOKUP_TIMEOUT_SECONDS
) -> Lookup:
    """A `Lookup` through a guarded client of store_svc (`GetApiKey`)."""

    async def lookup(key_hash: bytes) -> ApiKeyRecord | None:
        try:
            reply: store_pb2.GetApiKeyResponse = await store.call(
                store.stub.GetApiKey, store_pb2.GetApiKeyRequest(key_hash=key_hash), timeout=timeout
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise KeyLookupUnavailable(f"store_svc: {exc.code().name}") from exc
        except CircuitOpenError as exc:
            raise KeyLookupUnavailable(f"store_svc circuit open; retry after {exc.retry_after:.1f}s") from exc
        return record_from_pb(reply.api_key)

    return lookup


Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]


class KeyCheckingInterceptor(grpc.aio.ServerInterceptor):
    """A server interceptor that checks callers by the key in their `x-api-key` metadata with a `KeyResolver`;
    `guard` says which methods it checks and what their key must be."""

    def __init__(self, resolver: KeyResolver) -> None:
        self.resolver = resolver

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        key = dict(handler_call_details.invocation_metadata or ()).get(API_KEY_METADATA, "")
        # A key is text; binary metadata is no key at all.
        return await self.guard(key if isinstance(key, str) else "", continuation, handler_call_details)

    async def guard(
        self, key: str, continuation: Continuation, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        """The handler of the call (`continuation(details)`), guarded by `key` ("" when the call sent none)."""
        raise NotImplementedError
