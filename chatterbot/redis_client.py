"""The one way a process gets its async Redis client: directly from `CHATTERBOT_REDIS_URL`, or the master that
Redis Sentinel names when `CHATTERBOT_REDIS_SENTINELS` is set.

With sentinels, the client asks them for the address of the master called `CHATTERBOT_REDIS_SENTINEL_MASTER`
(authenticating to them with `CHATTERBOT_REDIS_SENTINEL_PASSWORD`) each time it opens a connection, and
connects there with the username, password, database and TLS (`rediss://`) of `CHATTERBOT_REDIS_URL`; that
URL's host and port are ignored (`redis://:pw@ignored/0`). How it follows a failover:
- the old master died: its connections break; each is dropped and the command retried a few times, with a
  short backoff, on a new connection to whichever master the sentinels name now. Until they have promoted a
  replica those retries fail with `redis.exceptions.ConnectionError`, which every caller already treats as
  Redis being down (context answers UNAVAILABLE, rate limits fail open, the result cache misses);
- the old master lives on (a `SENTINEL FAILOVER`, or it came back): it still takes writes, and the sentinels
  only turn it into a replica some ten seconds after the switch, so a pool that kept its connections would
  write there, and lose those writes. While the client is used it asks the sentinels again every
  MASTER_CHECK_SECONDS, in the background, and drops a connection to anything but the current master before
  its next command;
- a connection that still answers READONLY (the old master was demoted under it) is dropped and the command
  retried, as for a broken one.

A client of a plain URL treats READONLY the same way: a server that was demoted behind a name that follows
the master (a Kubernetes Service, a cloud primary endpoint) is left for a new connection, never reported as a
command error.

Each caller asks for a client with its own timeout (250 ms for the edge's rate limits, 2 s for context), so a
process holds a few small pools, each created once at startup.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import redis.asyncio as redis
from redis.asyncio.connection import (
    Connection,
    ConnectionPool,
    SSLConnection,
    UnixDomainSocketConnection,
    parse_url,
)
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import EqualJitterBackoff, NoBackoff
from redis.exceptions import ConnectionError, ReadOnlyError, TimeoutError

from chatterbot.settings import Settings

__all__ = ["RETRIES", "SentinelMaster", "redis_client"]

# Tries after the first for a command whose connection broke: enough to step over a failover's reconnects,
# few enough that a caller's timeout, not Redis, decides how long a request waits.
RETRIES = 3
BACKOFF_BASE_SECONDS = 0.05
BACKOFF_CAP_SECONDS = 0.5
# How often a Sentinel-managed client in use asks the sentinels where the master is.
MASTER_CHECK_SECONDS = 1.0


class _DemotionAware:
    """READONLY from a server that was a master means it was demoted: drop the connection and report it as
    a broken connection, which is retried (and, through sentinels, re-discovers the master)."""

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)  # type: ignore[misc]
        except ReadOnlyError:
            await self.disconnect()  # type: ignore[attr-defined]
            raise ConnectionError("the Redis server was demoted to a replica (READONLY)") from None


class _Connection(_DemotionAware, Connection):
    pass


class _SSLConnection(_DemotionAware, SSLConnection):
    pass


class _UnixConnection(_DemotionAware, UnixDomainSocketConnection):
    pass


_DEMOTION_AWARE: dict[type, type] = {
    Connection: _Connection,
    SSLConnection: _SSLConnection,
    UnixDomainSocketConnection: _UnixConnection,
}


class _MasterPool(SentinelConnectionPool):
    """Connections to the master the sentinels name now, not only when each was opened."""

    _checked_at = 0.0
    _check: asyncio.Task[None] | None = None

    async def ensure_connection(self, connection: Any) -> None:
        now = time.monotonic()
        if now - self._checked_at >= MASTER_CHECK_SECONDS:
            self._checked_at = now
            self._check = asyncio.create_task(self._recheck())
        master = self.master_address
        if master is not None and connection.is_connected and (connection.host, connection.port) != master:
            # Connected to a former master: reconnect (asking the sentinels) before the next command.
            await connection.disconnect()
        await super().ensure_connection(connection)

    async def _recheck(self) -> None:
        # A new address also drops the idle connections (redis-py's get_master_address does that).
        with contextlib.suppress(ConnectionError, TimeoutError, OSError):
            await self.get_master_address()

    def stop_checking(self) -> None:
        if self._check is not None:
            self._check.cancel()


class SentinelMaster(redis.Redis):
    """The client of a Sentinel-managed master; closing it also closes its connections to the sentinels."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        pool = self.connection_pool
        if isinstance(pool, _MasterPool):
            pool.stop_checking()
        await super().aclose(close_connection_pool)
        if isinstance(pool, SentinelConnectionPool):
            for client in pool.sentinel_manager.sentinels:
                await client.aclose()


def _retry(retries: int) -> Retry:
    return Retry(EqualJitterBackoff(cap=BACKOFF_CAP_SECONDS, base=BACKOFF_BASE_SECONDS), retries)


def redis_client(settings: Settings, *, timeout: float, retries: int = RETRIES) -> redis.Redis:
    """A new client of the configured Redis (see the module docstring); `timeout` bounds each connect and
    each reply, `retries` the tries after a broken connection. ValueError when Redis is not configured."""
    if not settings.redis_configured():
        raise ValueError("Redis is not configured: set CHATTERBOT_REDIS_URL or CHATTERBOT_REDIS_SENTINELS")
    common: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": _retry(retries),
    }
    options: dict[str, Any] = dict(parse_url(settings.redis_url)) if settings.redis_url else {}
    connection_class = options.pop("connection_class", Connection)
    if not settings.redis_sentinels:
        pool = ConnectionPool(**options, **common, connection_class=_DEMOTION_AWARE[connection_class])
        return redis.Redis.from_pool(pool)
    # Sentinel mode: where the master is comes from the sentinels, everything else from the URL.
    options.pop("host", None)
    options.pop("port", None)
    if connection_class is SSLConnection:
        options["ssl"] = True
    sentinel_options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        # A sentinel that does not answer is skipped for the next one at once, not retried with backoff.
        "retry": Retry(NoBackoff(), 1),
    }
    if settings.redis_sentinel_password:
        sentinel_options["password"] = settings.redis_sentinel_password
    sentinel = Sentinel(settings.sentinel_addresses(), sentinel_kwargs=sentinel_options, **options, **common)
    # redis-py's SentinelManagedConnection already turns READONLY from the master into ConnectionError.
    return sentinel.master_for(
        settings.redis_sentinel_master, redis_class=SentinelMaster, connection_pool_class=_MasterPool
    )
