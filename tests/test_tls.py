"""Mutual TLS between the services, and server TLS on chat_svc's partner port, on a mesh of real processes.

Certificates come from `chatterbot certs`, run as an operator would. The mesh is split (a process per service,
as tests/meshes.py starts them) with CHATTERBOT_GRPC_TLS_* set: every gRPC server asks for a client
certificate signed by the CA, and every client (the edge's, chat_svc's, the workers', context_svc's, the
launcher's health wait, `chatterbot keys`) presents one and checks the server's. Every process here presents
the same certificate (they all dial 127.0.0.1, which each certificate names); a deployment gives each
component its own. chat_svc also listens on a partner port with the `partner` certificate, where grpcurl
(with only the CA, no certificate of its own) and an API key reach it.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import ValidationError

from chatterbot.settings import GRPC_PROCESSES, Settings
from chatterbot.tls import MESH_COMPONENTS, TlsConfigError, load_mesh_tls
from ops.embedded import free_port
from ops.launcher import Mesh
from tests.clients import REPO_ROOT, keys_cli, read_stream, tokens_after_last_restart, wait_done
from tests.meshes import API_KEY, Servers, own_mesh
from tests.test_nginx import GRPCURL

CHATTERBOT = str(Path(sys.executable).with_name("chatterbot"))


@dataclass(frozen=True)
class Certs:
    directory: Path

    def __getitem__(self, name: str) -> str:
        return str(self.directory / name)

    def read(self, name: str) -> bytes:
        return (self.directory / name).read_bytes()

    def client(self, component: str = "edge", *, ca: Certs | None = None) -> grpc.ChannelCredentials:
        """A client presenting `component`'s certificate and trusting `ca`'s CA (default: its own)."""
        return grpc.ssl_channel_credentials(
            root_certificates=(ca or self).read("ca.pem"),
            private_key=self.read(f"{component}-key.pem"),
            certificate_chain=self.read(f"{component}.pem"),
        )


def _certs(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHATTERBOT, "certs", "--out", str(out), *args], capture_output=True, text=True, timeout=60
    )


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    out = tmp_path_factory.mktemp("certs") / "tls"
    made = _certs(out, "--hosts", "{name}.chatterbot.test,192.0.2.7", "--days", "30")
    assert made.returncode == 0, made.stderr
    return Certs(out)


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """Certificates of another CA, with the same names."""
    out = tmp_path_factory.mktemp("other-certs")
    assert _certs(out).returncode == 0
    return Certs(out)


def _mesh_tls(certs: Certs, component: str = "chat") -> dict[str, str]:
    return {
        "grpc_tls_ca": certs["ca.pem"],
        "grpc_tls_cert": certs[f"{component}.pem"],
        "grpc_tls_key": certs[f"{component}-key.pem"],
    }


@pytest.fixture(scope="module")
def tls_mesh(servers: Servers, certs: Certs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    with own_mesh(
        servers,
        tmp_path_factory,
        "tls-mesh",
        # Its own NATS: no plaintext worker of another mesh takes this mesh's jobs.
        own_nats=True,
        **_mesh_tls(certs),
        partner_grpc_port=free_port(),
        partner_tls_cert=certs["partner.pem"],
        partner_tls_key=certs["partner-key.pem"],
    ) as mesh:
        yield mesh


@pytest.fixture
def edge(tls_mesh: Mesh) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=tls_mesh.edge_url, headers={"X-API-Key": API_KEY}, timeout=30) as client:
        yield client


def _addresses(mesh: Mesh) -> dict[str, str]:
    """Where every gRPC process of the mesh listens (the worker: its health address)."""
    return {name: mesh.services[name].env[f"CHATTERBOT_{name.upper()}_ADDR"] for name in GRPC_PROCESSES}


def _health(address: str, credentials: grpc.ChannelCredentials | None) -> int:
    """The health status `address` answers over a channel with `credentials` (None: plaintext)."""
    channel = (
        grpc.insecure_channel(address) if credentials is None else grpc.secure_channel(address, credentials)
    )
    with channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


# --------------------------------------------------------------------------------------------- certificates


def test_certs_writes_a_ca_and_a_key_pair_per_component(certs: Certs) -> None:
    ca = x509.load_pem_x509_certificate(certs.read("ca.pem"))
    for name in (*MESH_COMPONENTS, "partner"):
        certificate = x509.load_pem_x509_certificate(certs.read(f"{name}.pem"))
        certificate.verify_directly_issued_by(ca)
        sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sans.get_values_for_type(x509.DNSName) == [name, "localhost", f"{name}.chatterbot.test"]
        assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == [
            "127.0.0.1",
            "::1",
            "192.0.2.7",
        ]
        usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        # Mesh components are servers and clients; the partner port only ever serves.
        assert (ExtendedKeyUsageOID.CLIENT_AUTH in usages) == (name != "partner")
        assert ExtendedKeyUsageOID.SERVER_AUTH in usages
        assert stat.S_IMODE(os.stat(certs[f"{name}-key.pem"]).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(certs["ca-key.pem"]).st_mode) == 0o600


def test_certs_again_keeps_the_ca_so_issued_certificates_stay_trusted(tmp_path: Path) -> None:
    out = tmp_path / "tls"
    assert _certs(out).returncode == 0
    ca, first = (out / "ca.pem").read_bytes(), (out / "store.pem").read_bytes()
    again = _certs(out, "--hosts", "store.example.com")
    assert again.returncode == 0, again.stderr
    assert "kept the CA" in again.stdout
    assert (out / "ca.pem").read_bytes() == ca
    assert (out / "store.pem").read_bytes() != first
    renewed = x509.load_pem_x509_certificate((out / "store.pem").read_bytes())
    renewed.verify_directly_issued_by(x509.load_pem_x509_certificate(ca))
    sans = renewed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "store.example.com" in sans.get_values_for_type(x509.DNSName)


def test_certs_refuses_a_malformed_host(tmp_path: Path) -> None:
    refused = _certs(tmp_path / "tls", "--hosts", "chat,not a name")
    assert refused.returncode == 2
    assert "'not a name' is neither a DNS name" in refused.stderr
    assert not (tmp_path / "tls").exists()


# ------------------------------------------------------------------------------------------------ settings


def test_partly_set_tls_settings_are_refused_naming_what_is_missing(certs: Certs) -> None:
    with pytest.raises(ValidationError, match="CHATTERBOT_GRPC_TLS_KEY not set"):
        Settings(_env_file=None, grpc_tls_ca=certs["ca.pem"], grpc_tls_cert=certs["chat.pem"])
    with pytest.raises(ValidationError, match="CHATTERBOT_PARTNER_TLS_CERT not set"):
        Settings(_env_file=None, partner_tls_key=certs["partner-key.pem"])
    assert Settings(_env_file=None, **_mesh_tls(certs)).grpc_tls_ca == certs["ca.pem"]


def test_tls_files_that_cannot_work_are_refused_naming_the_setting(
    certs: Certs, other_ca: Certs, tmp_path: Path
) -> None:
    with pytest.raises(TlsConfigError, match=r"CHATTERBOT_GRPC_TLS_KEY: .*store-key.pem is not the key of"):
        load_mesh_tls(certs["ca.pem"], certs["chat.pem"], certs["store-key.pem"])
    with pytest.raises(TlsConfigError, match="is not signed by CHATTERBOT_GRPC_TLS_CA"):
        load_mesh_tls(certs["ca.pem"], other_ca["chat.pem"], other_ca["chat-key.pem"])
    with pytest.raises(TlsConfigError, match="CHATTERBOT_GRPC_TLS_CA: cannot read"):
        load_mesh_tls(str(tmp_path / "missing.pem"), certs["chat.pem"], certs["chat-key.pem"])
    (tmp_path / "garbage.pem").write_text("not a certificate\n")
    with pytest.raises(TlsConfigError, match=r"CHATTERBOT_GRPC_TLS_CERT: .* holds no PEM certificate"):
        load_mesh_tls(certs["ca.pem"], str(tmp_path / "garbage.pem"), certs["chat-key.pem"])


def test_a_service_with_a_mismatched_key_fails_at_start(certs: Certs) -> None:
    """The simulated inference service needs no other server, so only TLS can stop it from starting."""
    env = {
        **os.environ,
        **Settings(_env_file=None, inference_addr=f"127.0.0.1:{free_port()}").to_env(),
        "CHATTERBOT_GRPC_TLS_CA": certs["ca.pem"],
        "CHATTERBOT_GRPC_TLS_CERT": certs["inference.pem"],
        "CHATTERBOT_GRPC_TLS_KEY": certs["chat-key.pem"],
    }
    done = subprocess.run(
        [CHATTERBOT, "serve", "inference"], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    assert "CHATTERBOT_GRPC_TLS_KEY" in done.stderr and "is not the key of" in done.stderr, done.stderr[
        -2000:
    ]


# ---------------------------------------------------------------------------------------------------- mesh


def test_a_mesh_with_mutual_tls_answers_chats_and_streams(edge: httpx.Client) -> None:
    # /health: the edge's own health channels reach every process over mutual TLS.
    health = edge.get("/health").json()
    assert health["status"] == "healthy", health
    reply = edge.post("/chat", json={"message": "hello over mTLS", "user_id": "user-tls-1", "max_tokens": 12})
    assert reply.status_code == 200, reply.text
    assert reply.json()["response"].startswith("[simulated")

    body = {
        "model": "chatterbot-sim-7b-awq",
        "messages": [{"role": "user", "content": "stream over mTLS"}],
        "max_tokens": 16,
        "stream": True,
    }
    with edge.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        data = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    assert "".join(json.loads(d)["choices"][0]["delta"].get("content") or "" for d in data[:-1]).startswith(
        "[simulated"
    )

    # A queued stream: a worker runs the turn, its clients on mutual TLS too.
    cid = edge.post(
        "/stream-chat", json={"message": "queued over mTLS", "user_id": "user-tls-2", "max_tokens": 12}
    ).json()["correlation_id"]
    events = read_stream(edge, cid)
    assert tokens_after_last_restart(events) == wait_done(edge, cid)["response"]


def test_chatterbot_keys_reaches_the_store_over_mutual_tls(tls_mesh: Mesh) -> None:
    listed = keys_cli(tls_mesh, "list", "--admin-key", "test-admin-key")
    assert listed.returncode == 0, listed.stderr
    assert "key(s)" in listed.stderr


def test_mesh_servers_refuse_plaintext_and_certificates_of_another_ca(
    tls_mesh: Mesh, certs: Certs, other_ca: Certs
) -> None:
    serving = health_pb2.HealthCheckResponse.SERVING
    for process, address in _addresses(tls_mesh).items():
        assert _health(address, certs.client()) == serving, process
        refused = {
            "plaintext": None,
            # Trusts the mesh's CA, but presents a certificate of another one.
            "a certificate of another CA": other_ca.client(ca=certs),
            # The right certificate, but the client trusts only the other CA: it refuses the server.
            "a client that trusts another CA": certs.client(ca=other_ca),
        }
        for how, credentials in refused.items():
            with pytest.raises(grpc.RpcError) as failed:
                _health(address, credentials)
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, (process, how)


# ------------------------------------------------------------------------------------------------ partners


def _grpcurl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([GRPCURL, *args], capture_output=True, text=True, timeout=60)


def test_the_partner_port_serves_tls_with_api_keys(tls_mesh: Mesh, certs: Certs) -> None:
    partner = f"127.0.0.1:{tls_mesh.settings.partner_grpc_port}"
    tls = ("-cacert", certs["ca.pem"])
    # Reflection and health are open; no client certificate is asked for.
    listed = _grpcurl(*tls, partner, "list")
    assert listed.returncode == 0, listed.stderr
    assert {"chatterbot.v1.ChatService", "grpc.health.v1.Health"} <= set(listed.stdout.split())
    checked = _grpcurl(*tls, partner, "grpc.health.v1.Health/Check")
    assert json.loads(checked.stdout) == {"status": "SERVING"}, checked.stderr

    turn = json.dumps({"turn": {"user_id": "user-tls-partner", "message": "hello partner", "max_tokens": 12}})
    answered = _grpcurl(
        *tls, "-H", f"x-api-key: {API_KEY}", "-d", turn, partner, "chatterbot.v1.ChatService/Chat"
    )
    assert answered.returncode == 0, answered.stderr
    assert json.loads(answered.stdout)["response"].startswith("[simulated")

    keyless = _grpcurl(*tls, "-d", turn, partner, "chatterbot.v1.ChatService/Chat")
    assert keyless.returncode != 0
    assert "Unauthenticated" in keyless.stderr, keyless.stderr
    # It speaks TLS only: a plaintext client gets no answer.
    plaintext = _grpcurl("-plaintext", partner, "list")
    assert plaintext.returncode != 0
    # And the mesh port itself wants a client certificate, which grpcurl here has not got.
    mesh_port = _grpcurl(*tls, tls_mesh.services["chat"].url, "list")
    assert mesh_port.returncode != 0
