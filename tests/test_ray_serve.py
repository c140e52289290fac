"""Ray Serve as the inference tier, on a real local Ray: `ray start --head` on two CPUs, deploy/ray/serve.yaml
deployed with `serve deploy` (its HTTP on a free port of 127.0.0.1, autoscaling delays shortened so that a test
sees them), and a mesh whose inference_svc runs the `openai` engine against it.

- chat, queued streams and the official SDK's streams answer through the mesh with text from the sim engine
  inside the Serve replica;
- a client that hangs up mid-stream stops the replica generating (its running count drops to 0, its aborted
  count rises: read from the replica's `/-/engine`);
- a burst scales the deployment from 1 replica to 2 and back, as `serve status` reports;
- a replica killed mid-stream fails that stream visibly (the SDK raises) and the next turn succeeds;
- deploy/ray/serve.yaml and deploy/ray/serve-llm.yaml validate against Ray's own schema classes.

Runs in the Ray environment: `make test-ray` (tests marked `ray`). Ray is stopped at the end (`ray stop --force`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.ray,
    # Ray's own modules still use deprecated pydantic and Serve options (metrics_interval_s, set here on purpose).
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ray"),
]
pytest.importorskip("ray")

import httpx  # noqa: E402
import openai  # noqa: E402
import yaml  # noqa: E402

from ops.embedded import free_port, port_is_free  # noqa: E402
from ops.launcher import Mesh  # noqa: E402
from tests.clients import read_stream, tokens_after_last_restart, wait_done  # noqa: E402
from tests.meshes import API_KEY, own_mesh  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SERVE_CONFIG = REPO / "deploy" / "ray" / "serve.yaml"
SERVE_LLM_CONFIG = REPO / "deploy" / "ray" / "serve-llm.yaml"
BIN = Path(sys.executable).parent
APP, DEPLOYMENT = "chatterbot", "ChatterBotEngine"
# The model the Ray application serves and the mesh asks for: the sim engine's label names it.
MODEL = "ray-sim"
# Tokens every 20 ms: the edge's longest answer (1,024 tokens) streams for about 20 s, long enough to hang up on
# or to kill its replica midway. Answers run to max_tokens.
SIM_SETTINGS = {
    "sim_ttft_ms": 5,
    "sim_itl_ms": 20,
    "sim_itl_at_max_ms": 25,
    "sim_max_num_seqs": 8,
    "sim_mean_output_tokens": 1_000_000,
}
# Autoscaling that a test can watch: 2 ongoing requests per replica, decisions on 2 s of metrics pushed every
# half second, one second of demand to add a replica, three of quiet to remove one.
AUTOSCALING = {
    "target_ongoing_requests": 2,
    "metrics_interval_s": 0.5,
    "look_back_period_s": 2,
    "upscale_delay_s": 1,
    "downscale_delay_s": 3,
}


@dataclass
class RayServe:
    dashboard: str  # the dashboard's HTTP address, which the `serve` CLI talks to
    url: str  # Serve's HTTP proxy

    def cli(self, *args: str, timeout: float = 120) -> str:
        out = subprocess.run(
            [str(BIN / "serve"), *args, "--address", self.dashboard],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout

    def status(self) -> dict:
        """`serve status`, its YAML read."""
        return yaml.safe_load(self.cli("status", "--name", APP))

    def replica_states(self) -> dict[str, int]:
        """Replicas of the engine deployment by state, as `serve status` reports them."""
        return self.status()["deployments"][DEPLOYMENT]["replica_states"]

    def engine(self) -> dict:
        """The counters of the replica that answers (the only one, where a test needs them)."""
        return httpx.get(f"{self.url}/-/engine", timeout=30).json()


def serve_config_for(port: int) -> dict:
    """deploy/ray/serve.yaml as this machine runs it: HTTP on 127.0.0.1:`port`, the test's model and timing,
    autoscaling shortened."""
    config = yaml.safe_load(SERVE_CONFIG.read_text())
    config["http_options"].update(host="127.0.0.1", port=port)
    (app,) = config["applications"]
    app["args"] = {"engine": "sim", "model": MODEL, "settings": SIM_SETTINGS}
    (deployment,) = app["deployments"]
    deployment["max_ongoing_requests"] = 8
    deployment["autoscaling_config"].update(AUTOSCALING)
    return config


def wait_for(check, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)


def ray_ports(count: int) -> list[int]:
    """Free ports for Ray to bind, now and as it starts workers later: below the range the project's own
    free_port picks from (10000 up, where the mesh's servers go) and the kernel's ephemeral range (outgoing
    connections), so nothing else takes one before Ray binds it. Ray's default worker range, 10002-19999,
    is where the mesh's ports are."""
    ports = [port for port in random.sample(range(2000, 8000), 6000) if port_is_free(port)]
    return ports[:count]


def answers(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(url, timeout=5).status_code == 200
    return False


@pytest.fixture(scope="module")
def ray_serve() -> Iterator[RayServe]:
    """A one-node Ray on two CPUs, every address on 127.0.0.1, with the application deployed (~40 s)."""
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay short
    gcs, client, dashboard_port, agent, *workers = ray_ports(4 + 40)
    serve_port = free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    start = [
        str(BIN / "ray"), "start", "--head", "--num-cpus=2", "--node-ip-address=127.0.0.1",
        f"--port={gcs}", f"--ray-client-server-port={client}", f"--worker-port-list={','.join(map(str, workers))}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
        f"--dashboard-agent-listen-port={agent}", "--object-store-memory=100000000",
        f"--temp-dir={temp}", "--disable-usage-stats",
    ]  # fmt: skip
    config = Path(temp) / "serve.yaml"
    config.write_text(yaml.safe_dump(serve_config_for(serve_port), sort_keys=False))
    began = time.perf_counter()
    try:
        out = subprocess.run(start, capture_output=True, text=True, env=env, timeout=180)
        assert out.returncode == 0, out.stdout + out.stderr
        started = time.perf_counter()
        serve = RayServe(f"http://127.0.0.1:{dashboard_port}", f"http://127.0.0.1:{serve_port}")
        serve.cli("deploy", str(config))
        wait_for(lambda: answers(f"{serve.url}/v1/models"), 120, "the application to answer", 0.5)
        assert serve.status()["status"] == "RUNNING"
        print(
            f"\nray start {started - began:.1f} s, then serve deploy: RUNNING "
            f"{time.perf_counter() - started:.1f} s later"
        )
        yield serve
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], capture_output=True, env=env, timeout=120)
        subprocess.run(["rm", "-rf", temp], check=False)


@pytest.fixture(scope="module")
def ray_mesh(servers, ray_serve: RayServe, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """A mesh whose inference_svc streams from the Ray Serve application with the `openai` engine."""
    with own_mesh(
        servers,
        tmp_path_factory,
        "ray-mesh",
        inference_engine="openai",
        openai_base_url=f"{ray_serve.url}/v1",
        model_name=MODEL,
        openai_timeout_seconds=60.0,
    ) as m:
        yield m


@pytest.fixture
def edge(ray_mesh: Mesh) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=ray_mesh.edge_url, headers={"X-API-Key": API_KEY}, timeout=60) as client:
        yield client


@pytest.fixture
def sdk(ray_mesh: Mesh) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{ray_mesh.edge_url}/v1", api_key=API_KEY, max_retries=0, timeout=60) as c:
        yield c


def simulated_by_ray(text: str) -> bool:
    return text.startswith(f"[simulated {MODEL}:")


# --- the configs, against Ray's own schema classes ---


def test_the_serve_configs_validate_against_rays_schemas() -> None:
    from ray.llm._internal.serve.core.configs.llm_config import LLMConfig
    from ray.serve.schema import ServeDeploySchema

    from inference_svc.ray_serve import app_builder

    serve = ServeDeploySchema.model_validate(yaml.safe_load(SERVE_CONFIG.read_text()))
    (app,) = serve.applications
    assert app.import_path == "inference_svc.ray_serve:app_builder"
    (deployment,) = app.deployments
    scaling = deployment.autoscaling_config
    assert scaling["min_replicas"] < scaling["max_replicas"]
    assert scaling["target_ongoing_requests"] < deployment.max_ongoing_requests
    assert deployment.ray_actor_options.num_cpus * scaling["max_replicas"] <= 2  # two replicas on two CPUs
    assert app_builder(app.args) is not None  # the args are the builder's
    with pytest.raises(ValueError, match="unknown args"):
        app_builder({**app.args, "replicas": 3})
    ServeDeploySchema.model_validate(serve_config_for(8000))

    # ray.serve.llm's LLMConfig (re-exported there; imported from where it lives, which needs no vLLM).
    llm = ServeDeploySchema.model_validate(yaml.safe_load(SERVE_LLM_CONFIG.read_text()))
    (llm_app,) = llm.applications
    assert llm_app.import_path == "ray.serve.llm:build_openai_app"
    for entry in llm_app.args["llm_configs"]:
        config = LLMConfig.model_validate(entry)
        assert config.accelerator_type and config.engine_kwargs["quantization"] == "awq"
        assert config.deployment_config["autoscaling_config"]["max_replicas"] >= 1
    with pytest.raises(ValueError):
        LLMConfig.model_validate({**entry, "accelerator_type": "no-such-gpu"})


# --- a mesh on Ray Serve ---


def test_the_mesh_answers_through_ray_serve(edge: httpx.Client, sdk: openai.OpenAI) -> None:
    chat = edge.post("/chat", json={"message": "Hello, Ray!", "user_id": "user-ray-1", "max_tokens": 12})
    assert chat.status_code == 200, chat.text
    assert simulated_by_ray(chat.json()["response"])

    accepted = edge.post(
        "/stream-chat", json={"message": "Stream, Ray", "user_id": "user-ray-2", "max_tokens": 12}
    )
    assert accepted.status_code == 200, accepted.text
    cid = accepted.json()["correlation_id"]
    events = read_stream(edge, cid)
    assert events[-1][2] == "[DONE]"
    text = tokens_after_last_restart(events)
    assert simulated_by_ray(text)
    assert text == wait_done(edge, cid)["response"]

    stream = sdk.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Stream through the SDK"}],
        stream=True,
        stream_options={"include_usage": True},
        max_completion_tokens=12,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert simulated_by_ray(text)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12


def test_a_client_that_hangs_up_stops_the_replica_generating(ray_serve: RayServe, sdk: openai.OpenAI) -> None:
    before = ray_serve.engine()
    stream = sdk.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "A long answer, please"}],
        stream=True,
        max_completion_tokens=1024,
    )
    received = 0
    for chunk in stream:
        received += bool(chunk.choices and chunk.choices[0].delta.content)
        if received == 5:
            break
    generating = ray_serve.engine()
    assert generating["replica"] == before["replica"] and generating["running"] == 1

    stream.close()  # edge → chat_svc → inference_svc → Serve's proxy → the replica
    hung_up = time.monotonic()

    after = wait_for(
        lambda: (e := ray_serve.engine())["running"] == 0 and e, 15, "the replica to stop generating", 0.05
    )
    print(f"\nreplica {after['replica']}: running 0, aborted {before['aborted']} → {after['aborted']} "
          f"{time.monotonic() - hung_up:.2f} s after the hang-up")  # fmt: skip
    assert after["aborted"] == before["aborted"] + 1
    assert after["completed"] == before["completed"]


async def test_a_burst_scales_the_deployment_out_and_back_in(ray_serve: RayServe) -> None:
    assert await asyncio.to_thread(ray_serve.replica_states) == {"RUNNING": 1}
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "burst"}],
        "max_tokens": 5000,
        "stream": True,
    }
    tokens = [0] * 6

    async def stream(client: httpx.AsyncClient, i: int) -> None:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                tokens[i] += line.startswith("data:")

    began = time.perf_counter()
    async with httpx.AsyncClient(base_url=ray_serve.url, timeout=60) as client:
        streams = [asyncio.create_task(stream(client, i)) for i in range(len(tokens))]
        try:
            await asyncio.to_thread(
                wait_for, lambda: ray_serve.replica_states().get("RUNNING") == 2, 60, "a second replica", 0.2
            )
            scaled_out = time.perf_counter() - began
            assert all(tokens) and not any(s.done() for s in streams)  # the burst is still going on
        finally:
            for task in streams:
                task.cancel()
            await asyncio.gather(*streams, return_exceptions=True)
    quiet = time.perf_counter()
    states = await asyncio.to_thread(
        wait_for,
        lambda: (s := ray_serve.replica_states()) == {"RUNNING": 1} and s,
        60,
        "one replica again",
        0.2,
    )
    print(f"\nserve status: 1 → 2 RUNNING {scaled_out:.1f} s into the burst, back to {states} "
          f"{time.perf_counter() - quiet:.1f} s after it")  # fmt: skip


def test_a_replica_killed_mid_stream_fails_that_stream_and_the_next_turn_succeeds(
    ray_serve: RayServe, sdk: openai.OpenAI
) -> None:
    assert ray_serve.replica_states() == {"RUNNING": 1}
    victim = ray_serve.engine()
    stream = sdk.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "An answer its replica will not finish"}],
        stream=True,
        max_completion_tokens=1024,
    )
    text, finishes = [], []
    killed = 0.0
    with pytest.raises(openai.APIError) as failed:
        for chunk in stream:
            if chunk.choices:
                text.append(chunk.choices[0].delta.content or "")
                finishes.append(chunk.choices[0].finish_reason)
            if len(text) == 10 and not killed:
                os.kill(victim["pid"], signal.SIGKILL)
                killed = time.monotonic()
    failed_after = time.monotonic() - killed
    assert simulated_by_ray("".join(text)) and not any(finishes)  # a beginning, and no end passed off as one

    answer = sdk.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Are you there?"}], max_completion_tokens=12
    )
    assert simulated_by_ray(answer.choices[0].message.content or "")
    answered_after = time.monotonic() - killed
    successor = ray_serve.engine()
    assert successor["pid"] != victim["pid"]
    wait_for(lambda: ray_serve.replica_states() == {"RUNNING": 1}, 30, "Serve to replace the replica")
    print(f"\nreplica {victim['replica']} (pid {victim['pid']}) killed after {len(text)} chunks: the stream "
          f"failed {failed_after:.2f} s later ({failed.value!r}); the next turn was answered {answered_after:.1f} s "
          f"after the kill, by replica {successor['replica']}")  # fmt: skip
