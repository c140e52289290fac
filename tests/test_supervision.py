"""`chatterbot up` supervises its processes: a SIGKILLed service or server costs one restart, not the mesh.

One split mesh on servers of its own runs under a light load of sync, async and streamed chats while each
service and each embedded server is SIGKILLed in turn; then a process that fails at every start is given up
after the cap while the rest keeps serving. `chatterbot up` itself, in combined mode, keeps its edge port
answering while one of its processes is down, and stops with nothing left behind while a restart is pending.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import psycopg
import pytest

from chatterbot.settings import Settings
from ops.launcher import START_ORDER, Mesh, RestartPolicy, ServiceProcess, Supervisor, read_status
from tests.clients import chat_body, new_user, wait_done
from tests.meshes import ADMIN_KEY, API_KEY

CHATTERBOT = str(Path(sys.executable).with_name("chatterbot"))
SERVERS = ("nats", "postgres", "redis")
# A first restart 2-4 s after the exit: longer than the services' 2 s between dependency probes, so /health sees
# the component down before it is back.
POLICY = RestartPolicy(initial_delay=4.0, burst=3, window=60.0, stable_after=10.0)


@pytest.fixture(scope="module")
def supervised(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Supervisor]:
    """A split mesh on embedded servers of its own, supervised from a thread as `chatterbot up` does."""
    settings = Settings(
        _env_file=None,
        # Empty URLs: the mesh starts (and its supervisor restarts) NATS, PostgreSQL and Valkey of its own.
        nats_url="",
        redis_url="",
        postgres_dsn="",
        postgres_shards=[],
        api_keys=[API_KEY],
        admin_keys=[ADMIN_KEY],
        sim_ttft_ms=5,
        sim_prefill_ms_per_token=0,
        sim_itl_ms=1,
        sim_itl_at_max_ms=2,
        breaker_fail_max=3,
        breaker_reset_seconds=1.0,
        shutdown_grace_seconds=5,
        # A job whose worker died is redelivered soon, and a job retries through any outage below.
        jobs_ack_wait_seconds=3.0,
        jobs_heartbeat_seconds=1.0,
        jobs_max_deliver=30,
        jobs_backoff_seconds=[0.5, 1.0, 2.0],
        log_level="INFO",
    )
    mesh = Mesh(settings, tmp_path_factory.mktemp("supervised"), prefer_configured_ports=False, mode="split")
    mesh.start()
    supervisor = Supervisor(mesh, POLICY, health_interval=0.5)
    stop = threading.Event()
    thread = threading.Thread(target=supervisor.run, args=(stop,), name="supervisor")
    thread.start()
    try:
        yield supervisor
    finally:
        stop.set()
        thread.join(timeout=90)


@pytest.fixture
def edge(supervised: Supervisor) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=supervised.mesh.edge_url, headers={"X-API-Key": API_KEY}, timeout=30) as c:
        yield c


class Load:
    """A light, steady load from a thread: a sync chat, an async chat and a streamed chat in turn.

    Failures while a component is down are expected and only counted; what was accepted (a correlation id
    handed back) is kept, since every one of those must be answered exactly once.
    """

    def __init__(self, edge_url: str) -> None:
        self.edge_url = edge_url
        self.accepted: list[tuple[str, str]] = []  # (user_id, correlation_id)
        self.answered = 0
        self.failed = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="load", daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.edge_url, headers={"X-API-Key": API_KEY}, timeout=10) as client:
            turn = 0
            while not self.stop.is_set():
                try:
                    self._one(client, turn % 3)
                except httpx.HTTPError:
                    self.failed += 1
                turn += 1
                self.stop.wait(0.05)

    def _one(self, client: httpx.Client, kind: int) -> None:
        user = new_user()
        if kind == 0:
            r = client.post("/chat", json=chat_body(user))
            self.answered += r.status_code == 200
            self.failed += r.status_code != 200
            return
        r = client.post("/async-chat" if kind == 1 else "/stream-chat", json=chat_body(user))
        if r.status_code != 200:
            self.failed += 1
            return
        body = r.json()
        self.accepted.append((user, body["correlation_id"]))
        if kind == 2:
            with client.stream("GET", body["stream_endpoint"]) as stream:
                for line in stream.iter_lines():
                    if line == "data: [DONE]":
                        break
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not self.stop.is_set():
            r = client.get(f"/check-response/{body['correlation_id']}")
            if r.status_code == 200 and r.json().get("status") != "pending":
                return
            time.sleep(0.1)
        self.failed += 1  # not answered yet: it will be, and the last test checks that it was


@pytest.fixture(scope="module")
def load(supervised: Supervisor) -> Iterator[Load]:
    running = Load(supervised.mesh.edge_url)
    running.thread.start()
    try:
        yield running
    finally:
        running.stop.set()
        running.thread.join(timeout=30)


def health(edge: httpx.Client) -> dict[str, str] | None:
    """/health's components, or None while the edge does not answer."""
    try:
        return edge.get("/health", timeout=5).json()["components"]
    except httpx.HTTPError:
        return None


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds until `check()` held; fails the test after `timeout`."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout, f"not within {timeout:g}s: {what}"
        time.sleep(0.1)
    return time.monotonic() - started


def serves_chats(edge: httpx.Client) -> bool:
    try:
        components = health(edge)
        return (
            components is not None
            and set(components.values()) == {"up"}
            and edge.post("/chat", json=chat_body(new_user()), timeout=10).status_code == 200
        )
    except httpx.HTTPError:
        return False


@pytest.mark.parametrize("name", [*START_ORDER, *SERVERS])
def test_sigkilled_process_is_restarted_once_and_the_mesh_answers_again(
    supervised: Supervisor, load: Load, edge: httpx.Client, name: str
) -> None:
    unit = supervised.units[name]
    assert (unit.state, unit.restarts) == ("running", 0)
    old_pid, port = unit.process.pid, unit.process.port
    answered_before = load.answered

    unit.process.kill()  # SIGKILL of the process and its children, as a crash

    if name == "edge":
        assert health(edge) is None
    else:
        wait_until(lambda: (health(edge) or {}).get(name) == "down", 10, f"/health shows {name} down")
    recovered_in = wait_until(
        lambda: unit.state == "running" and serves_chats(edge), 60, f"{name} is back and the mesh answers"
    )
    assert recovered_in < 30
    assert (unit.state, unit.restarts, unit.last_exit) == ("running", 1, "killed by SIGKILL")
    assert unit.process.pid not in (None, old_pid)
    assert unit.process.port == port  # clients reconnect to the address they had
    listed = _status(supervised.mesh.data_dir)
    assert (listed[name]["restarts"], listed[name]["pid"]) == (1, unit.process.pid)
    wait_until(lambda: load.answered > answered_before, 30, "the load is answered again")


def test_every_accepted_chat_is_answered_exactly_once(
    supervised: Supervisor, load: Load, edge: httpx.Client
) -> None:
    load.stop.set()
    load.thread.join(timeout=30)
    assert len(load.accepted) >= 20, load.accepted
    for _user, correlation_id in load.accepted:
        assert "response" in wait_done(edge, correlation_id, timeout=60), correlation_id
    shards = supervised.mesh.services["store"].env["CHATTERBOT_POSTGRES_SHARDS"].split(",")
    counts: dict[str, int] = {}
    for dsn in shards:
        with psycopg.connect(dsn, autocommit=True) as conn:
            for user, correlation_id in load.accepted:
                (n,) = conn.execute(
                    "SELECT count(*) FROM messages WHERE user_id = %s AND request_id = %s AND role = 'assistant'",
                    (user, correlation_id),
                ).fetchone()
                counts[correlation_id] = counts.get(correlation_id, 0) + n
    assert {cid for cid, n in counts.items() if n != 1} == set(), counts


def test_process_failing_at_every_start_is_given_up_after_the_cap_and_the_rest_keeps_serving(
    supervised: Supervisor, edge: httpx.Client
) -> None:
    worker = supervised.units["worker"]
    assert isinstance(worker.process, ServiceProcess)
    restarts_before = worker.restarts
    # A bad setting only the worker's process has: it exits at every start, before serving anything.
    worker.process.env["CHATTERBOT_WORKER_CONCURRENCY"] = "not-a-number"
    worker.process.kill()

    wait_until(lambda: worker.state == "failed", 120, "the worker is given up")
    # The cap counts restarts within the window (a first one may be left from the SIGKILL test).
    assert worker.restarts - restarts_before >= POLICY.burst - 1
    assert f"worker keeps failing: {POLICY.burst} restarts within 60s" in worker.failure
    assert "worker_concurrency" in worker.failure  # the log tail says why
    assert worker.last_exit.startswith("failed to start: worker exited with code")
    others = {name: unit.state for name, unit in supervised.units.items() if name != "worker"}
    assert set(others.values()) == {"running"}, others
    components = health(edge)
    assert components is not None and components["worker"] == "down", components
    assert {state for name, state in components.items() if name != "worker"} == {"up"}, components
    assert edge.post("/chat", json=chat_body(new_user())).status_code == 200
    listing = subprocess.run(
        [CHATTERBOT, "status", "--data-dir", str(supervised.mesh.data_dir)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert listing.returncode == 1, listing  # the launcher runs, one of its processes does not
    assert "worker keeps failing" in listing.stdout
    time.sleep(POLICY.initial_delay * 2)
    assert (worker.state, worker.process.pid) == ("failed", None)  # not restarted again


# --- `chatterbot up` itself -------------------------------------------------------------------------------


def _status(data: Path) -> dict[str, dict]:
    status = read_status(data)
    return {c["name"]: c for c in status["components"]} if status else {}


def test_up_in_combined_mode_keeps_serving_while_a_process_restarts_and_stops_cleanly_while_one_is_pending(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATTERBOT_")}
    env.update(CHATTERBOT_SIM_ITL_MS="1", CHATTERBOT_SIM_ITL_AT_MAX_MS="2", CHATTERBOT_SIM_TTFT_MS="5")
    up = [CHATTERBOT, "up", "--data-dir", str(data), "--mode", "combined", "--processes", "2"]
    # First restart 1.5-3 s after an exit, the next one 3-6 s: time to see a restart pending.
    proc = subprocess.Popen(
        [*up, "--restart-delay", "3"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_until(lambda: proc.poll() is not None or len(_status(data)) == 5, 120, "chatterbot up is up")
        assert proc.poll() is None, proc.communicate()[0]
        info = json.loads((data / "up.json").read_text())
        headers = {"X-API-Key": info["api_key"]}

        listing = subprocess.run(
            [CHATTERBOT, "status", "--data-dir", str(data)], capture_output=True, text=True, timeout=30
        )
        assert listing.returncode == 0, listing
        family = psutil.Process(proc.pid).children(recursive=True)
        for name, component in _status(data).items():
            assert name in listing.stdout
            assert component["pid"] in {p.pid for p in family}
            assert (component["state"], component["health"], component["restarts"]) == (
                "running",
                "healthy",
                0,
            )

        mesh_1 = _status(data)["mesh-1"]
        os.kill(mesh_1["pid"], signal.SIGKILL)
        # Once the launcher has seen it gone, its listening sockets are closed.
        wait_until(lambda: _status(data)["mesh-1"]["state"] != "running", 10, "mesh-1 is seen down")
        answered_while_down = 0
        while _status(data)["mesh-1"]["state"] != "running":
            # A new connection each time: the kernel hands it to a process that still listens.
            r = httpx.post(
                f"{info['edge_url']}/chat", headers=headers, json=chat_body(new_user()), timeout=10
            )
            assert r.status_code == 200, r.text
            answered_while_down += 1
        assert answered_while_down >= 3
        back = _status(data)["mesh-1"]
        assert back["restarts"] == 1 and back["pid"] != mesh_1["pid"]
        assert back["last_exit"] == "killed by SIGKILL"
        as_json = subprocess.run(
            [CHATTERBOT, "status", "--data-dir", str(data), "--json"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert as_json.returncode == 0 and json.loads(as_json.stdout)["launcher_running"] is True
        wait_until(
            lambda: httpx.get(f"{info['edge_url']}/health", timeout=10).json()["status"] == "healthy",
            30,
            "/health is healthy again",
        )

        # A second crash in a row: its restart waits 3-6 s. SIGTERM meanwhile stops everything at once.
        family = psutil.Process(proc.pid).children(recursive=True)
        os.kill(back["pid"], signal.SIGKILL)
        wait_until(lambda: _status(data)["mesh-1"]["state"] == "backoff", 10, "a restart is pending")
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, output
        assert "ChatterBot stopped." in output
        assert "restarting mesh-1 (restart 2)" not in output
        _gone, alive = psutil.wait_procs(family, timeout=10)
        assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], alive
        after = subprocess.run(
            [CHATTERBOT, "status", "--data-dir", str(data)], capture_output=True, text=True, timeout=30
        )
        assert after.returncode == 3, after
        assert {c["state"] for c in _status(data).values()} == {"stopped"}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
