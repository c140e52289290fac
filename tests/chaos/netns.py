"""Hosts as Linux network namespaces: two bridges in a switch namespace, a veth pair per host and network.

Every address is in 10.77.0.0/16 and exists only inside the suite's namespaces (all named `cbx-*`): no
namespace has a default route, and the root namespace gets no address or route, so nothing the suite runs
can reach any other address. Two networks:

- `svc` (10.77.0.0/24): everything but the NATS nodes, which are not on it;
- `nats` (10.77.1.0/24): the NATS nodes and whoever talks to them (edges, chat hosts, the controller), so
  cutting one host's `nats` link cuts it off NATS only.

What is made is written to a state file as it is made; `destroy()` reads it back, kills every process still
in a namespace of the suite (`ip netns pids`), deletes the namespaces and removes the data dir, so a crashed
run is cleaned up by the next `down`.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "cbx-"
SWITCH = f"{PREFIX}sw"
NETWORKS = {"svc": "10.77.0", "nats": "10.77.1"}
STATE_FILE = Path(os.environ.get("CHATTERBOT_CHAOS_STATE", "/tmp/chatterbot-chaos/state.json"))
_CLONE_NEWNET = 0x40000000


@dataclass(frozen=True)
class Host:
    """One host: its namespace, and its address on each network it is on (last octet)."""

    name: str
    octet: int
    networks: tuple[str, ...] = ("svc",)

    @property
    def ns(self) -> str:
        return f"{PREFIX}{self.name}"

    def ip(self, network: str = "svc") -> str:
        if network not in self.networks:
            raise ValueError(f"host {self.name} is not on network {network}")
        return f"{NETWORKS[network]}.{self.octet}"

    def device(self, network: str) -> str:
        """The host's end of its veth on `network` (inside its namespace)."""
        return network

    def switch_port(self, network: str) -> str:
        """The switch's end of the host's veth on `network` (at most 15 characters)."""
        return f"{network[0]}{self.octet}"


@dataclass
class State:
    """What the suite made, so that `down` can remove it even after a crash."""

    namespaces: list[str] = field(default_factory=list)
    data_dir: str = ""
    controller_pid: int = 0

    def save(self) -> None:
        STATE_FILE.parent.mkdir(parents=True, exist_ok=True)
        tmp = STATE_FILE.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.__dict__, indent=1))
        tmp.replace(STATE_FILE)

    @classmethod
    def load(cls) -> State:
        try:
            return cls(**json.loads(STATE_FILE.read_text()))
        except FileNotFoundError:
            return cls()


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`ip ARGS`, raising with its stderr on failure."""
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def existing_namespaces() -> list[str]:
    """The suite's namespaces that exist now (from a crashed run too)."""
    out = ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(PREFIX)]


def create(hosts: list[Host], data_dir: Path) -> State:
    """Make the switch and every host; record each as it is made."""
    if existing_namespaces() or STATE_FILE.exists():
        raise RuntimeError(
            "a chaos cluster exists already (or a crashed one was left): run `python -m tests.chaos down`"
        )
    state = State(data_dir=str(data_dir), controller_pid=os.getpid())
    state.save()
    _add_namespace(SWITCH, state)
    for network in NETWORKS:
        ip("-n", SWITCH, "link", "add", f"br-{network}", "type", "bridge")
        ip("-n", SWITCH, "link", "set", f"br-{network}", "up")
    for host in hosts:
        _add_namespace(host.ns, state)
        for network in host.networks:
            port = host.switch_port(network)
            # Made inside the switch namespace, then one end moved into the host: no name in the root
            # namespace, so nothing clashes with other interfaces there.
            ip("-n", SWITCH, "link", "add", port, "type", "veth", "peer", "name", host.device(network))
            ip("-n", SWITCH, "link", "set", host.device(network), "netns", host.ns)
            ip("-n", SWITCH, "link", "set", port, "master", f"br-{network}", "up")
            ip("-n", host.ns, "addr", "add", f"{host.ip(network)}/24", "dev", host.device(network))
            ip("-n", host.ns, "link", "set", host.device(network), "up")
    return state


def _add_namespace(name: str, state: State) -> None:
    ip("netns", "add", name)
    state.namespaces.append(name)
    state.save()
    ip("-n", name, "link", "set", "lo", "up")


def enter(ns: str) -> None:
    """Move the calling thread (call it before any other thread starts) into namespace `ns`."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {ns} failed")
    finally:
        os.close(fd)


def pids_in(ns: str) -> list[int]:
    out = ip("netns", "pids", ns, check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def destroy() -> list[str]:
    """Kill everything in the suite's namespaces, delete them, remove the data dir and the state file.

    Returns what was removed, for the caller to print. Safe to run when nothing is there.
    """
    state = State.load()
    removed: list[str] = []
    if state.controller_pid and state.controller_pid != os.getpid():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(state.controller_pid, signal.SIGTERM)
            removed.append(f"controller {state.controller_pid}")
            for _ in range(100):
                os.kill(state.controller_pid, 0)
                time.sleep(0.1)
            os.kill(state.controller_pid, signal.SIGKILL)
    namespaces = sorted(set(state.namespaces) | set(existing_namespaces()))
    for ns in namespaces:
        for pid in pids_in(ns):
            if pid == os.getpid():
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                removed.append(f"pid {pid} in {ns}")
    for ns in namespaces:
        for _ in range(50):
            if not pids_in(ns):
                break
            time.sleep(0.1)
        ip("netns", "del", ns, check=False)
        removed.append(f"namespace {ns}")
    if state.data_dir and Path(state.data_dir).exists():
        shutil.rmtree(state.data_dir, ignore_errors=True)
        removed.append(f"dir {state.data_dir}")
    STATE_FILE.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        STATE_FILE.parent.rmdir()
    return removed


def link(host: Host, network: str, up: bool) -> None:
    """Set a host's link on `network` up or down (the switch's end, as pulling the cable would)."""
    ip("-n", SWITCH, "link", "set", host.switch_port(network), "up" if up else "down")


def shape(host: Host, network: str, rate: str | None) -> None:
    """Limit the host's egress on `network` to `rate` with a token bucket (None: remove the limit)."""
    dev = host.device(network)
    if rate is None:
        subprocess.run(
            ["tc", "-n", host.ns, "qdisc", "del", "dev", dev, "root"], capture_output=True, check=False
        )
        return
    subprocess.run(
        [
            "tc",
            "-n",
            host.ns,
            "qdisc",
            "replace",
            "dev",
            dev,
            "root",
            "tbf",
            "rate",
            rate,
            "burst",
            "4kb",
            "latency",
            "400ms",
        ],
        capture_output=True,
        text=True,
        check=True,
    )


def netem_available() -> bool:
    """Whether this kernel has the netem qdisc (delay and loss); some VM kernels are built without it."""
    result = subprocess.run(
        ["tc", "-n", SWITCH, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"],
        capture_output=True,
        check=False,
    )
    subprocess.run(
        ["tc", "-n", SWITCH, "qdisc", "del", "dev", "lo", "root"], capture_output=True, check=False
    )
    return result.returncode == 0
