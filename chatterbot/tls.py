"""TLS for gRPC: mutual TLS inside the mesh, server TLS on the partner port, and a development CA.

- Mesh (`CHATTERBOT_GRPC_TLS_CA`, `_CERT`, `_KEY`): every gRPC server asks each client for a certificate signed
  by the CA, and every client presents its own and checks the server's against the CA and the name it dials
  (`chat:50051` needs `chat` among the certificate's names). All three empty: plaintext.
- Partner port (`CHATTERBOT_PARTNER_TLS_CERT`, `_KEY`): server TLS only; partners authenticate with API keys.

The files are read and checked when a server or channel is made, that is at start: a path that cannot be read,
a key that is not the certificate's, an expired certificate or one the mesh CA did not sign fails the process
then, naming the setting, rather than as handshakes that fail later. A renewed certificate is read by the next
process start (a rolling restart).

`write_dev_certificates` (`chatterbot certs`) makes a CA and a certificate per component for development.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from chatterbot.settings import Settings

# The components `chatterbot certs` makes a certificate for: every process of the mesh, each a client of some
# and most a server too, and the partner port's (a server certificate only).
MESH_COMPONENTS = ("chat", "context", "inference", "store", "worker", "edge")
PARTNER = "partner"
CA_FILE, CA_KEY_FILE = "ca.pem", "ca-key.pem"
# Names every development certificate carries besides its component's, so it also serves on this machine.
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
# A DNS name, optionally a wildcard; `{name}` in a --hosts entry stands for the component.
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"(\*\.)?{_LABEL}(\.{_LABEL})*")


class TlsConfigError(ValueError):
    """A TLS setting that cannot work; the message names the setting."""


@dataclass(frozen=True)
class KeyPair:
    """A PEM certificate chain and its private key."""

    certificate_chain: bytes
    private_key: bytes


@dataclass(frozen=True)
class MeshTls:
    """What one process of the mesh needs for mutual TLS."""

    root_certificates: bytes
    identity: KeyPair


def _read(setting: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TlsConfigError(f"{setting}: cannot read {path}: {exc.strerror or exc}") from None


def _certificates(setting: str, path: str, data: bytes) -> list[x509.Certificate]:
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TlsConfigError(f"{setting}: {path} holds no PEM certificate") from None
    now = datetime.datetime.now(datetime.UTC)
    for certificate in certificates:
        if certificate.not_valid_after_utc <= now:
            raise TlsConfigError(
                f"{setting}: the certificate {certificate.subject.rfc4514_string()} in {path} expired on "
                f"{certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
            )
    return certificates


def _spki(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_key_pair(cert_setting: str, cert_path: str, key_setting: str, key_path: str) -> KeyPair:
    """The certificate chain and key at these paths, checked: they parse, belong together and are in date."""
    chain = _read(cert_setting, cert_path)
    leaf = _certificates(cert_setting, cert_path, chain)[0]
    key = _read(key_setting, key_path)
    try:
        private = serialization.load_pem_private_key(key, password=None)
    except TypeError:
        raise TlsConfigError(
            f"{key_setting}: {key_path} is encrypted; give the key without a passphrase"
        ) from None
    except ValueError:
        raise TlsConfigError(f"{key_setting}: {key_path} holds no PEM private key") from None
    if _spki(private.public_key()) != _spki(leaf.public_key()):
        raise TlsConfigError(f"{key_setting}: {key_path} is not the key of {cert_setting} ({cert_path})")
    return KeyPair(chain, key)


def load_mesh_tls(ca: str, cert: str, key: str) -> MeshTls | None:
    """Mutual TLS from these PEM paths (the `CHATTERBOT_GRPC_TLS_*` values); None when all are empty."""
    names = ("CHATTERBOT_GRPC_TLS_CA", "CHATTERBOT_GRPC_TLS_CERT", "CHATTERBOT_GRPC_TLS_KEY")
    if not (ca or cert or key):
        return None
    unset = [name for name, value in zip(names, (ca, cert, key), strict=True) if not value]
    if unset:
        raise TlsConfigError(f"{', '.join(unset)} not set: set all of {', '.join(names)}, or none of them")
    roots = _read(names[0], ca)
    authorities = _certificates(names[0], ca, roots)
    identity = load_key_pair(names[1], cert, names[2], key)
    chain = x509.load_pem_x509_certificates(identity.certificate_chain)
    if not any(_issued_by(certificate, authorities) for certificate in chain):
        raise TlsConfigError(
            f"CHATTERBOT_GRPC_TLS_CERT: {cert} is not signed by CHATTERBOT_GRPC_TLS_CA ({ca}); every peer "
            "would refuse it"
        )
    return MeshTls(roots, identity)


def _issued_by(certificate: x509.Certificate, authorities: Iterable[x509.Certificate]) -> bool:
    for authority in authorities:
        try:
            certificate.verify_directly_issued_by(authority)
            return True
        except (ValueError, TypeError, InvalidSignature):
            continue
    return False


def mesh_tls(settings: Settings) -> MeshTls | None:
    """This process's mutual TLS, or None when the mesh runs plaintext."""
    return load_mesh_tls(settings.grpc_tls_ca, settings.grpc_tls_cert, settings.grpc_tls_key)


def mesh_server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """Server credentials that require a client certificate signed by the mesh CA; None: plaintext."""
    tls = mesh_tls(settings)
    if tls is None:
        return None
    return grpc.ssl_server_credentials(
        [(tls.identity.private_key, tls.identity.certificate_chain)],
        root_certificates=tls.root_certificates,
        require_client_auth=True,
    )


def channel_credentials(tls: MeshTls) -> grpc.ChannelCredentials:
    """Client credentials that present this process's certificate and check the server's against the CA."""
    return grpc.ssl_channel_credentials(
        root_certificates=tls.root_certificates,
        private_key=tls.identity.private_key,
        certificate_chain=tls.identity.certificate_chain,
    )


def mesh_channel_credentials(settings: Settings) -> grpc.ChannelCredentials | None:
    """Credentials of a channel to another service of the mesh; None: plaintext."""
    tls = mesh_tls(settings)
    return None if tls is None else channel_credentials(tls)


def partner_server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """Server TLS of the partner port (no client certificate); None: plaintext."""
    if not (settings.partner_tls_cert or settings.partner_tls_key):
        return None
    if not (settings.partner_tls_cert and settings.partner_tls_key):
        raise TlsConfigError(
            "set both CHATTERBOT_PARTNER_TLS_CERT and CHATTERBOT_PARTNER_TLS_KEY, or neither"
        )
    pair = load_key_pair(
        "CHATTERBOT_PARTNER_TLS_CERT",
        settings.partner_tls_cert,
        "CHATTERBOT_PARTNER_TLS_KEY",
        settings.partner_tls_key,
    )
    return grpc.ssl_server_credentials([(pair.private_key, pair.certificate_chain)])


# --- a development CA ----------------------------------------------------------------------------------------


def parse_hosts(text: str) -> list[str]:
    """Extra certificate names from `--hosts` (comma-separated DNS names, wildcards, IP addresses; `{name}` is
    replaced by each component's name); ValueError naming a malformed entry."""
    hosts = [entry.strip() for entry in text.split(",") if entry.strip()]
    for entry in hosts:
        if not _is_ip(entry) and not _DNS_NAME.fullmatch(entry.replace("{name}", "x")):
            raise ValueError(f"{entry!r} is neither a DNS name (a.b.c, *.b.c) nor an IP address")
    return hosts


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _subject_alternative_names(names: Iterable[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):  # in order, once each
        entries.append(x509.IPAddress(ipaddress.ip_address(name)) if _is_ip(name) else x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _new_key() -> ec.EllipticCurvePrivateKey:
    # P-256: fast handshakes, and what every TLS stack (BoringSSL in gRPC, Go's in grpcurl, nginx) accepts.
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass(frozen=True)
class Authority:
    """A CA that signs development certificates."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(cls, days: int) -> Authority:
        key = _new_key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ChatterBot development CA")])
        now = datetime.datetime.now(datetime.UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(certificate, key)

    @classmethod
    def load(cls, certificate_path: Path, key_path: Path) -> Authority:
        certificate = x509.load_pem_x509_certificate(certificate_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{key_path} is not an EC key made by `chatterbot certs`")
        return cls(certificate, key)

    def issue(self, component: str, names: Sequence[str], days: int, *, client: bool) -> tuple[bytes, bytes]:
        """A certificate for `component` with `names` as its SANs, and its key (PEM); `client` also allows it
        as a client certificate (mesh components are both)."""
        key = _new_key()
        now = datetime.datetime.now(datetime.UTC)
        usages = [ExtendedKeyUsageOID.SERVER_AUTH, *([ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])]
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"chatterbot {component}")]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            # Never past the CA's own end: a chain is only as valid as its CA.
            .not_valid_after(min(now + datetime.timedelta(days=days), self.certificate.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(_subject_alternative_names(names), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        return certificate.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def _write(path: Path, data: bytes, mode: int) -> None:
    # Created with its mode, then replaced whole: a key is never readable by others, not even for a moment.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.chmod(tmp, mode)  # whatever the umask
    os.replace(tmp, path)


@dataclass(frozen=True)
class DevCertificates:
    """What `write_dev_certificates` did."""

    directory: Path
    created_ca: bool
    # component -> the names its certificate carries
    names: dict[str, list[str]]


def write_dev_certificates(out: Path, hosts: Sequence[str] = (), days: int = 365) -> DevCertificates:
    """A CA (`ca.pem`, `ca-key.pem`; kept when `out` already has one, so certificates issued before stay
    trusted) and, for every mesh component and the partner port, `<name>.pem` and `<name>-key.pem` (keys mode
    0600). Each certificate names its component, `LOCAL_NAMES` and `hosts` (`{name}` replaced)."""
    if days < 1:
        raise ValueError("--days must be 1 or more")
    out.mkdir(parents=True, exist_ok=True)
    ca_path, ca_key_path = out / CA_FILE, out / CA_KEY_FILE
    created = not (ca_path.exists() and ca_key_path.exists())
    if created:
        authority = Authority.create(days)
        _write(ca_key_path, _key_pem(authority.key), 0o600)
        _write(ca_path, authority.certificate.public_bytes(serialization.Encoding.PEM), 0o644)
    else:
        authority = Authority.load(ca_path, ca_key_path)
    issued: dict[str, list[str]] = {}
    for component in (*MESH_COMPONENTS, PARTNER):
        names = [component, *LOCAL_NAMES, *(host.replace("{name}", component) for host in hosts)]
        certificate, key = authority.issue(component, names, days, client=component != PARTNER)
        _write(out / f"{component}-key.pem", key, 0o600)
        _write(out / f"{component}.pem", certificate, 0o644)
        issued[component] = list(dict.fromkeys(names))
    return DevCertificates(out, created, issued)


__all__ = [
    "MESH_COMPONENTS",
    "PARTNER",
    "Authority",
    "DevCertificates",
    "KeyPair",
    "MeshTls",
    "TlsConfigError",
    "channel_credentials",
    "load_key_pair",
    "load_mesh_tls",
    "mesh_channel_credentials",
    "mesh_server_credentials",
    "mesh_tls",
    "parse_hosts",
    "partner_server_credentials",
    "write_dev_certificates",
]
