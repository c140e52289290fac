"""Faults under load on a cluster of network namespaces (tests.chaos), CI-sized: an edge, a worker
mid-generation and a NATS node SIGKILLed, and a chat host cut off NATS for 10 s, one at a time under a small
load of sync, polled and streamed chats; then every accepted request is checked against PostgreSQL.

Also: a controller SIGKILLed while its cluster runs leaves nothing that `down` does not remove.
The full run is `make chaos`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos import netns

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and tc need root"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2 (make chaos-deps)"),
    pytest.mark.skipif(
        shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists(),
        reason="needs nginx (make nginx)",
    ),
]


def _chaos(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tests.chaos", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _leftovers() -> list[str]:
    """What a chaos cluster would have left: its namespaces, its state file, service processes in them."""
    left = [f"namespace {ns}" for ns in netns.existing_namespaces()]
    if netns.STATE_FILE.exists():
        left.append(f"state file {netns.STATE_FILE}")
    return left


@pytest.fixture
def no_cluster() -> Iterator[None]:
    if _leftovers():
        pytest.skip(f"a chaos cluster is running or was left: {_leftovers()} (python -m tests.chaos down)")
    yield
    _chaos("down", timeout=120)


def test_a_crashed_controller_leaves_nothing_that_down_does_not_remove(no_cluster: None) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.chaos", "up"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 120
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("chaos cluster up:") or time.monotonic() > deadline:
                break
        assert any(line.startswith("chaos cluster up:") for line in lines), "".join(lines[-30:])
        state = netns.State.load()
        data_dir = Path(state.data_dir)
        in_namespaces = sum(len(netns.pids_in(ns)) for ns in state.namespaces)
        assert len(state.namespaces) == 22 and in_namespaces >= 20 and data_dir.exists()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    down = _chaos("down", timeout=120)
    assert down.returncode == 0, down.stderr
    assert _leftovers() == []
    assert not data_dir.exists()
    assert all(not netns.pids_in(ns) for ns in state.namespaces)


def test_faults_under_load_lose_nothing_and_answer_nothing_twice(no_cluster: None, tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    run = _chaos("run", "--profile", "ci", "--report", str(report_path), timeout=480)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    report = json.loads(report_path.read_text())
    phases = {p["phase"]: p for p in report["phases"]}
    print(run.stdout[-2000:])
    assert list(phases) == [
        "baseline",
        "kill edge",
        "kill worker",
        "kill NATS node",
        "cut chat1-NATS link 10 s",
        "after",
    ]
    for name, p in phases.items():
        assert p["accepted"] >= 5, (name, p)
        assert p["lost"] == 0 and p["twice"] == 0, (name, p["lost_keys"], p["twice_keys"])
        if name not in ("baseline", "after"):
            assert p["recover_seconds"] is not None, (name, p["note"])
    totals = report["totals"]
    assert totals["answered"] + totals["failed"] == totals["accepted"]
    assert _leftovers() == []
