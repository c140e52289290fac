"""Redis through Sentinel, on real servers: a Valkey primary, its replica and three sentinels (quorum 2), all from
the embedded binary. The settings are checked at start; the client follows the master through a demotion and
a crash; and the whole mesh keeps serving turns with context, and keeps enforcing rate limits, while its
primary is SIGKILLed under traffic."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pydantic
import pytest
import redis
import redis.exceptions

from chatterbot.redis_client import MASTER_CHECK_SECONDS, redis_client
from chatterbot.settings import Settings
from context_svc.turns import context_key, decode_turn
from ops.embedded import ValkeySentinel, ValkeyServer
from tests.meshes import API_KEY, own_mesh

MASTER = "chatterbot"
PASSWORD = "valkey-secret"
SENTINEL_PASSWORD = "sentinel-secret"
# Not 0: the database named by CHATTERBOT_REDIS_URL is the one used on whichever server is master.
DB = 3
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 3000
# Every failure the failover causes ends within this many seconds of the SIGKILL.
FAILOVER_BOUND_SECONDS = 15.0


@dataclass
class SentinelGroup:
    primary: ValkeyServer
    replica: ValkeyServer
    sentinels: list[ValkeySentinel]

    @property
    def addresses(self) -> list[str]:
        return [s.address for s in self.sentinels]

    def settings(self, **overrides) -> Settings:
        """Settings that reach this group's master through its sentinels; the URL's host is never dialled."""
        values = {
            "redis_url": f"redis://:{PASSWORD}@ignored/{DB}",
            "redis_sentinels": self.addresses,
            "redis_sentinel_password": SENTINEL_PASSWORD,
            **overrides,
        }
        return Settings(_env_file=None, **values)

    def ask(self, sentinel: ValkeySentinel, *command: str):
        with redis.Redis(port=sentinel.port, password=SENTINEL_PASSWORD, socket_timeout=2) as client:
            return client.execute_command(*command)

    def master_port(self) -> int:
        """The master's port as the first sentinel names it."""
        with redis.Redis(port=self.sentinels[0].port, password=SENTINEL_PASSWORD, socket_timeout=2) as client:
            _host, port = client.sentinel_get_master_addr_by_name(MASTER)
        return int(port)

    def wait_ready(self, timeout: float = 20) -> None:
        """Until every sentinel knows the replica (in sync) and the other sentinels: a failover can happen."""
        deadline = time.monotonic() + timeout
        while True:
            states = []
            for sentinel in self.sentinels:
                with redis.Redis(port=sentinel.port, password=SENTINEL_PASSWORD, socket_timeout=2) as client:
                    states.append(client.sentinel_master(MASTER))
            with server_client(self.replica) as replica:
                synced = replica.info("replication").get("master_link_status") == "up"
            if synced and all(
                s["num-slaves"] >= 1 and s["num-other-sentinels"] >= len(self.sentinels) - 1 for s in states
            ):
                return
            assert time.monotonic() < deadline, f"sentinels not ready: {states}"
            time.sleep(0.1)

    def named_master_ports(self) -> set[int]:
        """The master's port as each sentinel that answers names it."""
        named = set()
        for sentinel in self.sentinels:
            with contextlib.suppress(redis.exceptions.RedisError):
                named.add(int(self.ask(sentinel, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER)[1]))
        return named

    def wait_master(self, port: int, timeout: float = 20) -> None:
        """Until every sentinel names the server on `port` as the master."""
        deadline = time.monotonic() + timeout
        while True:
            named = self.named_master_ports()
            if named == {port}:
                return
            assert time.monotonic() < deadline, f"sentinels name {named}, not {port}"
            time.sleep(0.1)


@contextlib.contextmanager
def server_client(server: ValkeyServer, db: int = 0) -> Iterator[redis.Redis]:
    with redis.Redis(port=server.port, password=PASSWORD, db=db, socket_timeout=2) as client:
        yield client


def role_of(server: ValkeyServer) -> str:
    with server_client(server) as client:
        return client.info("replication")["role"]


@contextlib.contextmanager
def sentinel_group(root: Path) -> Iterator[SentinelGroup]:
    """A primary, its replica and three sentinels on free ports, stopped (or already killed) at the end."""
    primary = ValkeyServer(root / "primary", name="valkey-primary", password=PASSWORD)
    replica = ValkeyServer(root / "replica", name="valkey-replica", replica_of=primary, password=PASSWORD)
    sentinels = [
        ValkeySentinel(
            root / f"sentinel-{i}",
            primary,
            master_name=MASTER,
            quorum=2,
            down_after_ms=DOWN_AFTER_MS,
            failover_timeout_ms=FAILOVER_TIMEOUT_MS,
            name=f"sentinel-{i}",
            master_password=PASSWORD,
            password=SENTINEL_PASSWORD,
        )
        for i in range(3)
    ]
    group = SentinelGroup(primary, replica, sentinels)
    try:
        for server in (primary, replica, *sentinels):
            server.start()
        yield group
    finally:
        for server in (*reversed(sentinels), replica, primary):
            server.stop()


# --- settings --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"redis_sentinels": "10.0.0.5"}, "'10.0.0.5' is not host:port"),
        ({"redis_sentinels": "10.0.0.5:26379,sentinel-b:port"}, "'sentinel-b:port' is not host:port"),
        ({"redis_sentinels": "10.0.0.5:70000"}, "'10.0.0.5:70000' is not host:port"),
        ({"redis_sentinels": "10.0.0.5:26379", "redis_sentinel_master": "my master"}, "without spaces"),
        (
            {"redis_sentinels": "10.0.0.5:26379", "redis_url": "unix:///run/redis.sock"},
            "redis:// or rediss://",
        ),
        ({"redis_url": "http://:pw@cache:6379/0"}, "the scheme must be"),
        ({"redis_url": "redis://:pw@cache:6379/zero"}, "'zero' after the host) must be a number"),
    ],
)
def test_bad_redis_settings_are_refused_at_start_with_what_is_wrong(monkeypatch, values, message):
    for name, value in values.items():
        monkeypatch.setenv(f"CHATTERBOT_{name.upper()}", value)
    with pytest.raises(pydantic.ValidationError, match=re.escape(message)):
        Settings(_env_file=None)


def test_sentinels_are_read_as_comma_separated_addresses(monkeypatch):
    monkeypatch.setenv("CHATTERBOT_REDIS_SENTINELS", "10.0.0.5:26379, [::1]:26380,sentinel-c:26381")
    settings = Settings(_env_file=None)
    assert settings.sentinel_addresses() == [("10.0.0.5", 26379), ("::1", 26380), ("sentinel-c", 26381)]
    assert settings.redis_sentinel_master == "chatterbot" and settings.redis_configured()
    assert not Settings(_env_file=None, redis_sentinels=[]).redis_configured()


# --- the client ------------------------------------------------------------------------------------------


async def test_writes_follow_a_failover_to_the_promoted_replica_while_the_old_master_still_runs(tmp_path):
    with sentinel_group(tmp_path) as group:
        group.wait_ready()
        client = redis_client(group.settings(), timeout=1.0)
        script = client.register_script("return redis.call('incr', KEYS[1])")
        failures: list[Exception] = []

        async def write() -> None:
            # One after another, as context_svc's writes come: a transaction, then a script.
            try:
                async with client.pipeline(transaction=True) as pipe:
                    pipe.rpush("turns", "t").expire("turns", 60)
                    await pipe.execute()
                await script(keys=["counter"])
            except redis.exceptions.RedisError as exc:
                failures.append(exc)

        try:
            await client.set("before", "1")
            group.ask(group.sentinels[0], "SENTINEL", "FAILOVER", MASTER)
            deadline = time.monotonic() + 20
            while group.named_master_ports() != {group.replica.port}:
                assert time.monotonic() < deadline, "the failover did not finish"
                await write()
            # The old master is alive, and still a master for some seconds: the client has to notice the
            # switch itself, its connection there does not break.
            until = time.monotonic() + MASTER_CHECK_SECONDS + 0.5
            while time.monotonic() < until:
                await write()
                await asyncio.sleep(0.05)
            for i in range(20):
                await client.set(f"after-{i}", i)
        finally:
            await client.aclose()
        assert all(isinstance(f, redis.exceptions.ConnectionError) for f in failures), failures
        with server_client(group.replica, DB) as promoted:
            assert promoted.get("before") == b"1"
            assert promoted.mget([f"after-{i}" for i in range(20)]) == [str(i).encode() for i in range(20)]
        with server_client(group.primary, DB) as former:
            assert former.exists(*(f"after-{i}" for i in range(20))) == 0


@pytest.mark.parametrize("through", ["url", "sentinel"])
async def test_a_master_demoted_under_the_client_is_reported_unavailable_not_as_readonly(tmp_path, through):
    server = ValkeyServer(tmp_path / "server", name="valkey-server", password=PASSWORD)
    other = ValkeyServer(tmp_path / "other", name="valkey-other", password=PASSWORD)
    sentinel = ValkeySentinel(
        tmp_path / "sentinel",
        server,
        master_name=MASTER,
        master_password=PASSWORD,
        password=SENTINEL_PASSWORD,
    )
    with server, other, sentinel:
        if through == "url":
            settings = Settings(_env_file=None, redis_url=server.url)
        else:
            settings = Settings(
                _env_file=None,
                redis_url=f"redis://:{PASSWORD}@ignored/0",
                redis_sentinels=[sentinel.address],
                redis_sentinel_password=SENTINEL_PASSWORD,
            )
        client = redis_client(settings, timeout=1.0, retries=1)
        try:
            await client.set("k", "v")
            # Demoted behind the client's back (and the sentinel's, which still names it): it answers READONLY.
            with server_client(server) as admin:
                admin.replicaof(other.dial_host, other.port)
                deadline = time.monotonic() + 10
                while admin.info("replication").get("master_link_status") != "up":
                    assert time.monotonic() < deadline, "the demoted server did not sync"
                    time.sleep(0.05)
            # What callers treat as Redis down (context answers UNAVAILABLE, limits fail open), never a
            # command error that would become INTERNAL.
            with pytest.raises(redis.exceptions.ConnectionError) as refused:
                await client.set("k", "w")
            assert not isinstance(refused.value, redis.exceptions.ResponseError)
            with server_client(server) as admin:
                admin.replicaof("NO", "ONE")
            assert await client.set("k", "x")
        finally:
            await client.aclose()


# --- the mesh under traffic ------------------------------------------------------------------------------

LIMIT = 5
LIMITED_BEFORE = "test-limited-before-failover"
LIMITED_AFTER = "test-limited-after-failover"


@dataclass
class Exchange:
    """One two-turn conversation: the statuses of its turns and whether the second saw the first."""

    started: float
    finished: float = 0.0
    statuses: list[int] = field(default_factory=list)
    sees_first_turn: bool | None = None
    user_id: str = ""
    conversation_id: str = ""

    @property
    def ok(self) -> bool:
        return self.statuses == [200, 200] and bool(self.sees_first_turn)


@dataclass
class Limited:
    at: float
    status: int
    counted: bool  # carried RateLimit-* headers: the limit was checked, not skipped (failing open)


@dataclass
class Traffic:
    exchanges: list[Exchange] = field(default_factory=list)
    limited: list[Limited] = field(default_factory=list)
    running: bool = True


async def converse(edge: httpx.AsyncClient, traffic: Traffic) -> None:
    while traffic.running:
        user = f"user-{uuid.uuid4().hex[:10]}"
        exchange = Exchange(time.monotonic(), user_id=user)
        traffic.exchanges.append(exchange)
        first = await edge.post(
            "/chat", json={"message": "My name is Ada.", "user_id": user, "max_tokens": 10}
        )
        exchange.statuses.append(first.status_code)
        if first.status_code == 200:
            exchange.conversation_id = first.json()["conversation_id"]
            second = await edge.post(
                "/chat",
                json={
                    "message": "What is my name?",
                    "user_id": user,
                    "conversation_id": exchange.conversation_id,
                    "max_tokens": 10,
                },
            )
            exchange.statuses.append(second.status_code)
            # The simulator names what it was given: system prompt, first question and answer, this one.
            exchange.sees_first_turn = second.status_code == 200 and "4 messages" in second.json()["response"]
        exchange.finished = time.monotonic()


async def hit_limited_key(edge: httpx.AsyncClient, traffic: Traffic) -> None:
    while traffic.running:
        await hit_limited_key_once(edge, traffic)
        await asyncio.sleep(0.05)


async def hit_limited_key_once(edge: httpx.AsyncClient, traffic: Traffic) -> None:
    r = await edge.get("/whoami", headers={"X-API-Key": LIMITED_BEFORE})
    traffic.limited.append(Limited(time.monotonic(), r.status_code, "RateLimit-Limit" in r.headers))


@pytest.fixture
def group(tmp_path) -> Iterator[SentinelGroup]:
    with sentinel_group(tmp_path / "redis") as g:
        yield g


@pytest.fixture
def sentinel_mesh(servers, tmp_path_factory, group):
    with own_mesh(
        servers,
        tmp_path_factory,
        "sentinel-mesh",
        redis_url=f"redis://:{PASSWORD}@ignored/{DB}",
        redis_sentinels=group.addresses,
        redis_sentinel_password=SENTINEL_PASSWORD,
        api_keys=[API_KEY, LIMITED_BEFORE, LIMITED_AFTER],
        rate_limit_static_keys=True,
        rate_limits=f"/whoami={LIMIT}/minute",
        # A context lock taken on the primary that died frees itself after this long on the new master.
        context_lock_timeout_seconds=3,
    ) as m:
        yield m


async def test_turns_context_and_rate_limits_go_on_when_the_redis_primary_is_killed_under_traffic(
    sentinel_mesh, group
):
    group.wait_ready()
    traffic = Traffic()
    async with httpx.AsyncClient(
        base_url=sentinel_mesh.edge_url, headers={"X-API-Key": API_KEY}, timeout=30
    ) as edge:
        await _wait_healthy(edge)

        workers = [asyncio.create_task(converse(edge, traffic)) for _ in range(3)]
        workers.append(asyncio.create_task(hit_limited_key(edge, traffic)))
        try:
            deadline = time.monotonic() + 20
            while sum(e.ok for e in traffic.exchanges) < 6 or not any(
                x.status == 429 for x in traffic.limited
            ):
                assert time.monotonic() < deadline, (
                    _summary(traffic, time.monotonic()),
                    [(x.status, x.counted) for x in traffic.limited],
                )
                await asyncio.sleep(0.1)
            killed_at = time.monotonic()
            group.primary.kill()
            await asyncio.to_thread(group.wait_master, group.replica.port)
            promoted_at = time.monotonic()
            # Traffic goes on until conversations begun after the promotion have succeeded in a row.
            deadline = killed_at + FAILOVER_BOUND_SECONDS
            while not _succeeded_in_a_row(traffic, after=promoted_at, count=6):
                assert time.monotonic() < deadline, _summary(traffic, killed_at)
                await asyncio.sleep(0.1)
        finally:
            traffic.running = False
            await asyncio.gather(*workers)
        # The limited key until the edge counts it again (after a Redis failure it skips limits for a second).
        deadline = time.monotonic() + 10
        while not (traffic.limited[-1].status == 429 and traffic.limited[-1].at > promoted_at):
            assert time.monotonic() < deadline, [
                (round(x.at - killed_at, 2), x.status) for x in traffic.limited
            ]
            await hit_limited_key_once(edge, traffic)
            await asyncio.sleep(0.05)

        done = [e for e in traffic.exchanges if e.finished]
        before = [e for e in done if e.finished < killed_at]
        assert before and all(e.ok for e in before), _summary(traffic, killed_at)
        # Failures are visible (503, or a second turn answered without the first), never a 500, and end
        # within the bound; turns begun after them all succeed.
        assert {s for e in done for s in e.statuses} <= {200, 503}, _summary(traffic, killed_at)
        failed = [e for e in done if not e.ok]
        assert all(e.finished - killed_at < FAILOVER_BOUND_SECONDS for e in failed), _summary(
            traffic, killed_at
        )
        last_failure = max((e.finished for e in failed), default=killed_at)
        assert all(e.ok for e in done if e.started > last_failure)
        unavailable = sum(503 in e.statuses for e in failed)
        print(
            f"Redis failover: new master named {promoted_at - killed_at:.1f}s after the SIGKILL; "
            f"{len(failed)} of {len(done)} conversations failed ({unavailable} with a 503, the rest answered "
            f"without context), the last {last_failure - killed_at:.1f}s after the SIGKILL"
        )

        # A conversation from before the failover goes on with its context (replicated, or rebuilt).
        old = before[0]
        third = await edge.post(
            "/chat",
            json={
                "message": "And again?",
                "user_id": old.user_id,
                "conversation_id": old.conversation_id,
                "max_tokens": 10,
            },
        )
        assert third.status_code == 200 and "6 messages" in third.json()["response"], third.text

        # Context written after the failover is on the new master (in the URL's database) and read back.
        late = next(e for e in done if e.started > promoted_at and e.ok)
        with server_client(group.replica, DB) as promoted:
            turns = [
                decode_turn(raw)
                for raw in promoted.lrange(context_key(late.user_id, late.conversation_id), 0, -1)
            ]
        assert [t["content"] for t in turns][::2] == ["My name is Ada.", "What is my name?"]

        # The limited key stayed limited: counted again, it is refused, with at most its limit admitted.
        limited = traffic.limited
        assert [x.status for x in limited if x.at < killed_at][: LIMIT + 1] == [200] * LIMIT + [429]
        after = [x for x in limited if x.at > killed_at]
        assert {x.status for x in limited} <= {200, 429, 503}
        assert sum(x.status == 200 and x.counted for x in after) <= LIMIT
        assert all(
            x.at - killed_at < FAILOVER_BOUND_SECONDS for x in after if x.status == 200 and not x.counted
        )
        assert after and after[-1].status == 429, [(round(x.at - killed_at, 2), x.status) for x in after]
        # A key first seen after the failover is counted on the new master from its first request.
        fresh = [await edge.get("/whoami", headers={"X-API-Key": LIMITED_AFTER}) for _ in range(LIMIT + 1)]
        assert [r.status_code for r in fresh] == [200] * LIMIT + [429]
        assert [r.headers["RateLimit-Remaining"] for r in fresh[:LIMIT]] == [
            str(n) for n in range(LIMIT - 1, -1, -1)
        ]

        # The edge's Redis check and context_svc's probe (each through its own Sentinel-managed client).
        await _wait_healthy(edge)
    assert role_of(group.replica) == "master"


async def _wait_healthy(edge: httpx.AsyncClient, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while True:
        health = (await edge.get("/health")).json()["components"]
        if health["redis"] == health["context"] == "up":
            return
        assert time.monotonic() < deadline, health
        await asyncio.sleep(0.2)


def _succeeded_in_a_row(traffic: Traffic, *, after: float, count: int) -> bool:
    recent = [e for e in traffic.exchanges if e.started > after and e.finished]
    return len(recent) >= count and all(e.ok for e in recent[-count:])


def _summary(traffic: Traffic, killed_at: float) -> str:
    return str(
        [
            (round(e.started - killed_at, 2), round(e.finished - killed_at, 2), e.statuses, e.sees_first_turn)
            for e in traffic.exchanges
            if not e.ok
        ]
    )
