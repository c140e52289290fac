"""`chatterbot up`: the whole mesh on one machine, on real servers.

Embedded NATS (JetStream), PostgreSQL and Valkey start unless their URLs are set; then the services start in
one of two modes, awaited until healthy:
- `combined` (the default of `chatterbot up`): one process per core runs every component
  (`chatterbot serve all`), the processes sharing each component's port, and components calling each other in
  process. An engine that holds a model (vllm) stays in a process of its own: one copy of the model.
- `split`: every service is a process of its own (`chatterbot serve <name>`), as compose and Kubernetes run it.
Everything is stopped in reverse order on Ctrl-C or SIGTERM. Data, logs and the dev keys stay in the data dir.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chatterbot.settings import Settings
from ops.components import COMPONENTS
from ops.embedded import (
    EmbeddedServer,
    NatsServer,
    PostgresServer,
    ValkeyServer,
    free_port,
    port_is_free,
)

log = logging.getLogger(__name__)

DATABASE = "chatterbot"
# The embedded PostgreSQL holds two shard databases, so sharded routing is exercised on every machine.
SHARD_DATABASES = ("chatterbot_shard0", "chatterbot_shard1")
# Start order: dependencies first. The edge comes last so that a ready edge means a ready mesh.
START_ORDER = tuple(COMPONENTS)
MODES = ("combined", "split")
# Engines that hold nothing but connections (the simulator, an HTTP upstream) run in every combined process.
SHARED_NOTHING_ENGINES = frozenset({"sim", "openai"})


class ServiceProcess(EmbeddedServer):
    """One ChatterBot service run as `python -m ops serve <name>`; ready when its health says so.

    With `components`, a process serving several (`python -m ops serve edge,chat,...`), ready once it has
    written its ready file: its ports may be shared with other processes, so answering there proves nothing.
    """

    def __init__(
        self,
        name: str,
        log_dir: Path,
        port: int,
        env: dict[str, str],
        host: str = "127.0.0.1",
        components: tuple[str, ...] = (),
    ) -> None:
        super().__init__(name, log_dir, host=host, port=port)
        self.env = env
        self.components = components
        self.ready_file = log_dir / f"{name}.ready" if components else None

    def _command(self) -> list[str]:
        if self.ready_file is not None:
            return [
                *(sys.executable, "-m", "ops", "serve", ",".join(self.components)),
                *("--ready-file", str(self.ready_file)),
            ]
        return [sys.executable, "-m", "ops", "serve", self.name]

    def _prepare(self) -> None:
        if self.ready_file is not None:
            self.ready_file.unlink(missing_ok=True)

    def _popen_kwargs(self) -> dict[str, Any]:
        return {"env": self.env}

    @property
    def url(self) -> str:
        if self.name == "edge":
            return f"http://{self.dial_host}:{self.port}"
        return f"{self.dial_host}:{self.port}"

    def _is_ready(self) -> bool:
        if self.ready_file is not None:
            return self.ready_file.exists()
        if self.name == "edge":
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=1) as response:
                    # The body too: any HTTP server that took the port by mistake would also answer 200.
                    return response.status == 200 and json.loads(response.read()) == {"status": "ready"}
            except (OSError, ValueError):
                return False
        with grpc.insecure_channel(self.url) as channel:
            try:
                response = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=1
                )
            except grpc.RpcError:
                return False
        return response.status == health_pb2.HealthCheckResponse.SERVING


@dataclass
class Component:
    """A component of a combined mesh: where it answers, and the first of the processes that serve it."""

    name: str
    port: int
    process: ServiceProcess
    mesh: Mesh

    @property
    def url(self) -> str:
        host = self.process.dial_host
        return f"http://{host}:{self.port}" if self.name == "edge" else f"{host}:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return self.process.env

    @property
    def is_running(self) -> bool:
        """True while any process serving it runs."""
        return any(child.is_running for child in self.mesh.children.values() if self.name in child.components)


@dataclass
class DevKeys:
    api_key: str
    admin_key: str

    @classmethod
    def load_or_create(cls, path: Path) -> DevKeys:
        """Keys kept in the data dir, so clients keep working across restarts."""
        if path.exists():
            data = json.loads(path.read_text())
            return cls(data["api_key"], data["admin_key"])
        keys = cls("cb-dev-" + secrets.token_urlsafe(24), "cb-admin-" + secrets.token_urlsafe(24))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"api_key": keys.api_key, "admin_key": keys.admin_key}))
        path.chmod(0o600)
        return keys


@dataclass
class Mesh:
    """The servers and services of one machine's mesh."""

    settings: Settings
    data_dir: Path
    # Use the configured ports when free (`chatterbot up`) or always pick free ones (tests, several meshes).
    prefer_configured_ports: bool = True
    extra_env: dict[str, str] = field(default_factory=dict)
    # "split" (a process per service) or "combined" (`processes` processes each running the components).
    mode: str = "split"
    # Combined processes sharing the ports; 0: one per core.
    processes: int = 0
    servers: dict[str, EmbeddedServer] = field(default_factory=dict)
    # Where each component answers: its own process (split), or a view of the processes serving it.
    services: dict[str, ServiceProcess | Component] = field(default_factory=dict)
    # Every service process started, by name.
    children: dict[str, ServiceProcess] = field(default_factory=dict)
    keys: DevKeys | None = None

    def start(self) -> None:
        """Start everything; on failure stop what was started and re-raise."""
        self.data_dir = self.data_dir.resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            env = self._start_servers()
            self._start_services(env)
        except BaseException:
            self.stop()
            raise
        self._write_up_json()

    def _start_servers(self) -> dict[str, str]:
        s = self.settings
        urls = {"nats": s.nats_url, "redis": s.redis_url, "postgres": s.postgres_dsn}
        if not s.nats_url:
            self.servers["nats"] = NatsServer(self.data_dir / "nats")
        if not s.postgres_dsn and not s.postgres_shards:
            self.servers["postgres"] = PostgresServer(self.data_dir / "postgres")
        if not s.redis_url:
            self.servers["redis"] = ValkeyServer(self.data_dir / "valkey")
        for name, server in self.servers.items():
            log.info("starting %s", name)
            server.start(timeout=60)
            urls[name] = server.url
        if "postgres" in self.servers:
            pg = self.servers["postgres"]
            assert isinstance(pg, PostgresServer)
            pg.ensure_database(DATABASE)
            urls["postgres"] = pg.dsn(DATABASE)
            for name in SHARD_DATABASES:
                pg.ensure_database(name)
            urls["postgres_shards"] = ",".join(pg.dsn(name) for name in SHARD_DATABASES)
        return {
            "CHATTERBOT_NATS_URL": urls["nats"],
            "CHATTERBOT_REDIS_URL": urls["redis"],
            "CHATTERBOT_POSTGRES_DSN": urls["postgres"],
            "CHATTERBOT_POSTGRES_SHARDS": urls.get("postgres_shards", ",".join(s.postgres_shards)),
        }

    def _port(self, configured: int, taken: set[int]) -> int:
        """The configured port when free (and wanted), else a free one; never one handed out already."""
        port = (
            configured
            if configured and self.prefer_configured_ports and port_is_free(configured)
            else free_port()
        )
        while port in taken:
            port = free_port()
        taken.add(port)
        return port

    def _start_services(self, server_env: dict[str, str]) -> None:
        s = self.settings
        if s.api_keys and s.admin_keys:
            self.keys = DevKeys(s.api_keys[0], s.admin_keys[0])
            api_keys, admin_keys = s.api_keys, s.admin_keys
        else:
            self.keys = DevKeys.load_or_create(self.data_dir / "keys.json")
            api_keys, admin_keys = [self.keys.api_key, *s.api_keys], [self.keys.admin_key, *s.admin_keys]
        taken: set[int] = set()
        ports = {name: self._port(s.service_port(name), taken) for name in START_ORDER if name != "edge"}
        ports["edge"] = self._port(s.edge_port, taken)
        env = {
            **os.environ,
            **s.to_env(),
            **server_env,
            **{
                f"CHATTERBOT_{name.upper()}_ADDR": f"127.0.0.1:{port}"
                for name, port in ports.items()
                if name != "edge"
            },
            "CHATTERBOT_EDGE_PORT": str(ports["edge"]),
            "CHATTERBOT_API_KEYS": ",".join(api_keys),
            "CHATTERBOT_ADMIN_KEYS": ",".join(admin_keys),
            "CHATTERBOT_DATA_DIR": str(self.data_dir),
            **self.extra_env,
        }
        log_dir = self.data_dir / "logs"
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose from {', '.join(MODES)}")
        alone = (
            START_ORDER
            if self.mode == "split"
            else tuple(
                name
                for name in START_ORDER
                if name == "inference" and s.inference_engine not in SHARED_NOTHING_ENGINES
            )
        )
        for name in alone:
            service_env = {**env, "CHATTERBOT_METRICS_PORT": str(self._port(0, taken))}
            self._start_child(ServiceProcess(name, log_dir, ports[name], service_env))
            self.services[name] = self.children[name]
        together = tuple(name for name in START_ORDER if name not in alone)
        if not together:
            return
        count = self.processes or os.cpu_count() or 1
        for index in range(count):
            service_env = {**env, "CHATTERBOT_METRICS_PORT": str(self._port(0, taken))}
            process = ServiceProcess(
                f"mesh-{index}", log_dir, ports["edge"], service_env, components=together
            )
            # The first process migrates and creates what the others then find ready.
            self._start_child(process)
        first = self.children["mesh-0"]
        for name in together:
            self.services[name] = Component(name, ports[name], first, self)

    def _start_child(self, process: ServiceProcess) -> None:
        self.children[process.name] = process
        log.info("starting %s", process.name)
        process.start(timeout=60)

    def stop(self) -> None:
        """Stop services (edge first), then servers; each gets its graceful shutdown, then SIGKILL."""
        for child in reversed(list(self.children.values())):
            child.stop()
        for server in reversed(list(self.servers.values())):
            server.stop()

    @property
    def edge_url(self) -> str:
        return self.services["edge"].url

    def up_info(self) -> dict[str, Any]:
        """What `.chatterbot/up.json` holds."""
        assert self.keys is not None
        return {
            "edge_url": self.edge_url,
            "api_key": self.keys.api_key,
            "admin_key": self.keys.admin_key,
            "grpc": {name: svc.url for name, svc in self.services.items() if name not in ("edge", "worker")},
            "mode": self.mode,
            "metrics": {
                name: f"http://127.0.0.1:{child.env['CHATTERBOT_METRICS_PORT']}/metrics"
                for name, child in self.children.items()
            },
            "pids": {name: child.pid for name, child in self.children.items()},
            "servers": {
                "nats": self.services["chat"].env["CHATTERBOT_NATS_URL"],
                "redis": self.services["chat"].env["CHATTERBOT_REDIS_URL"],
                "postgres": self.services["chat"].env["CHATTERBOT_POSTGRES_DSN"],
            },
            "logs": str(self.data_dir / "logs"),
            "pid": os.getpid(),
        }

    def _write_up_json(self) -> None:
        path = self.data_dir / "up.json"
        path.write_text(json.dumps(self.up_info(), indent=2))
        path.chmod(0o600)
