"""The chaos cluster: which host runs what, and the real servers and services, each in its host's namespace.

Hosts (network namespaces, see `tests.chaos.netns`): `lb` (nginx), `edge1`/`edge2`, `chat1`/`chat2`
(chat_svc and a worker each), `inf1`/`inf2` (the simulated engine), `ctx` (context_svc and store_svc),
`nats1..3` (a JetStream cluster, streams at 3 replicas), `pg0`/`pg1` (the two shard primaries) with
`pg0r`/`pg1r` (their streaming replicas, made by `pg_basebackup -R`), `valkey`/`valkeyr` (primary and replica)
and `sent1..3` (Sentinels, quorum 2). The controller (`ctl`) is where the load client and the checks run.

Every server is the embedded one of `ops.embedded`, started as `ip netns exec <ns> <its command>` (`ip`
execs the command in place, so the pid the class holds is the server's own, and kill() is a real SIGKILL).
Services are `chatterbot serve <component>` with settings by environment, bound to 0.0.0.0 in their
namespace; callers reach a tier through every address of it (`ipv4:a:p,b:p`, spread round-robin by gRPC).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from chatterbot.settings import Settings
from ops.embedded import (
    EmbeddedServer,
    NatsServer,
    PostgresServer,
    ValkeySentinel,
    ValkeyServer,
    _pg_bin,
    _pg_client_env,
)
from ops.launcher import ServiceProcess
from tests.chaos.netns import Host
from tests.nginx_versions import for_installed_nginx

logger = logging.getLogger(__name__)

API_KEY = "chaos-service-key"
ADMIN_KEY = "chaos-admin-key"
DATABASE = "chatterbot"
NGINX_CONF = Path(__file__).resolve().parents[2] / "deploy" / "nginx.conf"

HOSTS = {
    h.name: h
    for h in [
        Host("ctl", 2, ("svc", "nats")),
        Host("lb", 10),
        Host("edge1", 11, ("svc", "nats")),
        Host("edge2", 12, ("svc", "nats")),
        Host("chat1", 21, ("svc", "nats")),
        Host("chat2", 22, ("svc", "nats")),
        Host("inf1", 31),
        Host("inf2", 32),
        Host("ctx", 40),
        Host("nats1", 51, ("nats",)),
        Host("nats2", 52, ("nats",)),
        Host("nats3", 53, ("nats",)),
        Host("pg0", 60),
        Host("pg0r", 61),
        Host("pg1", 62),
        Host("pg1r", 63),
        Host("valkey", 70),
        Host("valkeyr", 71),
        Host("sent1", 72),
        Host("sent2", 73),
        Host("sent3", 74),
    ]
}

PORTS = {"chat": 50051, "context": 50052, "inference": 50053, "store": 50054, "worker": 50055, "edge": 8000}


def _in_ns(ns: str, cmd: list[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


class NsNats(NatsServer):
    """A node of the JetStream cluster on the `nats` network."""

    def __init__(self, data_dir: Path, host: Host, peers: list[Host]) -> None:
        super().__init__(data_dir, host=host.ip("nats"), port=4222, monitor_port=8222, name=host.name)
        self.ns = host.ns
        self.peers = peers

    def _prepare(self) -> None:
        super()._prepare()
        routes = ", ".join(f'"nats-route://{p.ip("nats")}:6222"' for p in self.peers)
        with self.config_path.open("a") as config:
            config.write(
                f"cluster {{\n  name: chaos\n  host: {self.host}\n  port: 6222\n  routes: [{routes}]\n}}\n"
            )

    def _command(self) -> list[str]:
        return _in_ns(self.ns, super()._command())

    def _is_ready(self) -> bool:
        # A lone node has no meta leader (so no /healthz 200); the cluster is waited for as a whole.
        import socket

        with socket.create_connection((self.host, self.port), timeout=2) as sock:
            return sock.recv(5) == b"INFO "

    def healthy(self) -> bool:
        return NatsServer._is_ready(self)


class NsPostgres(PostgresServer):
    """A shard primary, or with `primary` a streaming replica of it (`pg_basebackup -R` on first start)."""

    def __init__(self, data_dir: Path, host: Host, primary: NsPostgres | None = None) -> None:
        super().__init__(data_dir, host=host.ip(), port=5432, database=DATABASE, name=host.name)
        self.ns = host.ns
        self.primary = primary

    def _initdb(self, ids: tuple[int, int] | None) -> None:
        if self.primary is None:
            super()._initdb(ids)
            hba = self.pgdata / "pg_hba.conf"
            with hba.open("a") as f:
                f.write("host all all 10.77.0.0/16 trust\nhost replication all 10.77.0.0/16 trust\n")
            return
        scratch = self.data_dir / "pgdata.initdb"
        subprocess.run(["rm", "-rf", str(scratch)], check=False)
        cmd = [_pg_bin("pg_basebackup"), "-h", self.primary.host, "-p", "5432", "-U", "postgres"]
        cmd += ["-D", str(scratch), "-R", "-X", "stream", "-c", "fast"]
        # As the server user, so the copy belongs to it; pg_basebackup needs no namespace (the controller
        # reaches every host).
        kwargs = self._as_user_kwargs()
        if ids is not None:
            self._own_dir(self.data_dir, ids)
        result = subprocess.run(
            cmd, capture_output=True, text=True, env=_pg_client_env(), timeout=120, check=False, **kwargs
        )
        if result.returncode != 0:
            raise RuntimeError(f"pg_basebackup for {self.name}: {result.stderr.strip()}")
        scratch.rename(self.pgdata)

    def _command(self) -> list[str]:
        cmd = super()._command()
        ids = self._system_user()
        if ids is not None:
            # `ip netns exec` needs root; it then drops to the server user, as Popen(user=...) would.
            uid, gid = ids
            cmd = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *cmd]
        return _in_ns(self.ns, cmd)

    def _popen_kwargs(self) -> dict[str, Any]:
        return {"env": _pg_client_env()}

    def _after_ready(self) -> None:
        if self.primary is None:
            self.ensure_database(DATABASE)

    def promote(self) -> None:
        """`pg_ctl promote`: this replica becomes a primary."""
        subprocess.run(
            [_pg_bin("pg_ctl"), "promote", "-w", "-D", str(self.pgdata)],
            check=True,
            capture_output=True,
            env=_pg_client_env(),
            timeout=60,
            **self._as_user_kwargs(),
        )


class NsValkey(ValkeyServer):
    def __init__(self, data_dir: Path, host: Host, replica_of: NsValkey | None = None) -> None:
        super().__init__(data_dir, host=host.ip(), port=6379, name=host.name, replica_of=replica_of)
        self.ns = host.ns

    def _command(self) -> list[str]:
        return _in_ns(self.ns, super()._command())


class NsSentinel(ValkeySentinel):
    def __init__(self, data_dir: Path, host: Host, master: NsValkey) -> None:
        super().__init__(
            data_dir,
            master,
            host=host.ip(),
            port=26379,
            name=host.name,
            quorum=2,
            down_after_ms=1000,
            failover_timeout_ms=10000,
        )
        self.ns = host.ns

    def _command(self) -> list[str]:
        return _in_ns(self.ns, super()._command())


class NsService(ServiceProcess):
    """`chatterbot serve <component>` in a host's namespace."""

    def __init__(self, component: str, host: Host, log_dir: Path, env: dict[str, str]) -> None:
        super().__init__(component, log_dir, PORTS[component], env, host=host.ip())
        self.name = f"{component}@{host.name}"
        self.component = component
        self.log_path = log_dir / f"{self.name}.log"
        self.ns = host.ns

    def _command(self) -> list[str]:
        return _in_ns(self.ns, [sys.executable, "-m", "ops", "serve", self.component])

    @property
    def url(self) -> str:
        if self.component == "edge":
            return f"http://{self.host}:{self.port}"
        return f"{self.host}:{self.port}"

    def _is_ready(self) -> bool:
        if self.component == "edge":
            try:
                with urllib.request.urlopen(f"{self.url}/livez", timeout=1) as response:
                    return response.status == 200
            except OSError:
                return False
        saved, self.name = self.name, self.component
        try:
            return super()._is_ready()
        finally:
            self.name = saved


class NsNginx(EmbeddedServer):
    """Debian's nginx with deploy/nginx.conf, pointed at both edges."""

    # SIGTERM is nginx's fast shutdown (SIGQUIT waits for every keep-alive connection to go idle).
    shutdown_signal = signal.SIGTERM

    def __init__(self, data_dir: Path, host: Host, edges: list[Host], chats: list[Host]) -> None:
        super().__init__("nginx", data_dir, host=host.ip(), port=80)
        self.ns = host.ns
        self.edges = edges
        self.chats = chats

    def _prepare(self) -> None:
        import re

        conf = NGINX_CONF.read_text()
        servers = "".join(
            f"        server {e.ip()}:{PORTS['edge']} max_fails=1 fail_timeout=2s;\n" for e in self.edges
        )
        conf = re.sub(r"^\s*server edge:\d+ resolve;\n", servers, conf, count=1, flags=re.M)
        chats = "".join(f"        server {c.ip()}:{PORTS['chat']};\n" for c in self.chats)
        conf = re.sub(r"^\s*server chat:\d+ resolve;\n", chats, conf, count=1, flags=re.M)
        conf = re.sub(r"^(\s*)listen 80;$", rf"\1listen {self.host}:80;", conf, flags=re.M)
        conf = re.sub(r"^(\s*)listen 50051;$", rf"\1listen {self.host}:50051;", conf, flags=re.M)
        conf = re.sub(r"^(\s*)listen 443 ssl;$", rf"\1listen {self.host}:443 ssl;", conf, flags=re.M)
        conf = re.sub(r"^\s*resolver [^;]*;\n", "", conf, flags=re.M)
        temp = "".join(
            f"    {kind}_temp_path {self.data_dir}/{kind};\n"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        conf = conf.replace("http {\n", "http {\n" + temp, 1)
        (self.data_dir / "logs").mkdir(exist_ok=True)
        (self.data_dir / "nginx.conf").write_text(for_installed_nginx(conf))

    def _command(self) -> list[str]:
        user = " user root;" if os.geteuid() == 0 else ""
        return _in_ns(
            self.ns,
            [
                "nginx",
                "-p",
                str(self.data_dir),
                "-c",
                str(self.data_dir / "nginx.conf"),
                "-g",
                f"daemon off; pid {self.data_dir}/nginx.pid;{user}",
            ],
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:80"

    def _is_ready(self) -> bool:
        with urllib.request.urlopen(f"{self.url}/nginx-health", timeout=1) as response:
            return response.status == 200


def _tier(hosts: list[str], port: int) -> str:
    """A gRPC target naming every address of a tier (round-robin over them)."""
    return "ipv4:" + ",".join(f"{HOSTS[h].ip()}:{port}" for h in hosts)


def cluster_settings(**overrides: Any) -> Settings:
    """The settings every service process of the cluster gets (the same for all of them)."""
    pg = [f"postgresql://postgres@{HOSTS[h].ip()}:5432/{DATABASE}" for h in ("pg0", "pg1")]
    replicas = [f"postgresql://postgres@{HOSTS[h].ip()}:5432/{DATABASE}" for h in ("pg0r", "pg1r")]
    values: dict[str, Any] = {
        "bind_host": "0.0.0.0",
        "chat_addr": _tier(["chat1", "chat2"], PORTS["chat"]),
        "context_addr": f"{HOSTS['ctx'].ip()}:{PORTS['context']}",
        "store_addr": f"{HOSTS['ctx'].ip()}:{PORTS['store']}",
        "inference_addr": _tier(["inf1", "inf2"], PORTS["inference"]),
        # Health checks reach every worker; a worker itself binds its port (see Cluster).
        "worker_addr": _tier(["chat1", "chat2"], PORTS["worker"]),
        "edge_port": PORTS["edge"],
        "nats_url": ",".join(f"nats://{HOSTS[h].ip('nats')}:4222" for h in ("nats1", "nats2", "nats3")),
        "redis_url": "redis://ignored/0",
        "redis_sentinels": [f"{HOSTS[h].ip()}:26379" for h in ("sent1", "sent2", "sent3")],
        "postgres_dsn": pg[0],
        "postgres_shards": pg,
        "postgres_replicas": replicas,
        "api_keys": [API_KEY],
        "admin_keys": [ADMIN_KEY],
        "jetstream_replicas": 3,
        # Generations last about 0.5-1 s: a kill lands mid-generation.
        "sim_ttft_ms": 60,
        "sim_prefill_ms_per_token": 0,
        "sim_itl_ms": 25,
        "sim_itl_at_max_ms": 35,
        "sim_mean_output_tokens": 24,
        "jobs_ack_wait_seconds": 6,
        "jobs_heartbeat_seconds": 2,
        "jobs_backoff_seconds": [0.5, 1.0, 2.0, 4.0],
        "breaker_fail_max": 3,
        "breaker_reset_seconds": 1.0,
        "deadline_seconds": 8,
        "stream_deadline_seconds": 30,
        "shutdown_grace_seconds": 3,
        "worker_concurrency": 8,
        "log_level": "INFO",
        "metrics_port": 0,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


class Cluster:
    """Every server and service of the chaos cluster, started in dependency order."""

    def __init__(self, root: Path, settings: Settings | None = None) -> None:
        self.root = root
        self.settings = settings or cluster_settings()
        env = {**os.environ, **self.settings.to_env()}
        env.pop("CHATTERBOT_METRICS_PORT", None)
        env["CHATTERBOT_METRICS_PORT"] = "0"
        h = HOSTS
        nats_hosts = [h["nats1"], h["nats2"], h["nats3"]]
        self.nats = [NsNats(root / n.name, n, [p for p in nats_hosts if p is not n]) for n in nats_hosts]
        pg0 = NsPostgres(root / "pg0", h["pg0"])
        pg1 = NsPostgres(root / "pg1", h["pg1"])
        self.pg_primaries = [pg0, pg1]
        # The server each shard's writes go to now (a promoted replica after a failover).
        self.shards: list[NsPostgres] = [pg0, pg1]
        self.pg_replicas = [
            NsPostgres(root / "pg0r", h["pg0r"], pg0),
            NsPostgres(root / "pg1r", h["pg1r"], pg1),
        ]
        self.valkey = NsValkey(root / "valkey", h["valkey"])
        self.valkey_replica = NsValkey(root / "valkeyr", h["valkeyr"], replica_of=self.valkey)
        self.sentinels = [NsSentinel(root / s, h[s], self.valkey) for s in ("sent1", "sent2", "sent3")]
        logs = root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.env = env
        self.services: dict[str, NsService] = {}
        for component, host in [
            ("store", "ctx"),
            ("context", "ctx"),
            ("inference", "inf1"),
            ("inference", "inf2"),
            ("chat", "chat1"),
            ("chat", "chat2"),
            ("worker", "chat1"),
            ("worker", "chat2"),
            ("edge", "edge1"),
            ("edge", "edge2"),
        ]:
            own = {"CHATTERBOT_WORKER_ADDR": f"0.0.0.0:{PORTS['worker']}"} if component == "worker" else {}
            service = NsService(component, h[host], logs, {**env, **own})
            self.services[service.name] = service
        self.nginx = NsNginx(root / "nginx", h["lb"], [h["edge1"], h["edge2"]], [h["chat1"], h["chat2"]])

    @property
    def lb_url(self) -> str:
        return self.nginx.url

    def servers(self) -> list[EmbeddedServer]:
        """Everything, in start order."""
        return [
            *self.nats,
            *self.pg_primaries,
            *self.pg_replicas,
            self.valkey,
            self.valkey_replica,
            *self.sentinels,
            *self.services.values(),
            self.nginx,
        ]

    def start(self) -> None:
        t0 = time.monotonic()
        for node in self.nats:
            node.start(timeout=30)
        for pg in self.pg_primaries:
            pg.start(timeout=90)
        for pg in self.pg_replicas:
            pg.start(timeout=90)
        self.valkey.start()
        self.valkey_replica.start()
        for sentinel in self.sentinels:
            sentinel.start()
        self.wait_nats_formed()
        for service in self.services.values():
            service.start(timeout=90)
        self.nginx.start()
        logger.info("cluster up in %.1fs", time.monotonic() - t0)

    def fail_over_shard(self, index: int) -> None:
        """Promote shard `index`'s replica and repoint store_svc at it (a rollout: stop, start with the new
        shard list; the shard has no replica from then on)."""
        replica = self.pg_replicas[index]
        replica.promote()
        self.shards[index] = replica
        shards = [pg.dsn(DATABASE) for pg in self.shards]
        replicas = [
            "" if self.shards[i] is self.pg_replicas[i] else r.dsn(DATABASE)
            for i, r in enumerate(self.pg_replicas)
        ]
        store = self.services["store@ctx"]
        store.env = {
            **store.env,
            "CHATTERBOT_POSTGRES_DSN": shards[0],
            "CHATTERBOT_POSTGRES_SHARDS": ",".join(shards),
            "CHATTERBOT_POSTGRES_REPLICAS": ",".join(replicas),
        }
        store.stop(timeout=10)
        store.start(timeout=90)

    def wait_nats_formed(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(node.healthy() for node in self.nats if node.is_running):
                return
            time.sleep(0.3)
        raise RuntimeError("NATS cluster did not form: " + " | ".join(n.log_tail()[-500:] for n in self.nats))

    def stop(self) -> None:
        for server in reversed(self.servers()):
            try:
                server.stop(timeout=10)
            except Exception:  # stop the rest whatever one does
                logger.exception("stopping %s", server.name)
