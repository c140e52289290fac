"""Session-scoped real servers (NATS, PostgreSQL, Valkey) and a whole mesh of service processes on them."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import redis

from ops.embedded import NatsServer, PostgresServer, ValkeyServer
from ops.launcher import DATABASE, SHARD_DATABASES, Mesh
from tests.meshes import API_KEY, Servers, ShardConnections, own_mesh


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    """Real servers on free ports with their own data dirs; tests may kill and restart them."""
    root = tmp_path_factory.mktemp("servers")
    s = Servers(NatsServer(root / "nats"), PostgresServer(root / "postgres"), ValkeyServer(root / "valkey"))
    try:
        for server in (s.nats, s.postgres, s.valkey):
            server.start(timeout=60)
        for name in (DATABASE, *SHARD_DATABASES):
            s.postgres.ensure_database(name)
        yield s
    finally:
        for server in (s.valkey, s.postgres, s.nats):
            server.stop()


@pytest.fixture(scope="session")
def mesh(servers: Servers, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """All five services as separate processes, on the session's servers."""
    with own_mesh(servers, tmp_path_factory, "mesh") as m:
        yield m


@pytest.fixture
def edge(mesh: Mesh) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=mesh.edge_url, headers={"X-API-Key": API_KEY}, timeout=30) as client:
        yield client


@pytest.fixture
def pg(servers: Servers) -> Iterator[ShardConnections]:
    shards = ShardConnections(servers)
    try:
        yield shards
    finally:
        shards.close()


@pytest.fixture
def valkey(servers: Servers) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(servers.valkey.url)
    try:
        yield client
    finally:
        client.close()
