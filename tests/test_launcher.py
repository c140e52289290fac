"""`chatterbot up` as a user runs it: embedded servers, five services, healthy, then a clean stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from ops.launcher import default_processes


def _wait_for_up_json(path: Path, proc: subprocess.Popen, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"chatterbot up exited with {proc.returncode}:\n{proc.stdout.read()}")
        if path.exists():
            return json.loads(path.read_text())
        time.sleep(0.2)
    raise AssertionError("chatterbot up did not write up.json in time")


@pytest.mark.parametrize(("cores", "processes"), [(1, 1), (2, 1), (4, 3), (16, 15)])
def test_a_combined_mesh_leaves_one_core_to_what_shares_the_machine(cores: int, processes: int) -> None:
    assert default_processes(cores) == processes


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_chatterbot_up_reaches_healthy_and_stops_with_nothing_left(tmp_path, stop_signal):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATTERBOT_")}
    env.update(CHATTERBOT_SIM_ITL_MS="1", CHATTERBOT_SIM_ITL_AT_MAX_MS="2", CHATTERBOT_SIM_TTFT_MS="5")
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("chatterbot")), "up", "--data-dir", str(tmp_path / "data")],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        info = _wait_for_up_json(tmp_path / "data" / "up.json", proc, timeout=120)
        assert set(info["grpc"]) == {"chat", "context", "inference", "store"}
        assert info["api_key"] != info["admin_key"]

        health = httpx.get(f"{info['edge_url']}/health", timeout=10).json()
        assert health["status"] == "healthy", health
        r = httpx.post(
            f"{info['edge_url']}/chat",
            headers={"X-API-Key": info["api_key"]},
            timeout=30,
            json={"message": "hello from a fresh mesh", "user_id": "user-up"},
        )
        assert r.status_code == 200, r.text

        # Every process of the mesh: the launcher's children (servers, services) and theirs (postgres workers).
        family = psutil.Process(proc.pid).children(recursive=True)
        assert len(family) >= 8
        proc.send_signal(stop_signal)
        output, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, output
        assert "ChatterBot stopped." in output
        _gone, alive = psutil.wait_procs(family, timeout=10)
        assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], alive
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_chatterbot_up_keeps_data_and_keys_between_runs(tmp_path):
    """A second `up` on the same data dir finds the first run's conversation and keys."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATTERBOT_")}
    data = tmp_path / "data"
    seen = []
    for _ in range(2):
        (data / "up.json").unlink(missing_ok=True)
        proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("chatterbot")), "up", "--data-dir", str(data)],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            info = _wait_for_up_json(data / "up.json", proc, timeout=120)
            headers = {"X-API-Key": info["api_key"]}
            if not seen:
                r = httpx.post(
                    f"{info['edge_url']}/chat",
                    headers=headers,
                    timeout=30,
                    json={"message": "remember me", "user_id": "user-persist", "conversation_id": "c1"},
                )
                assert r.status_code == 200, r.text
            else:
                r = httpx.post(
                    f"{info['edge_url']}/chat",
                    headers=headers,
                    timeout=30,
                    json={"message": "still there?", "user_id": "user-persist", "conversation_id": "c1"},
                )
                assert r.status_code == 200, r.text
                assert "4 messages" in r.json()["response"]
            seen.append(info["api_key"])
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert seen[0] == seen[1]
