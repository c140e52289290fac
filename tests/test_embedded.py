"""The embedded servers are real: real clients talk to them, and they survive SIGKILL with their data."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import asyncpg
import nats
import psutil
import pytest
import redis.asyncio as aioredis

from ops.embedded import (
    EmbeddedServer,
    EmbeddedServerError,
    NatsServer,
    PostgresServer,
    ValkeyServer,
    free_port,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVER_CLASSES = [NatsServer, PostgresServer, ValkeyServer]


@pytest.fixture
def postgres(tmp_path):
    with PostgresServer(tmp_path / "postgres") as server:
        yield server


@pytest.fixture
def nats_server(tmp_path):
    with NatsServer(tmp_path / "nats") as server:
        yield server


@pytest.fixture
def valkey(tmp_path):
    with ValkeyServer(tmp_path / "valkey") as server:
        yield server


def _gone(proc: psutil.Process) -> bool:
    # Orphans are reparented to PID 1, which may leave them as zombies: a zombie runs nothing.
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_gone(proc: psutil.Process, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not _gone(proc):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _kill_and_start(server: EmbeddedServer) -> None:
    port, pid = server.port, server.pid
    process = psutil.Process(pid)
    family = [process, *process.children(recursive=True)]

    server.kill()

    assert not server.is_running
    assert [p for p in family if not _gone(p)] == []  # kill() returns only once all of them are gone
    server.start()
    assert server.port == port
    assert server.pid != pid


# --- common behaviour ---


def test_free_port_can_be_bound():
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_start_is_idempotent(valkey):
    pid = valkey.pid
    valkey.start()
    assert valkey.pid == pid


def test_start_failure_reports_the_server_log(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = ValkeyServer(tmp_path / "valkey", port=taken.getsockname()[1])
        with pytest.raises(EmbeddedServerError, match=r"(?s)exited.*Address already in use"):
            server.start(timeout=10)
    assert not server.is_running
    assert server.pid is None


@pytest.mark.parametrize("server_class", SERVER_CLASSES)
def test_stop_leaves_no_process_behind(tmp_path, server_class):
    server = server_class(tmp_path / "server")
    server.start()
    process = psutil.Process(server.pid)
    family = [process, *process.children(recursive=True)]

    server.stop()

    assert not server.is_running
    assert server.pid is None
    assert [p for p in family if not _gone(p)] == []


@pytest.mark.parametrize("server_class", SERVER_CLASSES)
def test_server_dies_when_its_parent_is_sigkilled(tmp_path, server_class):
    parent_code = (
        "import sys, time\n"
        "from ops import embedded\n"
        "server = getattr(embedded, sys.argv[1])(sys.argv[2])\n"
        "server.start()\n"
        "print(server.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_code, server_class.__name__, str(tmp_path / "server")],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        server = psutil.Process(int(parent.stdout.readline()))
        family = [server, *server.children(recursive=True)]
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)

        assert all(_wait_gone(p, timeout=10) for p in family)
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()


# --- PostgreSQL ---


async def test_postgres_answers_asyncpg_on_its_url(postgres):
    conn = await asyncpg.connect(postgres.url)
    try:
        assert await conn.fetchval("SELECT current_database()") == "chatterbot"
        assert await conn.fetchval("SHOW fsync") == "on"
    finally:
        await conn.close()


async def test_postgres_keeps_a_committed_row_across_sigkill(postgres):
    conn = await asyncpg.connect(postgres.url)
    await conn.execute("CREATE TABLE turns (id int PRIMARY KEY, text text NOT NULL)")
    await conn.execute("INSERT INTO turns VALUES (1, 'hello')")
    await conn.close()

    _kill_and_start(postgres)

    conn = await asyncpg.connect(postgres.url)
    try:
        assert await conn.fetchval("SELECT text FROM turns WHERE id = 1") == "hello"
    finally:
        await conn.close()


async def test_postgres_ensure_database_is_idempotent(postgres):
    postgres.ensure_database("shard_1")
    postgres.ensure_database("shard_1")
    odd_name = 'it\'s "odd"'
    postgres.ensure_database(odd_name)

    conn = await asyncpg.connect(postgres.dsn("shard_1"))
    try:
        assert await conn.fetchval("SELECT current_database()") == "shard_1"
    finally:
        await conn.close()
    found = postgres.psql("SELECT datname FROM pg_database WHERE datname = :'db'", variables={"db": odd_name})
    assert found.strip() == odd_name


# --- NATS ---


async def test_nats_answers_a_jetstream_client(nats_server):
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await js.add_stream(name="TURNS", subjects=["turns.>"])
        ack = await js.publish("turns.new", b"hello")
        assert ack.stream == "TURNS"
    finally:
        await nc.close()


def test_nats_fsyncs_every_jetstream_write(nats_server):
    with urllib.request.urlopen(f"{nats_server.monitor_url}/varz", timeout=5) as response:
        varz = json.load(response)
    assert varz["jetstream"]["config"]["sync_always"] is True


async def test_nats_keeps_an_acked_message_across_sigkill(nats_server):
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await js.add_stream(name="TURNS", subjects=["turns.>"])
    ack = await js.publish("turns.new", b"hello")
    await nc.close()

    _kill_and_start(nats_server)

    nc = await nats.connect(nats_server.url)
    try:
        msg = await nc.jetstream().get_msg("TURNS", ack.seq)
        assert msg.data == b"hello"
    finally:
        await nc.close()


# --- Valkey ---


async def test_valkey_answers_redis_client_as_an_lru_cache(valkey):
    client = aioredis.from_url(valkey.url, decode_responses=True)
    try:
        assert await client.ping()
        assert await client.config_get("maxmemory-policy") == {"maxmemory-policy": "allkeys-lru"}
        assert await client.config_get("appendonly") == {"appendonly": "yes"}
    finally:
        await client.aclose()


async def test_valkey_keeps_an_fsynced_key_across_sigkill(valkey):
    client = aioredis.from_url(valkey.url, decode_responses=True)
    await client.set("context:1", "hello")
    # WAITAOF returns once the write is fsynced to the local append-only file.
    assert await client.execute_command("WAITAOF", 1, 0, 5000) == [1, 0]
    await client.aclose()

    _kill_and_start(valkey)

    client = aioredis.from_url(valkey.url, decode_responses=True)
    try:
        assert await client.get("context:1") == "hello"
    finally:
        await client.aclose()
