"""Session-scoped real servers (NATS, PostgreSQL, Valkey) and a whole mesh of service processes on them."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import psycopg
import pytest
import redis

from chatterbot.embedded import NatsServer, PostgresServer, ValkeyServer
from chatterbot.launcher import DATABASE, Mesh
from chatterbot.settings import Settings

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


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    """Real servers on free ports with their own data dirs; tests may kill and restart them."""
    root = tmp_path_factory.mktemp("servers")
    s = Servers(NatsServer(root / "nats"), PostgresServer(root / "postgres"), ValkeyServer(root / "valkey"))
    try:
        for server in (s.nats, s.postgres, s.valkey):
            server.start(timeout=60)
        s.postgres.ensure_database(DATABASE)
        yield s
    finally:
        for server in (s.valkey, s.postgres, s.nats):
            server.stop()


def mesh_settings(servers: Servers, **overrides) -> Settings:
    """Settings of a test mesh: fast simulated engine, a quickly resetting breaker."""
    values = {
        "nats_url": servers.nats.url,
        "redis_url": servers.valkey.url,
        "postgres_dsn": servers.postgres_dsn,
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


@pytest.fixture(scope="session")
def mesh(servers: Servers, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """All five services as separate processes, on the session's servers."""
    m = Mesh(mesh_settings(servers), tmp_path_factory.mktemp("mesh"), prefer_configured_ports=False)
    m.start()
    try:
        yield m
    finally:
        m.stop()


@pytest.fixture
def edge(mesh: Mesh) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=mesh.edge_url, headers={"X-API-Key": API_KEY}, timeout=30) as client:
        yield client


@pytest.fixture
def pg(servers: Servers) -> Iterator[psycopg.Connection]:
    with psycopg.connect(servers.postgres_dsn, autocommit=True) as conn:
        yield conn


@pytest.fixture
def valkey(servers: Servers) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(servers.valkey.url)
    try:
        yield client
    finally:
        client.close()


