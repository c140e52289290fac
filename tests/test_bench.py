"""`chatterbot bench`: each benchmark run for real, briefly, as the command runs it (its own process, its own
mesh), its JSON checked for the figures it promises and for a clean run."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ops.bench import LoadSpec, run_load
from ops.fake_upstream import FakeUpstreamServer
from ops.launcher import default_processes

ROOT = Path(__file__).resolve().parent.parent


def bench(*args: str, timeout: float) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "ops.bench", *args, "--json", "--no-progress"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return json.loads(done.stdout)


def test_the_load_generator_counts_requests_and_stream_ends_against_the_fake_upstream(tmp_path):
    with FakeUpstreamServer("upstream", tmp_path) as upstream:
        for stream in (False, True):
            body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
            spec = LoadSpec(
                url=f"{upstream.base_url}/chat/completions",
                body=json.dumps(body),
                headers={},
                connections=4,
                duration=0.5,
                warmup=0.1,
                stream=stream,
            )
            result = asyncio.run(run_load(spec))
            assert result.requests > 0 and result.errors == {}
            assert 0 < result.p50_ms <= result.p99_ms <= result.max_ms


@pytest.mark.timeout(200)
def test_gateway_measures_direct_and_both_mesh_modes_without_errors():
    r = bench(
        "gateway", "--duration", "1", "--warmup", "0.3", "--connections", "8", "--mode", "both", timeout=190
    )
    assert r["benchmark"] == "gateway" and r["load_generator"]
    phases = {(p["target"], p["mode"], p["connections"]): p for p in r["phases"]}
    assert set(phases) == {
        (target, mode, c)
        for target in ("direct", "combined", "split")
        for mode in ("non-stream", "stream")
        for c in (8, 1)
    }
    for p in phases.values():
        assert p["requests"] > 0 and p["error_count"] == 0 and p["errors"] == {}, p
        assert p["rps"] > 0 and 0 < p["p50_ms"] <= p["p99_ms"]
        assert set(p["cpu_ms_per_request"]) == {"mesh", "upstream", "client", "by_process"}
    split_cpu = phases[("split", "non-stream", 1)]["cpu_ms_per_request"]
    assert {"edge", "chat", "context", "inference", "store", "worker", "nats", "postgres", "redis"} <= set(
        split_cpu["by_process"]
    )
    combined_cpu = phases[("combined", "non-stream", 8)]["cpu_ms_per_request"]
    # One process per core but one, each running every component.
    processes = {name for name in combined_cpu["by_process"] if name.startswith("mesh-")}
    assert len(processes) == default_processes(), combined_cpu
    for cpu in (split_cpu, combined_cpu):
        assert cpu["mesh"] > 0 and cpu["upstream"] > 0
    added = {(a["target"], a["mode"], a["connections"]): a for a in r["added"]}
    assert set(added) == {
        (target, mode, c)
        for target in ("combined", "split")
        for mode in ("non-stream", "stream")
        for c in (8, 1)
    }
    assert r["stream_content_chunks"]["direct"] == r["answer_tokens"] == 16
    assert r["stream_content_chunks"]["combined"] >= 1 and r["stream_content_chunks"]["split"] >= 1


@pytest.mark.timeout(120)
def test_jobs_backlog_is_drained_with_none_lost_or_doubled():
    r = bench("jobs", "--jobs", "200", "--connections", "20", "--users", "50", timeout=110)
    assert r["submit"]["accepted"] == 200 and r["submit"]["errors"] == {}
    assert r["submit"]["accepted_per_s"] > 0
    assert r["backlog"]["interactive"] == 200  # queued while the workers were stopped
    audit = r["audit"]
    assert audit["distinct_ids"] == audit["succeeded"] == audit["answers_stored"] == 200
    assert audit["lost"] == audit["doubled"] == audit["strays"] == audit["failed"] == 0
    assert r["drain"]["done"] == 200 and r["drain"]["drained_per_s"] > 0


@pytest.mark.timeout(90)
def test_sse_one_edge_holds_every_stream():
    r = bench("sse", "--streams", "200", "--jobs", "20", "--ramp", "1000", "--hold", "2", timeout=80)
    assert r["benchmark"] == "sse" and r["held"] is True
    assert r["answered"] == r["live"] == 200 and r["errors"] == {}
    assert r["in_flight_closed"] == 0
    assert r["rss_open_mb"] > 0 and r["kb_per_stream"] is not None
