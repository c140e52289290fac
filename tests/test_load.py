"""The project's locustfile, run with the stock `locust` command against a real mesh: every user class
makes requests, and none fails."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ops.launcher import Mesh
from tests.meshes import API_KEY

LOCUSTFILE = Path(__file__).resolve().parent / "load" / "locustfile.py"
USER_CLASSES = ("StreamingUser", "ConcurrentUser", "SoakUser", "OpenAIUser", "GrpcUser")


def run_locust(mesh: Mesh, user_class: str, seconds: int = 4, users: int = 4) -> list[dict]:
    """The final per-request stats (locust's `--json`) of a short headless run."""
    env = {
        **mesh.services["edge"].env,
        "CHATTERBOT_API_KEY": API_KEY,
        "CHATTERBOT_GRPC_CHAT": mesh.services["chat"].url,
        "CHATTERBOT_LOAD_MAX_TOKENS": "16",
    }
    out = subprocess.run(
        [
            str(Path(sys.executable).with_name("locust")),
            "-f", str(LOCUSTFILE), "--host", mesh.edge_url, "--headless",
            "-u", str(users), "-r", str(users), "-t", f"{seconds}s", "--stop-timeout", "30",
            "--json", "--only-summary", user_class,
        ],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.stdout.strip(), out.stderr[-3000:]
    return json.loads(out.stdout)


@pytest.mark.parametrize("user_class", USER_CLASSES)
def test_locust_user_class_runs_without_failures(mesh, user_class):
    stats = run_locust(mesh, user_class)
    failures = {s["name"]: s["num_failures"] for s in stats if s["num_failures"]}
    assert not failures, failures
    requests = {(s["method"], s["name"]): s["num_requests"] for s in stats}
    assert sum(requests.values()) > 0, stats


def test_streaming_users_report_time_to_first_token(mesh):
    stats = run_locust(mesh, "StreamingUser")
    kinds = {s["method"] for s in stats if s["num_requests"]}
    assert {"TTFT", "TPS"} <= kinds, kinds


def test_grpc_user_reports_latency_per_rpc(mesh):
    stats = run_locust(mesh, "GrpcUser")
    names = {s["name"] for s in stats if s["method"] == "grpc" and s["num_requests"]}
    assert names == {"ChatService/Chat", "ChatService/StreamChat"}, names
