"""Rate limits at the edge, counted in Redis (the `limits` library) so they hold across edge replicas.

Three kinds of limit, each keyed in Redis so that every edge replica shares the counts:
- per key and route: `CHATTERBOT_RATE_LIMITS` (`/chat=20/minute,...`; routes by their path template, e.g.
  `/check-response/{correlation_id}`), a moving window (exact: a request counts for exactly one window length).
  These are defaults, for keys with no limits of their own: a key's own limits replace them (its per-route
  limits, `chatterbot keys create --limit /stream-chat=600/minute`, or, with only `--rpm`/`--tpm`, none per
  route);
- per key, across every route: the key's requests per minute (`chatterbot keys create --rpm N`), also a
  moving window;
- per key, tokens per minute (`--tpm N`): a turn costs its `max_tokens`, charged when it is admitted. Counting
  the budget up front is what lets the limit hold before the GPU spends it, for streams and queued jobs alike;
  a turn that stops early is not refunded. A sliding-window counter (two counters, weighted), because a
  moving window would keep one Redis entry per token.

Over a limit: 429 with `Retry-After` and `RateLimit-Limit`/`-Remaining`/`-Reset` (the limit that was hit).
Admitted requests carry the RateLimit-* headers of the limit closest to running out, and
`X-RateLimit-*-Tokens` when the key has a token budget. Failed authentications are counted per client IP
(`CHATTERBOT_AUTH_FAILURES_PER_IP`); past the limit an unknown key is answered 429 without a store lookup.

Static keys (from settings) are exempt unless `CHATTERBOT_RATE_LIMIT_STATIC_KEYS` is true: they are the
development, test and load-test keys, and load tests must not trip over the seed's 20 requests a minute.

Redis down (or slow: 250 ms socket timeouts) does not take the edge down: limits fail open, counted in
`chatterbot_rate_limit_storage_errors_total` and logged, and Redis is left alone for a second before the next
try so that every request does not pay a timeout.

The counters live on the client `chatterbot.redis_client` makes, directly or through Sentinel: `limits` is
handed that client's pool rather than a URI of its own, so its counts are read from the master (its Sentinel
storage would read them from a possibly lagging replica) and follow the master through a failover. During a
failover's few seconds limits fail open as above; the counts the replica had received are still there after.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import redis.exceptions
from fastapi import Request
from limits import RateLimitItem, RateLimitItemPerMinute, parse, parse_many
from limits.aio.storage import RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter, RateLimiter, SlidingWindowCounterRateLimiter
from limits.errors import StorageError
from limits.util import WindowStats
from prometheus_client import Counter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatterbot.api_keys import Principal, RouteLimits, route_limit
from chatterbot.redis_client import redis_client
from chatterbot.settings import Settings
from edge.problems import ProblemError
from edge.protocol import Problem

log = logging.getLogger(__name__)

T = TypeVar("T")

RATE_LIMITED = Counter(
    "chatterbot_rate_limited_requests_total",
    "Requests answered 429, by route and by the limit that was hit (route, key_rpm, key_tpm, auth_failures)",
    ["route", "limit"],
)
STORAGE_ERRORS = Counter(
    "chatterbot_rate_limit_storage_errors_total",
    "Rate-limit checks skipped (failing open) because Redis could not be reached",
)

REDIS_TIMEOUT_SECONDS = 0.25
# After a Redis failure, limits are skipped for this long before Redis is tried again.
STORAGE_BACKOFF_SECONDS = 1.0
KEY_PREFIX = "chatterbot-limits"
# Where the headers of the limit closest to running out wait for the response (see RateLimitHeaders).
STATE_KEY = "rate_limit_headers"

_STORAGE_FAILURES = (StorageError, redis.exceptions.RedisError, OSError, TimeoutError)

RATE_LIMITED_RESPONSE = {
    "model": Problem,
    "description": "Over a rate limit (or too many failed authentications from this address)",
    "headers": {
        "Retry-After": {"description": "Seconds until a request may succeed", "schema": {"type": "integer"}},
        "RateLimit-Limit": {"description": "The limit that was hit", "schema": {"type": "integer"}},
        "RateLimit-Remaining": {"description": "What is left of it", "schema": {"type": "integer"}},
        "RateLimit-Reset": {"description": "Seconds until it frees up", "schema": {"type": "integer"}},
    },
}


def parse_route_limits(text: str) -> dict[str, list[RateLimitItem]]:
    """`/chat=20/minute;500/hour,/async-chat=20/minute` as {route: [limits]}; ValueError when malformed."""
    return _parsed_key_limits(
        tuple(route_limit(entry) for entry in filter(None, map(str.strip, text.split(","))))
    )


@dataclass(frozen=True, slots=True)
class Quota:
    """Where one limit stands after a request."""

    limit: int
    remaining: int
    reset_seconds: int

    def headers(self) -> dict[str, str]:
        return {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(self.reset_seconds),
        }


@dataclass(frozen=True, slots=True)
class _Check:
    item: RateLimitItem
    identifiers: tuple[str, ...]
    name: str  # route | key_rpm | key_tpm | auth_failures


class RateLimits:
    """The edge's limits over one Redis storage; every check fails open when Redis cannot be reached."""

    def __init__(self, settings: Settings) -> None:
        self.route_limits = parse_route_limits(settings.rate_limits)
        self.auth_failure_limit = (
            parse(settings.auth_failures_per_ip) if settings.auth_failures_per_ip else None
        )
        self.limit_static_keys = settings.rate_limit_static_keys
        self.storage: RedisStorage | None = None
        # One retry: a request waits for a reconnect, not for a failover (it fails open meanwhile).
        self._client = (
            redis_client(settings, timeout=REDIS_TIMEOUT_SECONDS, retries=1)
            if settings.redis_configured()
            else None
        )
        if self._client is not None:
            # `limits` documents connection_pool but types its options as scalars.
            pool: dict[str, Any] = {"connection_pool": self._client.connection_pool}
            self.storage = RedisStorage(
                "async+redis://",
                implementation="redispy",
                wrap_exceptions=True,
                key_prefix=KEY_PREFIX,
                **pool,
            )
            self.requests: RateLimiter = MovingWindowRateLimiter(self.storage)
            self.tokens: RateLimiter = SlidingWindowCounterRateLimiter(self.storage)
        else:
            log.warning(
                "neither CHATTERBOT_REDIS_URL nor CHATTERBOT_REDIS_SENTINELS is set: rate limits are off"
            )
        self._skip_until = 0.0

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    # --- requests and tokens per key ---

    async def admit(self, request: Request, caller: Principal) -> None:
        """Count one request of `caller` on this route; 429 when over a limit."""
        route = _route_of(request)
        checks = [
            _Check(item, ("route", route, caller.key_id), "route")
            for item in self.limits_of(caller).get(route, ())
        ]
        if caller.requests_per_minute:
            checks.append(
                _Check(RateLimitItemPerMinute(caller.requests_per_minute), ("key", caller.key_id), "key_rpm")
            )
        if not checks or not self._applies_to(caller):
            return
        outcome = await self._guarded(lambda: self._hit_all(self.requests, checks, 1))
        if outcome is None:
            return
        for check, (ok, quota) in zip(checks, outcome, strict=True):
            if not ok:
                self._reject(
                    request,
                    route,
                    check,
                    quota,
                    "too many requests with this key; retry after the Retry-After delay",
                )
        tightest = min((quota for _, quota in outcome), key=lambda q: (q.remaining, -q.reset_seconds))
        _headers_of(request).update(tightest.headers())

    def limits_of(self, caller: Principal) -> dict[str, list[RateLimitItem]]:
        """The route limits in force for `caller`: its own when it has any limit of its own, else the defaults."""
        if caller.has_own_limits:
            return _parsed_key_limits(caller.route_limits)
        return self.route_limits

    async def charge_tokens(self, request: Request, caller: Principal, tokens: int) -> None:
        """Take `tokens` from the caller's tokens-per-minute budget; 429 when it does not have them."""
        budget = caller.tokens_per_minute
        if not budget or tokens <= 0 or not self._applies_to(caller):
            return
        check = _Check(RateLimitItemPerMinute(budget), ("tokens", caller.key_id), "key_tpm")
        outcome = await self._guarded(lambda: self._hit_all(self.tokens, [check], tokens))
        if outcome is None:
            return
        ((ok, quota),) = outcome
        token_headers = {
            "X-RateLimit-Limit-Tokens": str(quota.limit),
            "X-RateLimit-Remaining-Tokens": str(quota.remaining),
            "X-RateLimit-Reset-Tokens": str(quota.reset_seconds),
        }
        if ok:
            _headers_of(request).update(token_headers)
            return
        detail = (
            f"max_tokens {tokens} is more than this key's budget of {budget} tokens a minute"
            if tokens > budget
            else f"this key's budget of {budget} tokens a minute is spent (a turn costs its max_tokens)"
        )
        self._reject(request, _route_of(request), check, quota, detail, token_headers)

    # --- failed authentication per client IP ---

    async def auth_blocked(self, request: Request) -> None:
        """429 when the client's address is past its failed-authentication limit (checked before lookups)."""
        item = self.auth_failure_limit
        if item is None or self.storage is None:
            return
        ip = _client_ip(request)
        ok = await self._guarded(lambda: self.requests.test(item, "auth-failures", ip))
        if ok is False:
            stats = await self._guarded(lambda: self.requests.get_window_stats(item, "auth-failures", ip))
            self._reject_auth(request, item, stats)

    async def auth_failed(self, request: Request) -> None:
        """Count a failed authentication from the client's address; 429 once past the limit."""
        item = self.auth_failure_limit
        if item is None or self.storage is None:
            return
        ip = _client_ip(request)
        ok = await self._guarded(lambda: self.requests.hit(item, "auth-failures", ip))
        if ok is False:
            stats = await self._guarded(lambda: self.requests.get_window_stats(item, "auth-failures", ip))
            self._reject_auth(request, item, stats)

    # --- internals ---

    def _applies_to(self, caller: Principal) -> bool:
        return self.storage is not None and (self.limit_static_keys or not caller.static)

    async def _hit_all(
        self, limiter: RateLimiter, checks: Sequence[_Check], cost: int
    ) -> list[tuple[bool, Quota]]:
        async def one(check: _Check) -> tuple[bool, Quota]:
            ok = await limiter.hit(check.item, *check.identifiers, cost=cost)
            stats = await limiter.get_window_stats(check.item, *check.identifiers)
            return ok, _quota(check.item, stats.reset_time, stats.remaining)

        return list(await asyncio.gather(*(one(check) for check in checks)))

    async def _guarded(self, call: Callable[[], Awaitable[T]]) -> T | None:
        """The call's result, or None when Redis failed (the check is skipped: fail open)."""
        if time.monotonic() < self._skip_until:
            STORAGE_ERRORS.inc()
            return None
        try:
            return await call()
        except _STORAGE_FAILURES as exc:
            STORAGE_ERRORS.inc()
            self._skip_until = time.monotonic() + STORAGE_BACKOFF_SECONDS
            log.warning(
                "rate limits skipped: Redis unavailable (%s); failing open for %.0fs",
                type(exc).__name__,
                STORAGE_BACKOFF_SECONDS,
            )
            return None

    def _reject(
        self,
        request: Request,
        route: str,
        check: _Check,
        quota: Quota,
        detail: str,
        extra: dict[str, str] | None = None,
    ) -> None:
        RATE_LIMITED.labels(route, check.name).inc()
        headers = {**quota.headers(), **(extra or {}), "Retry-After": str(max(1, quota.reset_seconds))}
        _headers_of(request).update(headers)
        raise ProblemError(429, detail, headers)

    def _reject_auth(self, request: Request, item: RateLimitItem, stats: WindowStats | None) -> None:
        quota = _quota(item, stats.reset_time, 0) if stats is not None else Quota(item.amount, 0, 60)
        RATE_LIMITED.labels(_route_of(request), "auth_failures").inc()
        raise ProblemError(
            429,
            "too many failed authentications from this address; retry later",
            {**quota.headers(), "Retry-After": str(max(1, quota.reset_seconds))},
        )


@functools.lru_cache(maxsize=4096)
def _parsed_key_limits(route_limits: RouteLimits) -> dict[str, list[RateLimitItem]]:
    # Keys are few and their limits change rarely: parse each distinct set once.
    routes: dict[str, list[RateLimitItem]] = {}
    for route, spec in route_limits:
        routes.setdefault(route, []).extend(parse_many(spec))
    return routes


def _quota(item: RateLimitItem, reset_time: float, remaining: int) -> Quota:
    return Quota(item.amount, max(0, remaining), max(0, math.ceil(reset_time - time.time())))


def _route_of(request: Request) -> str:
    route = request.scope.get("route")
    return getattr(route, "path", None) or request.url.path


def _client_ip(request: Request) -> str:
    # Behind a proxy, uvicorn puts the X-Forwarded-For address here when the proxy is trusted
    # (FORWARDED_ALLOW_IPS; 127.0.0.1 by default).
    return request.client.host if request.client else "unknown"


def _headers_of(request: Request) -> dict[str, str]:
    headers = getattr(request.state, STATE_KEY, None)
    if headers is None:
        headers = {}
        setattr(request.state, STATE_KEY, headers)
    return headers


class RateLimitHeaders:
    """ASGI middleware: puts the RateLimit-* headers a request earned on its response, whatever its type
    (JSON, SSE, problem), unless the response set them itself."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra = (scope.get("state") or {}).get(STATE_KEY)
                if extra:
                    present = {name.lower() for name, _ in message.get("headers", ())}
                    message["headers"] = [
                        *message.get("headers", ()),
                        *(
                            (name.lower().encode(), value.encode())
                            for name, value in extra.items()
                            if name.lower().encode() not in present
                        ),
                    ]
            await send(message)

        await self.app(scope, receive, send_with_headers)
