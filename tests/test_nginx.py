"""Debian's nginx with `deploy/nginx.conf`, as shipped, in front of two edges of a real mesh: chats, streams
passed on token by token (no buffering), a queued stream resumed through it with `Last-Event-ID`, requests
spread over both edges, one edge gone and the other answering, and nginx's body limit equal to the edge's.

The configuration is the deployed file with only what a test must change: its upstream servers (the compose
service name `edge`) become the two edges' loopback ports, it listens on a free loopback port, and its pid and
temp paths go to the test's directory (`make nginx` installs nginx; `make test` depends on it).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ops.embedded import free_port
from ops.launcher import Mesh, ServiceProcess
from tests.clients import read_stream, tokens_after_last_restart, wait_done
from tests.meshes import API_KEY, Servers, own_mesh
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


def _configuration(source: str, edges: list[int], port: int, prefix: Path) -> str:
    """The shipped configuration, pointed at `edges` and listening on `port`, with its files under `prefix`."""
    upstream = re.search(r"^\s*server edge:(\d+);$", source, re.M)
    assert upstream, "the shipped upstream names the compose service `edge`"
    servers = "".join(f"        server 127.0.0.1:{edge};\n" for edge in edges)
    conf = source.replace(upstream.group(0) + "\n", servers)
    assert re.search(r"^\s*listen 80;$", conf, re.M)
    conf = re.sub(r"^(\s*)listen 80;$", rf"\1listen 127.0.0.1:{port};", conf, flags=re.M)
    temp_paths = "".join(
        f"    {kind}_temp_path {prefix}/{kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return conf.replace("http {\n", "http {\n" + temp_paths, 1)


@pytest.fixture(scope="module")
def nginx(
    paced: Mesh, second_edge: ServiceProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """nginx in front of both edges; its base URL."""
    prefix = tmp_path_factory.mktemp("nginx")
    (prefix / "logs").mkdir()
    port = free_port()
    edges = [paced.services["edge"].port, second_edge.port]
    (prefix / "nginx.conf").write_text(_configuration(NGINX_CONF.read_text(), edges, port, prefix))
    log = (prefix / "nginx.log").open("w")
    process = subprocess.Popen(
        [
            "nginx",
            "-p",
            str(prefix),
            "-c",
            str(prefix / "nginx.conf"),
            "-g",
            f"daemon off; pid {prefix}/nginx.pid;",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                if httpx.get(f"{url}/nginx-health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            raise AssertionError((prefix / "nginx.log").read_text())
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()


@pytest.fixture
def proxied(nginx: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=nginx, headers={"X-API-Key": API_KEY}, timeout=30) as client:
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


def test_a_stream_is_passed_on_token_by_token(proxied: httpx.Client) -> None:
    body = {
        "model": "chatterbot-sim-7b-awq",
        "messages": [{"role": "user", "content": "stream through nginx"}],
        "max_tokens": 40,
        "stream": True,
    }
    arrivals: list[float] = []
    with proxied.stream("POST", "/v1/chat/completions", json=body) as response:
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
