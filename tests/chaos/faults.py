"""The faults, one at a time: what breaks, how long, how it is put right (as a supervisor or an operator
would), and how to tell it is back."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

from ops.embedded import EmbeddedServer
from tests.chaos import netns
from tests.chaos.cluster import HOSTS, Cluster

Action = Callable[[Cluster], None]
Check = Callable[[Cluster], bool]


@dataclass(frozen=True)
class Fault:
    name: str
    inject: Action
    recover: Action
    ready: Check
    hold: float = 3.0  # seconds between the fault and its repair
    note: str = ""


def _killed(pick: Callable[[Cluster], EmbeddedServer], name: str, hold: float = 3.0, note: str = "") -> Fault:
    """SIGKILL of one process, started again `hold` seconds later."""
    return Fault(
        name,
        inject=lambda c: pick(c).kill(),
        recover=lambda c: pick(c).start(timeout=90),
        ready=lambda c: pick(c).probe(),
        hold=hold,
        note=note,
    )


def _nats_formed(c: Cluster) -> bool:
    return all(node.probe() and node.healthy() for node in c.nats)


def _sentinel_master(c: Cluster) -> str | None:
    """The master all three sentinels name, once they agree; else None."""
    seen: set[str | None] = set()
    for s in c.sentinels:
        try:
            client = redis.Redis(host=s.host, port=s.port, socket_timeout=1)
            try:
                addr = client.sentinel_get_master_addr_by_name("chatterbot")
            finally:
                client.close()
        except redis.RedisError:
            return None
        seen.add(str(addr) if addr else None)
    return seen.pop() if len(seen) == 1 and None not in seen else None


def _valkey_ready(c: Cluster) -> bool:
    return c.valkey.probe() and _sentinel_master(c) is not None


def _shape_store_host(c: Cluster) -> None:
    ctx = HOSTS["ctx"]
    if netns.netem_available():
        subprocess.run(
            [
                "tc",
                "-n",
                ctx.ns,
                "qdisc",
                "replace",
                "dev",
                "svc",
                "root",
                "netem",
                "delay",
                "100ms",
                "loss",
                "5%",
            ],
            check=True,
            capture_output=True,
        )
        return
    # No netem in this kernel: a token bucket for a slow link, iptables for the loss.
    netns.shape(ctx, "svc", "2mbit")
    _iptables(ctx.ns, "-A")


def _unshape_store_host(c: Cluster) -> None:
    ctx = HOSTS["ctx"]
    netns.shape(ctx, "svc", None)
    if not netns.netem_available():
        _iptables(ctx.ns, "-D")


def _iptables(ns: str, op: str) -> None:
    for chain in ("INPUT", "OUTPUT"):
        subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                ns,
                "iptables",
                op,
                chain,
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                "0.05",
                "-j",
                "DROP",
            ],
            check=True,
            capture_output=True,
        )


def _svc(name: str) -> Callable[[Cluster], EmbeddedServer]:
    return lambda c: c.services[name]


FAULTS: dict[str, Fault] = {
    f.name: f
    for f in [
        _killed(_svc("edge@edge1"), "kill edge"),
        _killed(_svc("chat@chat1"), "kill chat_svc"),
        _killed(_svc("worker@chat1"), "kill worker", note="mid-generation: the worker holds queued turns"),
        _killed(_svc("inference@inf1"), "kill inference"),
        _killed(_svc("context@ctx"), "kill context_svc"),
        _killed(_svc("store@ctx"), "kill store_svc"),
        Fault(
            "kill NATS node",
            inject=lambda c: c.nats[1].kill(),
            recover=lambda c: c.nats[1].start(timeout=60),
            ready=_nats_formed,
            hold=5.0,
        ),
        Fault(
            "kill Valkey primary",
            inject=lambda c: c.valkey.kill(),
            # The sentinels promote the replica meanwhile; the old primary comes back and is demoted.
            recover=lambda c: c.valkey.start(timeout=60),
            ready=_valkey_ready,
            hold=6.0,
            note="Sentinel failover (down-after 1 s)",
        ),
        Fault(
            "kill PostgreSQL shard 0 primary",
            inject=lambda c: c.pg_primaries[0].kill(),
            recover=lambda c: c.pg_primaries[0].start(timeout=90),
            ready=lambda c: c.pg_primaries[0].probe(),
            hold=5.0,
            note="restarted, not failed over: its turns wait or fail visibly, then resume",
        ),
        Fault(
            "fail over PostgreSQL shard 1",
            inject=lambda c: c.pg_primaries[1].kill(),
            recover=lambda c: c.fail_over_shard(1),
            ready=lambda c: c.services["store@ctx"].probe(),
            hold=2.0,
            note="replica promoted (pg_ctl promote), store_svc repointed; the old primary stays down",
        ),
        Fault(
            "cut chat1-NATS link 10 s",
            inject=lambda c: netns.link(HOSTS["chat1"], "nats", up=False),
            recover=lambda c: netns.link(HOSTS["chat1"], "nats", up=True),
            ready=lambda c: True,
            hold=10.0,
        ),
        Fault(
            "slow link to store host 10 s",
            inject=_shape_store_host,
            recover=_unshape_store_host,
            ready=lambda c: True,
            hold=10.0,
        ),
    ]
}

PROFILES = {
    "ci": ["kill edge", "kill worker", "kill NATS node", "cut chat1-NATS link 10 s"],
    # The failover last: the shard has no replica after it.
    "full": [name for name in FAULTS if name != "fail over PostgreSQL shard 1"]
    + ["fail over PostgreSQL shard 1"],
}


def wait_until(check: Callable[[], bool], timeout: float, interval: float = 0.3) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return True
        except Exception:  # not ready yet, whatever it raised
            pass
        time.sleep(interval)
    return False
