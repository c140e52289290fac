"""`chatterbot up`: the whole mesh on one machine, on real servers.

Embedded NATS (JetStream), PostgreSQL and Valkey start unless their URLs are set; then the services start in
one of two modes, awaited until healthy:
- `combined` (the default of `chatterbot up`): one process per core but one (at least one) runs every
  component (`chatterbot serve all`), the processes sharing each component's port, and components calling each
  other in process. An engine that holds a model (vllm) stays in a process of its own: one copy of the model.
- `split`: every service is a process of its own (`chatterbot serve <name>`), as compose and Kubernetes run it.
Everything is stopped in reverse order on Ctrl-C or SIGTERM. Data, logs and the dev keys stay in the data dir.

Once up, a `Supervisor` keeps every process running (servers included): one that exits is restarted with
exponential backoff and jitter, up to a cap per window, after which it is reported and left stopped while
the rest keeps serving. It keeps `status.json` in the data dir up to date for `chatterbot status`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import secrets
import signal
import sys
import tempfile
import threading
import time
import urllib.request
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chatterbot.settings import Settings
from chatterbot.tls import channel_credentials, load_mesh_tls
from edge.cors import LOOPBACK_ORIGINS
from ops.components import COMPONENTS
from ops.embedded import (
    EMBEDDED_EXTRA,
    EmbeddedServer,
    EmbeddedServerError,
    NatsServer,
    PostgresServer,
    ServerNotInstalled,
    StartCancelled,
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
# The setting that points each server at a real one instead of an embedded one.
SERVER_SETTINGS = {
    "nats": "CHATTERBOT_NATS_URL",
    "postgres": "CHATTERBOT_POSTGRES_DSN (or CHATTERBOT_POSTGRES_SHARDS)",
    "redis": "CHATTERBOT_REDIS_URL",
}
# CHATTERBOT_GRPC_TLS_<part>, in the order load_mesh_tls takes them.
TLS_PARTS = ("CA", "CERT", "KEY")
# Engines that hold nothing but connections (the simulator, an HTTP upstream) run in every combined process.
SHARED_NOTHING_ENGINES = frozenset({"sim", "openai"})


def default_processes(cores: int | None = None) -> int:
    """Combined processes for a machine of `cores` (this one's by default): one per core but one, at least
    one.

    The core left over is for what shares the machine with the mesh: the servers `up` starts (PostgreSQL,
    NATS, Redis), a model server, a load generator. A mesh process that shares a core with a busy neighbour
    gets a fraction of it for seconds at a time (the scheduler balances the cores' load, not the processes'
    answers), and its streams take that much longer than its peers' (README, "The request path")."""
    cores = cores or os.cpu_count() or 1
    return max(1, cores - 1)


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
        start_timeout: float | None = None,
    ) -> None:
        """`start_timeout`: how long a start may take, when longer than its starter's default (an inference
        service on vLLM loads its model before it is ready)."""
        super().__init__(name, log_dir, host=host, port=port)
        self.env = env
        self.components = components
        self.start_timeout = start_timeout
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

    def _health_channel(self) -> grpc.Channel:
        """A channel to this service's health, with the mutual TLS its environment gives the mesh, if any."""
        mesh_tls = load_mesh_tls(*(self.env.get(f"CHATTERBOT_GRPC_TLS_{part}", "") for part in TLS_PARTS))
        if mesh_tls is None:
            return grpc.insecure_channel(self.url)
        return grpc.secure_channel(self.url, channel_credentials(mesh_tls))

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
        with self._health_channel() as channel:
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
    # Combined processes sharing the ports; 0: `default_processes()`.
    processes: int = 0
    servers: dict[str, EmbeddedServer] = field(default_factory=dict)
    # Where each component answers: its own process (split), or a view of the processes serving it.
    services: dict[str, ServiceProcess | Component] = field(default_factory=dict)
    # Every service process started, by name.
    children: dict[str, ServiceProcess] = field(default_factory=dict)
    keys: DevKeys | None = None

    def start(self, cancel: threading.Event | None = None) -> None:
        """Start everything; on failure stop what was started and re-raise.

        A first start that fails is not retried: a configuration error shows at once, with its log tail.
        Setting `cancel` (Ctrl-C while starting) gives up the start under way (`StartCancelled`).
        """
        self.data_dir = self.data_dir.resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            env = self._start_servers(cancel)
            self._start_services(env, cancel)
        except BaseException:
            self.stop()
            raise
        self.write_up_json()

    def _start_servers(self, cancel: threading.Event | None = None) -> dict[str, str]:
        s = self.settings
        urls = {"nats": s.nats_url, "redis": s.redis_url, "postgres": s.postgres_dsn}
        if not s.nats_url:
            self.servers["nats"] = NatsServer(self.data_dir / "nats")
        if not s.postgres_dsn and not s.postgres_shards:
            self.servers["postgres"] = PostgresServer(self.data_dir / "postgres")
        if not s.redis_url and not s.redis_sentinels:
            self.servers["redis"] = ValkeyServer(self.data_dir / "valkey")
        self._require_installed()
        for name, server in self.servers.items():
            log.info("starting %s", name)
            server.start(timeout=60, cancel=cancel)
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

    def _require_installed(self) -> None:
        """Raise `ServerNotInstalled` naming every embedded server that is missing, before any starts."""
        missing: list[str] = []
        for name, server in self.servers.items():
            try:
                server.require_installed()
            except ServerNotInstalled as exc:
                missing.append(f"{name}: {exc}")
        if missing:
            settings = ", ".join(SERVER_SETTINGS[name] for name in self.servers)
            raise ServerNotInstalled(
                f"cannot start the embedded servers ({'; '.join(missing)}). Install them with "
                f"pip install '{EMBEDDED_EXTRA}', or point {settings} at real servers"
            )

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

    def _start_services(self, server_env: dict[str, str], cancel: threading.Event | None = None) -> None:
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
            # A front end in development (any port on this machine) may call the edge, unless set otherwise.
            **(
                {}
                if "cors_origins" in s.model_fields_set
                else {"CHATTERBOT_CORS_ORIGINS": ",".join(LOOPBACK_ORIGINS)}
            ),
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
            loads_a_model = name == "inference" and s.inference_engine == "vllm"
            timeout = s.vllm_start_timeout_seconds if loads_a_model else None
            self._start_child(
                ServiceProcess(name, log_dir, ports[name], service_env, start_timeout=timeout), cancel
            )
            self.services[name] = self.children[name]
        together = tuple(name for name in START_ORDER if name not in alone)
        if not together:
            return
        count = self.processes or default_processes()
        for index in range(count):
            service_env = {**env, "CHATTERBOT_METRICS_PORT": str(self._port(0, taken))}
            process = ServiceProcess(
                f"mesh-{index}", log_dir, ports["edge"], service_env, components=together
            )
            # The first process migrates and creates what the others then find ready.
            self._start_child(process, cancel)
        first = self.children["mesh-0"]
        for name in together:
            self.services[name] = Component(name, ports[name], first, self)

    def _start_child(self, process: ServiceProcess, cancel: threading.Event | None) -> None:
        self.children[process.name] = process
        log.info("starting %s", process.name)
        process.start(timeout=process.start_timeout or 60, cancel=cancel)

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

    def write_up_json(self) -> None:
        """Write `up.json` (again: after a restart its pids change)."""
        _write_private_json(self.data_dir / "up.json", self.up_info())


def _write_private_json(path: Path, data: Any) -> None:
    """Write `data` to `path` (mode 0600) atomically: a reader sees the old file or the new one, never part."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # mode 0600
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(data, out, indent=2)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- supervision --------------------------------------------------------------------------------------------

STATUS_FILE = "status.json"
# How often a watcher looks at its process; how often the launcher probes health and rewrites its status.
WATCH_INTERVAL = 0.1
HEALTH_INTERVAL = 2.0
STATUS_INTERVAL = 1.0


@dataclass(frozen=True)
class RestartPolicy:
    """When a supervised process that exited starts again, and when the launcher gives up on it.

    As systemd's `Restart=always` with `StartLimitBurst`/`StartLimitIntervalSec`, and Kubernetes' crash-loop
    backoff: the n-th exit in a row waits `initial_delay * 2**(n-1)` seconds (at most `max_delay`), jittered
    into [d/2, d] so processes that failed together do not come back in lockstep; a process that had run for
    `stable_after` seconds starts the count over. After `burst` restarts within `window` seconds the next
    exit is reported (exit status, log tail) and the process is left stopped; the rest keeps running.
    """

    initial_delay: float = 0.5
    max_delay: float = 30.0
    burst: int = 5
    window: float = 120.0
    stable_after: float = 30.0
    start_timeout: float = 60.0

    def delay(self, failures: int, rng: random.Random) -> float:
        """The wait before the restart that follows the `failures`-th exit in a row (1 for the first)."""
        ceiling = min(self.max_delay, self.initial_delay * 2 ** max(0, failures - 1))
        return ceiling / 2 + rng.uniform(0, ceiling / 2)


def _start_timeout(process: EmbeddedServer, policy: RestartPolicy) -> float:
    """How long a restart of `process` may take: the policy's, or the process's own when it has one."""
    own = process.start_timeout if isinstance(process, ServiceProcess) else None
    return own or policy.start_timeout


def describe_exit(code: int) -> str:
    """`exited with code 1`, `killed by SIGKILL`: a Popen return code in words."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


@dataclass
class Supervised:
    """One process the launcher keeps running: a server, a service, or a combined process."""

    name: str
    kind: str  # "server", "service" (split mode) or "process" (combined mode: serves several components)
    process: EmbeddedServer
    serves: tuple[str, ...]
    # running | backoff (a restart is pending) | starting | failed (given up) | stopped
    state: str = "running"
    # healthy | unhealthy (runs, does not answer its readiness check) | down (not running)
    health: str = "healthy"
    restarts: int = 0
    # When its process was started (wall clock, for uptime), and since when it has answered (for backoff).
    started_at: float = 0.0
    ready_since: float = field(default_factory=time.monotonic)
    # Exits in a row without a stable run between them; drives the backoff.
    failures: int = 0
    restart_times: deque[float] = field(default_factory=deque)
    last_exit: str = ""
    next_start_at: float | None = None
    # The report made when the launcher gave up on it.
    failure: str = ""

    def snapshot(self) -> dict[str, Any]:
        running = self.state == "running"
        return {
            "name": self.name,
            "kind": self.kind,
            "serves": list(self.serves),
            "state": self.state,
            "health": self.health,
            "pid": self.process.pid,
            "started_at": self.started_at if running else None,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "next_start_at": self.next_start_at,
            "log": str(self.process.log_path),
            "failure": self.failure,
        }


class Supervisor:
    """Keeps every process of a started mesh running, and keeps `status.json` in its data dir up to date.

    Each process is watched by a thread of its own, so one that is slow to come back delays no other. A
    process that exits, with any code or signal, is restarted per the `RestartPolicy` on its own port and
    data dir; in combined mode the unit is one process (`mesh-i`) while the others keep serving the shared
    ports. `run()` returns once its `stop` event is set and the whole mesh has been stopped in order.
    """

    def __init__(
        self,
        mesh: Mesh,
        policy: RestartPolicy | None = None,
        *,
        rng: random.Random | None = None,
        health_interval: float = HEALTH_INTERVAL,
        status_interval: float = STATUS_INTERVAL,
    ) -> None:
        self.mesh = mesh
        self.policy = policy or RestartPolicy()
        self.health_interval = health_interval
        self.status_interval = status_interval
        self.status_path = mesh.data_dir / STATUS_FILE
        self.units: dict[str, Supervised] = {
            name: Supervised(name, "server", server, (name,), started_at=_started_at(server))
            for name, server in mesh.servers.items()
        }
        for name, child in mesh.children.items():
            kind = "process" if child.components else "service"
            serves = child.components or (name,)
            self.units[name] = Supervised(name, kind, child, serves, started_at=_started_at(child))
        self._rng = rng or random.Random()
        self._stop = threading.Event()
        self._state = "running"
        self._lock = threading.Lock()  # the units' fields
        self._write_lock = threading.Lock()  # status.json and up.json

    def run(self, stop: threading.Event) -> None:
        """Supervise until `stop` is set, then stop the whole mesh in order and return.

        Call it from a long-lived thread (the main thread of `chatterbot up`): the threads that restart
        processes live until this call has stopped every process, since a child of ours is sent its shutdown
        signal when the thread that started it exits (PR_SET_PDEATHSIG, see ops/embedded.py).
        """
        self._stop = stop
        released = threading.Event()
        threads = [
            threading.Thread(
                target=self._watch, args=(unit, released), name=f"watch-{unit.name}", daemon=True
            )
            for unit in self.units.values()
        ]
        threads.append(threading.Thread(target=self._probe_health, name="probe-health", daemon=True))
        for thread in threads:
            thread.start()
        try:
            self._write_status()
            while not stop.wait(self.status_interval):
                self._write_status()
        finally:
            stop.set()  # also when leaving by an exception: no restart may begin from here on
            self._write_status("stopping")
            try:
                self.mesh.stop()
            finally:
                released.set()
                for thread in threads:
                    thread.join(timeout=10)
                with self._lock:
                    for unit in self.units.values():
                        unit.state, unit.health, unit.next_start_at = "stopped", "down", None
                self._write_status("stopped")

    # --- one watcher thread per process ---

    def _watch(self, unit: Supervised, released: threading.Event) -> None:
        try:
            while (code := self._wait_exit(unit)) is not None and self._recover(unit, describe_exit(code)):
                pass
        except Exception as exc:  # a bug here must not end the launcher, nor leave the unit looking fine
            log.exception("supervising %s failed; it is no longer restarted", unit.name)
            with self._lock:
                unit.state, unit.health, unit.failure = "failed", "down", f"supervision failed: {exc!r}"
        finally:
            released.wait()

    def _wait_exit(self, unit: Supervised) -> int | None:
        """The exit status once the process has exited; None once shutting down."""
        while not self._stop.is_set():
            code = unit.process.exit_status()
            if code is not None:
                return None if self._stop.is_set() else code
            self._stop.wait(WATCH_INTERVAL)
        return None

    def _recover(self, unit: Supervised, exit_text: str) -> bool:
        """Bring `unit` back after it exited; False once given up or shutting down."""
        ran = time.monotonic() - unit.ready_since
        while True:
            delay = self._after_exit(unit, exit_text, ran)
            if delay is None or self._stop.wait(delay):
                return False
            with self._lock:
                unit.state, unit.next_start_at = "starting", None
                unit.restarts += 1
                unit.restart_times.append(time.monotonic())
            self._write_status()
            log.info("restarting %s (restart %d)", unit.name, unit.restarts)
            try:
                unit.process.start(timeout=_start_timeout(unit.process, self.policy), cancel=self._stop)
            except StartCancelled:
                return False
            except EmbeddedServerError as exc:
                exit_text, ran = f"failed to start: {str(exc).splitlines()[0]}", 0.0
                continue
            with self._lock:
                unit.state, unit.health = "running", "healthy"
                unit.started_at, unit.ready_since = _started_at(unit.process), time.monotonic()
            log.warning("%s is back (pid %s, restart %d)", unit.name, unit.process.pid, unit.restarts)
            self._write_status(up_json=True)
            return True

    def _after_exit(self, unit: Supervised, exit_text: str, ran: float) -> float | None:
        """Record an exit; the delay before the next start, or None when the restart cap is reached."""
        policy = self.policy
        now = time.monotonic()
        with self._lock:
            unit.last_exit, unit.health = exit_text, "down"
            unit.failures = 1 if ran >= policy.stable_after else unit.failures + 1
            while unit.restart_times and unit.restart_times[0] <= now - policy.window:
                unit.restart_times.popleft()
            delay: float | None = None
            if len(unit.restart_times) >= policy.burst:
                unit.state, unit.next_start_at = "failed", None
                unit.failure = (
                    f"{unit.name} keeps failing: {len(unit.restart_times)} restarts within {policy.window:g}s, "
                    f"then it {exit_text}; it is not restarted again (the rest of the mesh keeps running). "
                    f"Last lines of {unit.process.log_path}:\n{unit.process.log_tail()}"
                )
            else:
                delay = policy.delay(unit.failures, self._rng)
                unit.state, unit.next_start_at = "backoff", time.time() + delay
        if delay is None:
            log.error("%s", unit.failure)
        else:
            log.warning("%s %s; restarting it in %.1fs", unit.name, exit_text, delay)
        self._write_status()
        return delay

    # --- health and status ---

    def _probe_health(self) -> None:
        """Health of every running process, by its readiness check; `chatterbot status` shows it."""
        while not self._stop.wait(self.health_interval):
            for unit in list(self.units.values()):
                if self._stop.is_set():
                    return
                if unit.state != "running":
                    continue
                ok = unit.process.probe()
                with self._lock:
                    if unit.state == "running":
                        unit.health = "healthy" if ok else "unhealthy"

    def status(self) -> dict[str, Any]:
        """What `status.json` holds: the launcher, then every supervised process."""
        with self._lock:
            components = [unit.snapshot() for unit in self.units.values()]
        edge = self.mesh.services.get("edge")
        return {
            "launcher": {
                "pid": os.getpid(),
                "started_at": psutil.Process().create_time(),
                "state": self._state,
            },
            "updated_at": time.time(),
            "mode": self.mesh.mode,
            "edge_url": edge.url if edge is not None else None,
            "policy": asdict(self.policy),
            "components": components,
        }

    def _write_status(self, state: str | None = None, *, up_json: bool = False) -> None:
        with self._write_lock:
            if state is not None:
                self._state = state
            try:
                _write_private_json(self.status_path, self.status())
                if up_json and self.mesh.keys is not None:
                    self.mesh.write_up_json()
            except OSError as exc:  # a full disk must not stop the supervision it reports on
                log.warning("could not write %s: %s", self.status_path, exc)


def _started_at(process: EmbeddedServer) -> float:
    """When `process` was started, as the kernel has it (wall clock); now if it does not run."""
    pid = process.pid
    try:
        return psutil.Process(pid).create_time() if pid is not None else time.time()
    except psutil.NoSuchProcess:
        return time.time()


def read_status(data_dir: Path) -> dict[str, Any] | None:
    """The status a launcher keeps in `data_dir`, or None when no launcher ever ran there."""
    try:
        data: dict[str, Any] = json.loads((data_dir / STATUS_FILE).read_text())
    except FileNotFoundError:
        return None
    return data


def launcher_running(status: dict[str, Any]) -> bool:
    """True while the launcher that wrote `status` runs (its pid, not a later process given the same pid)."""
    launcher = status["launcher"]
    if launcher["state"] == "stopped":
        return False
    try:
        return abs(psutil.Process(launcher["pid"]).create_time() - launcher["started_at"]) < 1
    except psutil.NoSuchProcess:
        return False


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def format_status(status: dict[str, Any], now: float | None = None) -> str:
    """`chatterbot status`: a line on the launcher, then a row per process (servers first)."""
    now = time.time() if now is None else now
    launcher = status["launcher"]
    lines = [
        f"launcher pid {launcher['pid']}, {launcher['state']} for {_duration(now - launcher['started_at'])}, "
        f"mode {status['mode']}, edge {status['edge_url']}"
    ]
    rows = [["NAME", "KIND", "STATE", "HEALTH", "PID", "UPTIME", "RESTARTS", "SERVES", "LAST EXIT"]]
    for c in status["components"]:
        state = c["state"]
        if state == "backoff" and c["next_start_at"]:
            state = f"backoff {max(0.0, c['next_start_at'] - now):.1f}s"
        rows.append(
            [
                *(c["name"], c["kind"], state, c["health"], str(c["pid"] or "-")),
                _duration(now - c["started_at"]) if c["started_at"] else "-",
                str(c["restarts"]),
                ",".join(c["serves"]) if c["kind"] == "process" else "-",
                c["last_exit"] or "-",
            ]
        )
    # Every column padded to its widest cell but the last, which may be long.
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines += [
        "  ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[-1]]) for row in rows
    ]
    lines += [f"\n{c['failure']}" for c in status["components"] if c["failure"]]
    return "\n".join(lines)
