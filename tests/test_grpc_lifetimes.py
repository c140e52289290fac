"""gRPC connection lifetimes: servers of the bootstrap (`chatterbot.grpc_server.serving`) end connections after
CHATTERBOT_GRPC_MAX_CONNECTION_AGE_SECONDS, so a GuardedClient's long-lived channel reaches replicas that
start after it, whether they share the port (SO_REUSEPORT, as combined processes do) or appear behind the
name it dials (a headless Service's DNS name, here a DNS server of the test's own on loopback, with
replicas on 127.0.0.1 and 127.0.0.2); a stream outlives the age of its connection; and the clients'
keepalive pings reach the server and are accepted, where a stock gRPC server answers them with GOAWAY
too_many_pings (seen on the wire by a relay that reads the HTTP/2 frames).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import cast

import grpc
import pytest

from chatterbot.grpc_server import GrpcApp, serving
from chatterbot.guarded_client import GuardedClient
from chatterbot.settings import Settings
from chatterbot.v1 import chat_pb2, chat_pb2_grpc
from ops.embedded import free_port

AGE = 1.0  # seconds: connections end this often
CHAT_SERVICE = chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name


def lifetime_settings(**overrides: object) -> Settings:
    values: dict[str, object] = {
        "grpc_max_connection_age_seconds": AGE,
        "shutdown_grace_seconds": 1.0,
        "breaker_reset_seconds": 0.5,
        "deadline_seconds": 3.0,
        "stream_deadline_seconds": 10.0,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


class Replica(chat_pb2_grpc.ChatServiceServicer):
    """A ChatService that says which replica answered, and streams slowly."""

    def __init__(self, name: str) -> None:
        self.name = name

    async def GetStatus(
        self, request: chat_pb2.GetStatusRequest, context: object
    ) -> chat_pb2.GetStatusResponse:
        return chat_pb2.GetStatusResponse(reason=self.name)

    async def StreamChat(
        self, request: chat_pb2.StreamChatRequest, context: object
    ) -> AsyncIterator[chat_pb2.StreamChatResponse]:
        for i in range(request.turn.max_tokens):
            await asyncio.sleep(0.1)
            yield chat_pb2.StreamChatResponse(text=f"{self.name}{i} ")


@contextlib.asynccontextmanager
async def replica(name: str, port: int, host: str = "127.0.0.1", **overrides: object) -> AsyncIterator[None]:
    """A server of the bootstrap on host:port, with the lifetime settings."""
    app = GrpcApp(
        name=f"replica-{name}",
        servicers=[(chat_pb2_grpc.add_ChatServiceServicer_to_server, Replica(name))],
        service_names=[CHAT_SERVICE],
    )
    async with serving(lifetime_settings(bind_host=host, **overrides), app, port=port):
        yield


def chat_client(address: str, **overrides: object) -> GuardedClient[chat_pb2_grpc.ChatServiceAsyncStub]:
    return GuardedClient(
        "chat",
        address,
        chat_pb2_grpc.ChatServiceStub,
        lifetime_settings(**overrides),  # type: ignore[arg-type]
    )


async def answered_by(client: GuardedClient[chat_pb2_grpc.ChatServiceAsyncStub]) -> str:
    response = await client.call(client.stub.GetStatus, chat_pb2.GetStatusRequest())
    return response.reason


async def answers_until(
    client: GuardedClient[chat_pb2_grpc.ChatServiceAsyncStub], name: str, within: float
) -> tuple[float, Counter[str]]:
    """Call every 20 ms until `name` answers: how long that took, and who answered meanwhile."""
    started, seen = time.monotonic(), Counter[str]()
    while time.monotonic() - started < within:
        seen[await answered_by(client)] += 1
        if seen[name]:
            return time.monotonic() - started, seen
        await asyncio.sleep(0.02)
    raise AssertionError(f"{name} answered no call within {within}s; answers: {dict(seen)}")


# ------------------------------------------------------------------------------------------ connection age


async def test_a_replica_sharing_the_port_gets_calls_within_a_few_connection_ages() -> None:
    port = free_port()
    async with replica("a", port):
        client = chat_client(f"127.0.0.1:{port}")
        try:
            assert {await answered_by(client) for _ in range(5)} == {"a"}
            # gRPC servers bind with SO_REUSEPORT: the kernel gives each new connection to one of the two.
            async with replica("b", port):
                # Each reconnection has an even chance of reaching b: 1 in 2**15 to fail by chance.
                _, seen = await answers_until(client, "b", within=15 * AGE)
                assert seen["a"] > 0  # the channel opened before b was still going to a
        finally:
            await client.close()


async def test_without_a_connection_age_a_channel_stays_on_its_replica() -> None:
    port = free_port()
    async with replica("a", port, grpc_max_connection_age_seconds=0):
        client = chat_client(f"127.0.0.1:{port}")
        try:
            await answered_by(client)
            async with replica("b", port, grpc_max_connection_age_seconds=0):
                answers = Counter[str]()
                deadline = time.monotonic() + 4 * AGE
                while time.monotonic() < deadline:
                    answers[await answered_by(client)] += 1
                    await asyncio.sleep(0.02)
                assert set(answers) == {"a"}, answers
        finally:
            await client.close()


class DnsServer(asyncio.DatagramProtocol):
    """Answers A queries for the names in `records` (TTL 0); no AAAA records; other names do not exist."""

    def __init__(self, records: dict[str, list[str]]) -> None:
        self.records = records
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        (query_id,) = struct.unpack("!H", data[:2])
        labels, i = [], 12
        while data[i]:
            labels.append(data[i + 1 : i + 1 + data[i]].decode())
            i += 1 + data[i]
        question_end = i + 5
        (query_type,) = struct.unpack("!H", data[i + 1 : i + 3])
        name = ".".join(labels).lower()
        addresses = self.records.get(name, []) if query_type == 1 else []
        flags = 0x8180 | (0 if name in self.records else 3)  # a response, recursion available; NXDOMAIN
        answer = b"".join(
            struct.pack("!HHHIH", 0xC00C, 1, 1, 0, 4) + socket.inet_aton(address) for address in addresses
        )
        header = struct.pack("!HHHHHH", query_id, flags, 1, len(addresses), 0, 0)
        assert self.transport is not None
        self.transport.sendto(header + data[12:question_end] + answer, addr)


async def test_a_replica_added_behind_the_name_gets_calls_within_a_few_connection_ages() -> None:
    """As a headless Service: the name resolves to every replica, and round_robin spreads calls over them."""
    records = {"chat.mesh.test": ["127.0.0.1"]}
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: DnsServer(records), local_addr=("127.0.0.1", 0)
    )
    dns_port = transport.get_extra_info("sockname")[1]
    port = free_port()
    try:
        async with replica("a", port, host="127.0.0.1"):
            client = chat_client(f"dns://127.0.0.1:{dns_port}/chat.mesh.test:{port}")
            try:
                assert {await answered_by(client) for _ in range(5)} == {"a"}
                async with replica("b", port, host="127.0.0.2"):
                    records["chat.mesh.test"].append("127.0.0.2")
                    # The first GOAWAY asks for the name again, which now lists b too.
                    await answers_until(client, "b", within=6 * AGE)
                    spread = Counter([await answered_by(client) for _ in range(40)])
                    assert spread["a"] >= 10 and spread["b"] >= 10, spread
            finally:
                await client.close()
    finally:
        transport.close()


async def test_a_stream_outlives_the_age_of_its_connection() -> None:
    """Calls open when the connection ends get the grace (the stream deadline) to finish."""
    port = free_port()
    async with replica("a", port):
        client = chat_client(f"127.0.0.1:{port}")
        try:
            request = chat_pb2.StreamChatRequest(turn=chat_pb2.ChatTurn(message="long", max_tokens=30))
            started = time.monotonic()
            texts = [m.text async for m in client.stream(client.stub.StreamChat, request)]
            assert time.monotonic() - started > 2.5 * AGE
            assert texts == [f"a{i} " for i in range(30)]
        finally:
            await client.close()


# ---------------------------------------------------------------------------------------------- keepalive

PING, GOAWAY = 0x6, 0x7
ACK = 0x1
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@dataclass
class Frames:
    """HTTP/2 frames seen by the relay: (seconds since start, direction, type, flags, payload)."""

    started: float = field(default_factory=time.monotonic)
    seen: list[tuple[float, str, int, int, bytes]] = field(default_factory=list)

    def pings_from_client(self) -> list[float]:
        return [t for t, d, kind, flags, _ in self.seen if d == "client" and kind == PING and not flags & ACK]

    def goaways(self) -> list[bytes]:
        """The debug data of each GOAWAY the server sent (`too_many_pings`, ...)."""
        return [payload[8:] for _, d, kind, _, payload in self.seen if d == "server" and kind == GOAWAY]


@contextlib.asynccontextmanager
async def h2_relay(target_port: int) -> AsyncIterator[tuple[int, Frames]]:
    """A loopback TCP relay to `target_port` that logs the cleartext HTTP/2 frames passing both ways."""
    frames = Frames()

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str) -> None:
        buffer, preface = b"", len(PREFACE) if direction == "client" else 0
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
                buffer += data
                if preface:
                    skipped = min(preface, len(buffer))
                    buffer, preface = buffer[skipped:], preface - skipped
                while len(buffer) >= 9 and len(buffer) >= 9 + (length := int.from_bytes(buffer[:3], "big")):
                    at = time.monotonic() - frames.started
                    frames.seen.append((at, direction, buffer[3], buffer[4], buffer[9 : 9 + length]))
                    buffer = buffer[9 + length :]
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def relay(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", target_port)
        await asyncio.gather(
            pump(client_reader, server_writer, "client"), pump(server_reader, client_writer, "server")
        )

    server = await asyncio.start_server(relay, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], frames
    finally:
        server.close()


async def idle_pings(server_port: int, idle: float) -> Frames:
    """The frames of a GuardedClient pinging every second, idle for `idle` seconds after one call."""
    async with h2_relay(server_port) as (relay_port, frames):
        client = chat_client(f"127.0.0.1:{relay_port}", grpc_keepalive_seconds=1)
        try:
            await answered_by(client)
            await asyncio.sleep(idle)
            # What passed while idle, not the goodbyes of closing.
            return Frames(frames.started, list(frames.seen))
        finally:
            await client.close()


async def test_keepalive_pings_reach_the_server_and_are_accepted() -> None:
    port = free_port()
    async with replica("a", port, grpc_keepalive_seconds=1, grpc_max_connection_age_seconds=0):
        frames = await idle_pings(port, idle=4.5)
    pings = frames.pings_from_client()
    # An idle channel is pinged too (keepalive_permit_without_calls), once a second.
    assert len(pings) >= 3, frames.seen
    assert frames.goaways() == [], frames.goaways()


async def test_a_stock_grpc_server_would_answer_those_pings_with_too_many_pings() -> None:
    """What the servers' keepalive policy prevents: the default one allows an idle ping every 2 hours."""
    server = grpc.aio.server()
    chat_pb2_grpc.add_ChatServiceServicer_to_server(Replica("stock"), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        frames = await idle_pings(port, idle=4.5)
    finally:
        await server.stop(0)
    assert b"too_many_pings" in frames.goaways(), frames.seen


@pytest.mark.parametrize("seconds", [1, 30])
def test_servers_accept_pings_more_often_than_clients_send_them(seconds: int) -> None:
    from chatterbot.grpc_server import server_options
    from chatterbot.guarded_client import channel_options

    settings = lifetime_settings(grpc_keepalive_seconds=seconds)
    client, server = dict(channel_options(settings)), dict(server_options(settings))
    assert client["grpc.keepalive_time_ms"] == seconds * 1000
    assert client["grpc.keepalive_permit_without_calls"] == server["grpc.keepalive_permit_without_calls"] == 1
    assert server["grpc.http2.min_ping_interval_without_data_ms"] * 3 <= client["grpc.keepalive_time_ms"]
    assert client["grpc.lb_policy_name"] == "round_robin"
