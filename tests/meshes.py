"""Meshes and servers for tests: the test keys, a mesh's settings, a mesh of a module's own, shard access."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest

from chatterbot.settings import Settings
from ops.embedded import NatsServer, PostgresServer, ValkeyServer
from ops.launcher import DATABASE, SHARD_DATABASES, Mesh
from store_svc.sharding import shard_of

API_KEY = "test-service-key"
ADMIN_KEY = "test-admin-key"


@dataclass
class Servers:
    nats: NatsServer
    postgres: PostgresServer
    valkey: ValkeyServer

    @property
    def postgres_dsn(self) -> str:
        return self.postgres.dsn(DATABASE)

    @property
    def shard_dsns(self) -> list[str]:
        """The store's shards: two databases on the one server, as `chatterbot up` runs them."""
        return [self.postgres.dsn(name) for name in SHARD_DATABASES]

    def shard_dsn_for(self, user_id: str) -> str:
        """The DSN of the shard that holds `user_id`'s rows."""
        return self.shard_dsns[shard_of(user_id, len(self.shard_dsns))]


def mesh_settings(servers: Servers, **overrides) -> Settings:
    """Settings of a test mesh: fast simulated engine, a quickly resetting breaker."""
    values = {
        "nats_url": servers.nats.url,
        "redis_url": servers.valkey.url,
        "postgres_dsn": servers.postgres_dsn,
        "postgres_shards": servers.shard_dsns,
        "api_keys": [API_KEY],
        "admin_keys": [ADMIN_KEY],
        "sim_ttft_ms": 5,
        "sim_prefill_ms_per_token": 0,
        "sim_itl_ms": 1,
        "sim_itl_at_max_ms": 2,
        "breaker_fail_max": 3,
        "breaker_reset_seconds": 1.0,
        "log_level": "INFO",
        "shutdown_grace_seconds": 5,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


@contextlib.contextmanager
def own_mesh(
    servers: Servers,
    tmp_path_factory: pytest.TempPathFactory,
    name: str,
    *,
    own_nats: bool = False,
    **overrides,
) -> Iterator[Mesh]:
    """A mesh on the session's PostgreSQL and Valkey with settings of its own; with `own_nats`, on a NATS
    server of its own too, so its job streams and workers do not mix with other meshes'."""
    nats_server = NatsServer(tmp_path_factory.mktemp(f"{name}-nats")) if own_nats else None
    if nats_server is not None:
        nats_server.start()
        overrides["nats_url"] = nats_server.url
    m = Mesh(
        mesh_settings(servers, **overrides), tmp_path_factory.mktemp(name), prefer_configured_ports=False
    )
    if nats_server is not None:
        m.servers["nats"] = nats_server  # stopped with the mesh; tests may kill and restart it
    m.start()
    try:
        yield m
    finally:
        m.stop()


class ShardConnections:
    """Autocommit connections to every shard of the session's store."""

    def __init__(self, servers: Servers) -> None:
        self.servers = servers
        self.connections = [psycopg.connect(dsn, autocommit=True) for dsn in servers.shard_dsns]

    def user(self, user_id: str) -> psycopg.Connection:
        """The connection to the shard that holds `user_id`."""
        return self.connections[shard_of(user_id, len(self.connections))]

    def count(self, sql: str, params: tuple = ()) -> int:
        """A `SELECT count(*) ...` summed over every shard."""
        return sum(conn.execute(sql, params).fetchone()[0] for conn in self.connections)

    def close(self) -> None:
        for conn in self.connections:
            conn.close()
