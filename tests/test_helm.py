"""The Helm chart (deploy/helm/chatterbot), rendered by a real `helm template` (helm 3.17.3, `make helm`).

- `helm lint --strict` and `helm template` for the default profile (sim engine, no GPU), values-gpu.yaml (vLLM,
  AWQ, nvidia.com/gpu) and a profile with mesh TLS, the partner port and its TLS, both Ingresses and Sentinels;
- every rendered object against its schema: the Kubernetes OpenAPI schemas (`kubernetes-validate`, strict, 1.30
  and the newest bundled), KEDA's ScaledObject and prometheus-operator's ServiceMonitor and PrometheusRule against
  models generated from their CRDs (cloudcoil), strict types and no unknown field, and KubeRay's RayService
  (values-ray.yaml) against the openAPIV3Schema of its CRD (tests/crds/README.md), no unknown field either;
- the cross-object checks a schema cannot make: selectors, probe ports and health service names, Settings names,
  addresses against Services, HPA/KEDA targets and JetStream consumers, GPU requests, requests within limits,
  PDBs, the migration hook, Ingress annotations, TLS files against what `chatterbot certs` writes;
- the probe used under mesh TLS, run against a real mutual-TLS health server;
- NetworkPolicies, evaluated as Kubernetes does for every pair of pods and port;
- alert rules: `promtool check rules`, and `promtool test rules` firing (and not firing) each alert on synthetic
  series; rules and dashboard queries use only series the code (or prometheus-nats-exporter) exports.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tomllib
from concurrent import futures
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from chatterbot.jetstream import DLQ_STREAM, JOBS_STREAM, PRIORITIES, nats_servers
from chatterbot.settings import GRPC_PROCESSES, Settings

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
CHART = DEPLOY / "helm" / "chatterbot"
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
HELM_VERSION = "v3.17.3"
HELM = os.environ.get("HELM_BIN") or str(Path.home() / ".cache/chatterbot/tools/helm-3.17.3/helm")
RELEASE, NAMESPACE = "chatterbot", "chatterbot"

SETTINGS_ENV = {f"CHATTERBOT_{name.upper()}" for name in Settings.model_fields}
# Environment variables the chart may set that are not ChatterBot settings: uvicorn's trusted proxies.
OTHER_ENV = {"FORWARDED_ALLOW_IPS"}
TIERS = ("edge", "chat", "context", "inference", "store", "worker")
GRPC_PORTS = {
    name: int(Settings.model_fields[f"{name}_addr"].default.rsplit(":", 1)[1]) for name in GRPC_PROCESSES
}
EDGE_PORT = 8000
METRICS_PORT = 9100
PARTNER_PORT = 50061
HEALTH_LIVENESS = "liveness"
JOB_CONSUMERS = {name: durable for name, (_, durable) in PRIORITIES.items()}
# Kubernetes releases whose schemas the chart must satisfy: an older supported one and the newest bundled.
K8S_VERSIONS = ("1.30.0", "latest")

PARTNER_TLS = [
    "--set",
    "tls.enabled=true",
    "--set",
    "partner.enabled=true",
    "--set",
    "partner.tls.secretName=partner-tls",
    "--set",
    "ingress.enabled=true",
    "--set-json",
    'ingress.tls=[{"secretName":"chat-tls","hosts":["chat.chatterbot.example.com"]}]',
    "--set",
    "partner.ingress.enabled=true",
    "--set-json",
    'partner.ingress.tls=[{"secretName":"grpc-tls","hosts":["grpc.chatterbot.example.com"]}]',
    "--set-json",
    'redis.sentinels=["sentinel-0.sentinel:26379","sentinel-1.sentinel:26379"]',
    "--set",
    "redis.sentinelPassword=s3cret",
    "--set-json",
    'secrets.apiKeys=["service-key"]',
    "--set-json",
    'secrets.adminKeys=["admin-key"]',
]
PROFILES = {
    "default": [],
    "gpu": ["-f", str(CHART / "values-gpu.yaml")],
    "partner-tls": PARTNER_TLS,
    "ray": ["-f", str(CHART / "values-ray.yaml")],
}


def _name(tier: str) -> str:
    return f"{RELEASE}-{tier}"


# ------------------------------------------------------------------------------------------ helm


def _helm(*args: str) -> subprocess.CompletedProcess[str]:
    if not Path(HELM).is_file():
        pytest.fail(f"helm not found at {HELM}: run `make helm` (or set HELM_BIN)")
    return subprocess.run([HELM, *args], check=False, capture_output=True, text=True, timeout=120)


@functools.lru_cache
def render(*args: str) -> tuple[dict, ...]:
    """The objects `helm template` renders with these extra arguments."""
    result = _helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args)
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def _objects(profile: str) -> tuple[dict, ...]:
    return render(*PROFILES[profile])


def by_kind(docs, kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


def _containers(workload: dict) -> list[dict]:
    return workload["spec"]["template"]["spec"]["containers"]


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def _port_names_and_numbers(container: dict) -> set:
    ports = container.get("ports") or []
    return {p["containerPort"] for p in ports} | {p["name"] for p in ports if "name" in p}


def _doc_id(doc: dict) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


def test_helm_is_the_pinned_release():
    result = _helm("version", "--short")
    assert result.returncode == 0 and result.stdout.startswith(HELM_VERSION + "+"), result.stdout


def test_the_chart_is_the_one_kubernetes_source():
    assert not (DEPLOY / "k8s").exists(), "deploy/k8s was replaced by the chart"
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "chatterbot"


@pytest.mark.parametrize("profile", PROFILES)
def test_helm_lint(profile):
    result = _helm("lint", "--strict", str(CHART), *PROFILES[profile])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("profile", PROFILES)
def test_rendered_objects_have_the_release_identity(profile):
    docs = _objects(profile)
    ids = [_doc_id(doc) for doc in docs]
    assert len(set(ids)) == len(ids), "two objects of one kind share a name"
    for doc in docs:
        meta = doc["metadata"]
        assert meta["name"].startswith(RELEASE), _doc_id(doc)
        assert meta["labels"]["app.kubernetes.io/instance"] == RELEASE, _doc_id(doc)
        assert meta["labels"]["app.kubernetes.io/name"] == "chatterbot", _doc_id(doc)
        # Helm sets the namespace; only the dashboard may go where Grafana's sidecar looks.
        assert meta.get("namespace", NAMESPACE) == NAMESPACE, _doc_id(doc)


# ------------------------------------------------------------------------------------- schemas

# Custom resources, validated against models generated from their CRDs.
CRD_MODELS = {
    ("keda.sh/v1alpha1", "ScaledObject"): ("cloudcoil.models.keda.v1alpha1", "ScaledObject"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"): (
        "cloudcoil.models.prometheus_operator.v1",
        "ServiceMonitor",
    ),
    ("monitoring.coreos.com/v1", "PrometheusRule"): (
        "cloudcoil.models.prometheus_operator.v1",
        "PrometheusRule",
    ),
}


def _unknown_fields(given, known, path: str = "") -> list[str]:
    """Keys of `given` that a model dropped when it read it: fields its schema does not have."""
    if isinstance(given, dict) and isinstance(known, dict):
        return [
            problem
            for key, value in given.items()
            for problem in (
                [f"{path}.{key}"] if key not in known else _unknown_fields(value, known[key], f"{path}.{key}")
            )
        ]
    if isinstance(given, list) and isinstance(known, list) and len(given) == len(known):
        return [
            p
            for i, (g, k) in enumerate(zip(given, known, strict=True))
            for p in _unknown_fields(g, k, f"{path}[{i}]")
        ]
    return []


# Custom resources whose CRD has no model package, validated against its openAPIV3Schema (vendored in tests/crds).
CRD_SCHEMAS = {("ray.io/v1", "RayService"): REPO / "tests" / "crds" / "ray.io_rayservices.v1.schema.json"}


def _closed(schema):
    """A CRD schema that refuses unknown fields, as the API server prunes them: every object with properties
    allows only those, unless the CRD keeps unknown fields there (x-kubernetes-preserve-unknown-fields)."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {k: _closed(v) for k, v in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        closed["additionalProperties"] = False
    return closed


@functools.lru_cache
def _crd_validator(path: Path):
    import jsonschema

    return jsonschema.Draft7Validator(_closed(json.loads(path.read_text())))


def _validate_against_crd_schema(doc: dict) -> None:
    errors = sorted(
        _crd_validator(CRD_SCHEMAS[(doc["apiVersion"], doc["kind"])]).iter_errors(doc), key=lambda e: e.path
    )
    assert not errors, f"{_doc_id(doc)}: " + "; ".join(
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors
    )


def _validate_custom_resource(doc: dict) -> None:
    if (doc["apiVersion"], doc["kind"]) in CRD_SCHEMAS:
        _validate_against_crd_schema(doc)
        return
    module, name = CRD_MODELS[(doc["apiVersion"], doc["kind"])]
    model = getattr(importlib.import_module(module), name)
    parsed = model.model_validate_json(json.dumps(doc), strict=True)
    unknown = _unknown_fields(doc, parsed.model_dump(mode="json", by_alias=True, exclude_unset=True))
    assert not unknown, f"{_doc_id(doc)}: fields its CRD does not have: {unknown}"


@pytest.mark.parametrize("profile", PROFILES)
def test_every_object_matches_its_schema(profile):
    import kubernetes_validate

    versions = [kubernetes_validate.latest_version() if v == "latest" else v for v in K8S_VERSIONS]
    kinds = set()
    for doc in _objects(profile):
        kinds.add(doc["kind"])
        if (doc["apiVersion"], doc["kind"]) in CRD_MODELS | CRD_SCHEMAS:
            _validate_custom_resource(doc)
            continue
        for version in versions:
            kubernetes_validate.validate(doc, version, strict=True)
    assert {"ScaledObject", "ServiceMonitor", "PrometheusRule", "NetworkPolicy"} <= kinds


def test_custom_resource_schemas_catch_mistakes():
    """The CRD models refuse a wrong type and an unknown field, so the check above can fail."""
    (scaled,) = by_kind(_objects("default"), "ScaledObject").values()
    wrong_type = json.loads(json.dumps(scaled))
    wrong_type["spec"]["minReplicaCount"] = "1"
    with pytest.raises(ValueError, match="minReplicaCount"):
        _validate_custom_resource(wrong_type)
    unknown = json.loads(json.dumps(scaled))
    unknown["spec"]["minReplicas"] = 1
    with pytest.raises(AssertionError, match="minReplicas"):
        _validate_custom_resource(unknown)

    (ray,) = by_kind(_objects("ray"), "RayService").values()
    wrong_type = json.loads(json.dumps(ray))
    wrong_type["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "2"
    with pytest.raises(
        AssertionError, match=re.escape("workerGroupSpecs.0.maxReplicas: '2' is not of type 'integer'")
    ):
        _validate_custom_resource(wrong_type)
    unknown = json.loads(json.dumps(ray))
    unknown["spec"]["rayClusterConfig"]["headGroupSpec"]["replicas"] = 1
    with pytest.raises(AssertionError, match="'replicas' was unexpected"):
        _validate_custom_resource(unknown)
    in_a_pod = json.loads(json.dumps(ray))
    in_a_pod["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["port"] = 8000
    with pytest.raises(AssertionError, match="'port' was unexpected"):
        _validate_custom_resource(in_a_pod)


# ----------------------------------------------------------------------------- workloads


@pytest.mark.parametrize("profile", PROFILES)
def test_deployments_selectors_match_template_labels(profile):
    deployments = by_kind(_objects(profile), "Deployment")
    assert set(deployments) == {_name(t) for t in TIERS}
    for name, deployment in deployments.items():
        selector = deployment["spec"]["selector"]["matchLabels"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), name
        # A selector naming the tier: no Deployment adopts another tier's pods.
        assert selector["app.kubernetes.io/component"] == name.removeprefix(f"{RELEASE}-")


@pytest.mark.parametrize("profile", PROFILES)
def test_services_select_a_deployment_and_its_ports(profile):
    docs = _objects(profile)
    deployments, services = by_kind(docs, "Deployment"), by_kind(docs, "Service")
    expected = {_name(t) for t in TIERS} | ({_name("chat-partner")} if profile == "partner-tls" else set())
    assert set(services) == expected
    for name, service in services.items():
        selector = service["spec"]["selector"]
        matches = [
            d
            for d in deployments.values()
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(matches) == 1, name
        ports = _port_names_and_numbers(_containers(matches[0])[0])
        for port in service["spec"]["ports"]:
            assert port.get("targetPort", port["port"]) in ports, name
        tier = name.removeprefix(f"{RELEASE}-")
        if tier in GRPC_PORTS:
            # Headless: clients dial pod IPs directly, so the Service port is the container port.
            assert service["spec"]["clusterIP"] == "None", name
            assert {p["port"] for p in service["spec"]["ports"]} <= ports, name


@pytest.mark.parametrize("profile", PROFILES)
def test_probes_use_declared_ports(profile):
    for name, deployment in by_kind(_objects(profile), "Deployment").items():
        for container in _containers(deployment):
            ports = _port_names_and_numbers(container)
            for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
                probe = container.get(kind)
                if probe is None:
                    continue
                handler = probe.get("httpGet") or probe.get("grpc") or probe.get("tcpSocket")
                if handler is None:  # exec: the TLS health check, given its port
                    handler = {"port": int(probe["exec"]["command"][3])}
                assert handler["port"] in ports, f"{name} {kind}"


def _health_service(probe: dict) -> tuple[int, str]:
    """Port and grpc.health.v1 service name a probe asks, whether kubelet's grpc probe or the TLS exec check."""
    if "grpc" in probe:
        return probe["grpc"]["port"], probe["grpc"].get("service", "")
    command = probe["exec"]["command"]
    return int(command[3]), command[4]


@pytest.mark.parametrize("profile", PROFILES)
def test_probes_per_service(profile):
    deployments = by_kind(_objects(profile), "Deployment")
    edge = _containers(deployments[_name("edge")])[0]
    assert edge["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert edge["livenessProbe"]["httpGet"]["path"] == "/livez"
    for svc, port in GRPC_PORTS.items():
        container = _containers(deployments[_name(svc)])[0]
        readiness, liveness = (
            _health_service(container["readinessProbe"]),
            _health_service(container["livenessProbe"]),
        )
        # Readiness follows the dependencies (health service ""). Liveness asks "liveness", which is SERVING
        # while the process runs, so an outage elsewhere does not restart pods; inference's follows its model
        # on purpose, so a failed engine is restarted.
        assert readiness == (port, ""), svc
        assert liveness == (port, "" if svc == "inference" else HEALTH_LIVENESS), svc
        # kubelet's grpc probes speak plaintext only: under mesh TLS the probe presents a certificate.
        assert ("exec" in container["readinessProbe"]) == (profile == "partner-tls"), svc
    inference = _containers(deployments[_name("inference")])[0]
    assert _health_service(inference["startupProbe"]) == (GRPC_PORTS["inference"], "")


def test_worker_serves_grpc_health():
    docs = _objects("default")
    worker = _containers(by_kind(docs, "Deployment")[_name("worker")])[0]
    port = GRPC_PORTS["worker"]
    assert {"name": "grpc", "containerPort": port} in worker["ports"]
    assert worker["readinessProbe"]["grpc"] == {"port": port}
    assert worker["livenessProbe"]["grpc"] == {"port": port, "service": HEALTH_LIVENESS}
    service = by_kind(docs, "Service")[_name("worker")]
    assert service["spec"]["clusterIP"] == "None"
    assert port in [p["port"] for p in service["spec"]["ports"]]


def _unknown_env(names) -> set[str]:
    return {n for n in names if n.startswith("CHATTERBOT_") and n not in SETTINGS_ENV} | (
        {n for n in names if not n.startswith("CHATTERBOT_")} - OTHER_ENV
    )


@pytest.mark.parametrize("profile", PROFILES)
def test_containers_run_the_cli_with_settings_and_resources(profile):
    docs = _objects(profile)
    configmap, secret = _name("config"), _name("secrets")
    workloads = {**by_kind(docs, "Deployment"), **by_kind(docs, "Job")}
    for name, workload in workloads.items():
        tier = name.removeprefix(f"{RELEASE}-")
        spec = workload["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["automountServiceAccountToken"] is False, name
        for container in _containers(workload):
            assert container["args"] == (["migrate"] if tier == "migrate" else ["serve", tier]), name
            image = container["image"]
            vllm = profile == "gpu" and tier == "inference"
            assert image == ("chatterbot-vllm:0.1.0" if vllm else "chatterbot:0.1.0"), name
            sources = [ref.get("configMapRef", ref.get("secretRef"))["name"] for ref in container["envFrom"]]
            # The hook Job reads copies made before the release's own objects exist.
            assert sources == ([_name("migrate")] * 2 if tier == "migrate" else [configmap, secret]), name
            unknown = _unknown_env(_env(container))
            assert not unknown, f"{name}: not fields of Settings: {sorted(unknown)}"
            assert {"requests", "limits"} <= set(container["resources"]), name
            assert "cpu" in container["resources"]["requests"], name
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, name


def _quantity(value) -> float:
    """A Kubernetes resource quantity as a number (cores, bytes)."""
    text = str(value)
    suffixes = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    for suffix, factor in suffixes.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


@pytest.mark.parametrize("profile", PROFILES)
def test_requests_fit_within_limits(profile):
    """The API server refuses a container whose request exceeds its limit; a schema cannot see it."""
    docs = _objects(profile)
    for name, workload in {**by_kind(docs, "Deployment"), **by_kind(docs, "Job")}.items():
        for container in _containers(workload):
            requests, limits = container["resources"]["requests"], container["resources"]["limits"]
            for resource, limit in limits.items():
                if resource in requests:
                    assert _quantity(requests[resource]) <= _quantity(limit), f"{name} {resource}"


@pytest.mark.parametrize("profile", PROFILES)
def test_configmap_and_secret_keys_are_settings(profile):
    docs = _objects(profile)
    configmap = by_kind(docs, "ConfigMap")[_name("config")]["data"]
    secret = by_kind(docs, "Secret")[_name("secrets")]["stringData"]
    for keys in (configmap, secret):
        unknown = set(keys) - SETTINGS_ENV
        assert not unknown, sorted(unknown)
        assert all(isinstance(v, str) for v in keys.values())
    assert not set(configmap) & set(secret)
    assert {"CHATTERBOT_API_KEYS", "CHATTERBOT_ADMIN_KEYS", "CHATTERBOT_POSTGRES_SHARDS"} <= set(secret)
    assert configmap["CHATTERBOT_BIND_HOST"] == "0.0.0.0"
    assert configmap["CHATTERBOT_METRICS_PORT"] == str(METRICS_PORT)
    assert configmap["CHATTERBOT_EDGE_PORT"] == str(EDGE_PORT)
    services = by_kind(docs, "Service")
    for svc, port in GRPC_PORTS.items():
        # Callers dial the tier's headless Service on the port its pods serve.
        assert configmap[f"CHATTERBOT_{svc.upper()}_ADDR"] == f"{_name(svc)}:{port}"
        assert port in {p["port"] for p in services[_name(svc)]["spec"]["ports"]}, svc
    assert EDGE_PORT in {p["port"] for p in services[_name("edge")]["spec"]["ports"]}
    assert all(urlsplit(url).scheme == "nats" for url in nats_servers(configmap["CHATTERBOT_NATS_URL"]))
    # Streams replicated on three nodes of the NATS cluster.
    assert configmap["CHATTERBOT_JETSTREAM_REPLICAS"] == "3"
    assert urlsplit(secret["CHATTERBOT_REDIS_URL"]).scheme == "redis"
    assert int(configmap["CHATTERBOT_EDGE_MAX_IN_FLIGHT"]) > 0
    assert int(configmap["CHATTERBOT_MAX_BODY_BYTES"]) == Settings.model_fields["max_body_bytes"].default
    # Servers end connections after a while so clients find new replicas; clients ping idle ones.
    assert int(configmap["CHATTERBOT_GRPC_MAX_CONNECTION_AGE_SECONDS"]) > 0
    assert int(configmap["CHATTERBOT_GRPC_KEEPALIVE_SECONDS"]) > 0
    otlp = configmap["CHATTERBOT_OTEL_EXPORTER_OTLP_ENDPOINT"]
    assert otlp == "" or urlsplit(otlp).scheme in ("http", "https")
    # The rendered settings are ones a process accepts.
    Settings(
        _env_file=None,
        **{k.removeprefix("CHATTERBOT_").lower(): v for k, v in {**configmap, **secret}.items()},
    )


def test_sentinels_replace_the_redis_host():
    docs = _objects("partner-tls")
    configmap = by_kind(docs, "ConfigMap")[_name("config")]["data"]
    secret = by_kind(docs, "Secret")[_name("secrets")]["stringData"]
    assert configmap["CHATTERBOT_REDIS_SENTINELS"] == "sentinel-0.sentinel:26379,sentinel-1.sentinel:26379"
    assert configmap["CHATTERBOT_REDIS_SENTINEL_MASTER"] == "chatterbot"
    assert secret["CHATTERBOT_REDIS_SENTINEL_PASSWORD"] == "s3cret"
    assert (
        "CHATTERBOT_REDIS_SENTINELS" not in by_kind(_objects("default"), "ConfigMap")[_name("config")]["data"]
    )


def test_postgres_shards_and_the_migration_hook():
    docs = _objects("default")
    secret = by_kind(docs, "Secret")[_name("secrets")]["stringData"]
    dsns = [urlsplit(dsn.strip()) for dsn in secret["CHATTERBOT_POSTGRES_SHARDS"].split(",")]
    assert len(dsns) >= 2 and all(dsn.scheme == "postgresql" and dsn.hostname for dsn in dsns)
    databases = [dsn.path.lstrip("/") for dsn in dsns]
    assert len(set(databases)) == len(databases)
    # How to grow the list is written next to it.
    assert "chatterbot shards rebalance" in (CHART / "values.yaml").read_text()
    job = by_kind(docs, "Job")[_name("migrate")]
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    hooks = {
        _doc_id(doc): doc["metadata"]["annotations"]
        for doc in docs
        if "helm.sh/hook" in doc["metadata"].get("annotations", {})
    }
    assert set(hooks) == {
        f"ConfigMap/{_name('migrate')}",
        f"Secret/{_name('migrate')}",
        f"Job/{_name('migrate')}",
    }
    for hook in hooks.values():
        assert set(hook["helm.sh/hook"].split(",")) == {"pre-install", "pre-upgrade"}
    # The settings it reads exist before it runs (a lower weight) and are the release's own.
    job_weight = int(hooks[f"Job/{_name('migrate')}"]["helm.sh/hook-weight"])
    assert int(hooks[f"Secret/{_name('migrate')}"]["helm.sh/hook-weight"]) < job_weight
    assert by_kind(docs, "Secret")[_name("migrate")]["stringData"] == secret
    assert (
        by_kind(docs, "ConfigMap")[_name("migrate")]["data"]
        == by_kind(docs, "ConfigMap")[_name("config")]["data"]
    )


def test_an_existing_secret_replaces_the_charts():
    docs = render("--set", "secrets.existingSecret=my-secrets")
    assert not by_kind(docs, "Secret")
    for workload in [*by_kind(docs, "Deployment").values(), *by_kind(docs, "Job").values()]:
        refs = [ref["secretRef"]["name"] for ref in _containers(workload)[0]["envFrom"] if "secretRef" in ref]
        assert refs == ["my-secrets"], _doc_id(workload)


@pytest.mark.parametrize("profile", PROFILES)
def test_prometheus_scrape_annotations(profile):
    for name, deployment in by_kind(_objects(profile), "Deployment").items():
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true", name
        port = int(annotations["prometheus.io/port"])
        assert port == (EDGE_PORT if name == _name("edge") else METRICS_PORT), name
        assert port in _port_names_and_numbers(_containers(deployment)[0]), name
        # A changed setting rolls the pods.
        assert re.fullmatch(r"[0-9a-f]{64}", annotations["checksum/config"]), name


def test_autoscaling():
    docs = _objects("default")
    deployments = by_kind(docs, "Deployment")
    hpas = by_kind(docs, "HorizontalPodAutoscaler")
    assert set(hpas) == {_name("edge"), _name("chat")}
    for name, hpa in hpas.items():
        target = hpa["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) == ("Deployment", name)
        assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
        assert "replicas" not in deployments[name]["spec"], f"{name}: replicas would fight the HPA"
    (scaled,) = by_kind(docs, "ScaledObject").values()
    assert scaled["spec"]["scaleTargetRef"]["name"] == _name("worker")
    triggers = scaled["spec"]["triggers"]
    assert {t["name"]: t["metadata"]["consumer"] for t in triggers} == JOB_CONSUMERS
    for trigger in triggers:
        assert trigger["type"] == "nats-jetstream"
        meta = trigger["metadata"]
        assert meta["stream"] == JOBS_STREAM
        assert all(isinstance(v, str) for v in meta.values()), "KEDA trigger metadata values are strings"
        assert meta["natsServerMonitoringEndpoint"] == f"nats.{NAMESPACE}.svc.cluster.local:8222"
        assert int(meta["lagThreshold"]) > 0
    lag = {t["name"]: int(t["metadata"]["lagThreshold"]) for t in triggers}
    assert lag["streaming"] < lag["interactive"] < lag["batch"], "waiting people scale workers out first"
    assert "replicas" not in deployments[_name("worker")]["spec"]
    # Without KEDA the workers get a fixed count.
    docs = render("--set", "worker.keda.enabled=false")
    assert not by_kind(docs, "ScaledObject")
    assert by_kind(docs, "Deployment")[_name("worker")]["spec"]["replicas"] == VALUES["worker"]["replicas"]


def test_default_profile_runs_the_simulated_engine_without_gpus():
    docs = _objects("default")
    spec = by_kind(docs, "Deployment")[_name("inference")]["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert _env(container)["CHATTERBOT_INFERENCE_ENGINE"] == "sim"
    resources = {**container["resources"]["requests"], **container["resources"]["limits"]}
    assert "nvidia.com/gpu" not in resources
    assert "tolerations" not in spec and "nodeSelector" not in spec


def test_gpu_profile_runs_vllm_with_an_awq_model_on_gpu_nodes():
    spec = by_kind(_objects("gpu"), "Deployment")[_name("inference")]["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert "cpu" not in container["resources"]["limits"]
    env = _env(container)
    assert env["CHATTERBOT_INFERENCE_ENGINE"] == "vllm"
    assert env["CHATTERBOT_VLLM_QUANTIZATION"] == "awq"
    assert env["CHATTERBOT_MODEL_NAME"].endswith("-AWQ")
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["dshm"] == "/dev/shm"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    # Loading a model takes minutes: the startup probe allows them.
    probe = container["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 600
    # GPUs are scarce: no surge pod during a rollout.
    deployment = by_kind(_objects("gpu"), "Deployment")[_name("inference")]
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0


def _ray_pods(docs) -> dict[str, Pod]:
    """The pods KubeRay makes from the RayService's head and worker templates."""
    (ray,) = by_kind(docs, "RayService").values()
    cluster = ray["spec"]["rayClusterConfig"]
    templates = {"ray-head": cluster["headGroupSpec"]["template"]}
    templates |= {f"ray-{group['groupName']}": group["template"] for group in cluster["workerGroupSpecs"]}
    return {
        name: Pod(
            name, NAMESPACE, template["metadata"]["labels"], {}, template["spec"]["containers"][0]["ports"]
        )
        for name, template in templates.items()
    }


def test_ray_profile_runs_deploy_ray_serve_yaml_on_a_rayservice():
    """values-ray.yaml: a RayService running deploy/ray/serve.yaml on the project's Ray image, and the inference
    tier's openai engine pointed at its serve Service."""
    serve_yaml = (DEPLOY / "ray" / "serve.yaml").read_text()
    assert (CHART / "files" / "ray-serve.yaml").read_text() == serve_yaml, (
        "files/ray-serve.yaml must be a copy of deploy/ray/serve.yaml"
    )
    docs = _objects("ray")
    (ray,) = by_kind(docs, "RayService").values()
    assert ray["metadata"]["name"] == _name("ray")
    assert ray["spec"]["serveConfigV2"] == serve_yaml
    serve = yaml.safe_load(ray["spec"]["serveConfigV2"])
    (app,) = serve["applications"]
    assert app["import_path"] == "inference_svc.ray_serve:app_builder"
    assert serve["http_options"] == {**serve["http_options"], "host": "0.0.0.0", "port": 8000}

    cluster = ray["spec"]["rayClusterConfig"]
    pinned = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["ray"]
    assert pinned == [f"ray[serve]=={cluster['rayVersion']}"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # replicas go to the workers
    (workers,) = cluster["workerGroupSpecs"]
    assert 1 <= workers["minReplicas"] == workers["replicas"] <= workers["maxReplicas"]
    pods = [cluster["headGroupSpec"]["template"], workers["template"]]
    for pod in pods:
        (container,) = pod["spec"]["containers"]
        assert container["image"] == "chatterbot-ray:0.1.0"
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert {p["name"]: p["containerPort"] for p in container["ports"]}["serve"] == 8000
    probe = workers["template"]["spec"]["containers"][0]["readinessProbe"]
    assert probe["httpGet"] == {"path": "/-/healthz", "port": "serve"}

    (inference,) = _containers(by_kind(docs, "Deployment")[_name("inference")])
    env = _env(inference)
    assert env["CHATTERBOT_INFERENCE_ENGINE"] == "openai"
    assert env["CHATTERBOT_OPENAI_BASE_URL"] == f"http://{ray['metadata']['name']}-serve-svc:8000/v1"
    assert not _unknown_env(env)

    assert not by_kind(_objects("default"), "RayService")


def test_ray_profile_takes_a_serve_config_of_the_operators():
    serve_llm = DEPLOY / "ray" / "serve-llm.yaml"
    docs = render("-f", str(CHART / "values-ray.yaml"), "--set-file", f"ray.serveConfig={serve_llm}")
    (ray,) = by_kind(docs, "RayService").values()
    assert ray["spec"]["serveConfigV2"] == serve_llm.read_text()
    _validate_custom_resource(ray)
    gpus = render("-f", str(CHART / "values-ray.yaml"), "--set", "ray.workers.gpus=1")
    (ray,) = by_kind(gpus, "RayService").values()
    (workers,) = ray["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    resources = workers["template"]["spec"]["containers"][0]["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 1


def test_network_policies_let_only_inference_reach_ray_serve():
    """The Ray pods reach each other on any port; from outside, inference reaches Serve (8000), the KubeRay
    operator the dashboard (8265), Prometheus the metrics (8080), and no one anything else."""
    docs = _objects("ray")
    policies = list(by_kind(docs, "NetworkPolicy").values())
    release, others = _cluster(docs)
    ray = _ray_pods(docs)
    operator = Pod("kuberay-operator", "kuberay-system", {"app.kubernetes.io/name": "kuberay-operator"}, {})
    sources = {**release, **others, **ray, "kuberay-operator": operator}
    object_manager = 8076  # one of the ports Ray picks for itself, declared nowhere
    for name, pod in ray.items():
        for port in [*(p["containerPort"] for p in pod.ports), object_manager]:
            allowed = {
                s
                for s, source in sources.items()
                if s != name and ingress_allowed(policies, source, pod, port)
            }
            expected = (
                (set(ray) - {name})
                | ({"inference"} if port == 8000 else set())
                | ({"kuberay-operator"} if port == 8265 else set())
                | ({"prometheus"} if port == 8080 else set())
            )
            assert allowed == expected, (name, port)


@pytest.mark.parametrize("profile", PROFILES)
def test_every_tier_has_a_disruption_budget(profile):
    docs = _objects(profile)
    deployments = by_kind(docs, "Deployment")
    pdbs = by_kind(docs, "PodDisruptionBudget")
    assert set(pdbs) == set(deployments)
    for name, pdb in pdbs.items():
        labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
        assert pdb["spec"]["maxUnavailable"] >= 1, f"{name}: a budget of 0 blocks every node drain"


# ------------------------------------------------------------------------------ ingress, TLS


def test_edge_ingress_is_safe_for_server_sent_events():
    docs = _objects("partner-tls")
    ingresses = by_kind(docs, "Ingress")
    edge = ingresses[_name("edge")]
    annotations = edge["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 600
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-send-timeout"]) >= 600
    # The ingress refuses what the edge would refuse (413), before it reaches a pod.
    configmap = by_kind(docs, "ConfigMap")[_name("config")]["data"]
    assert (
        annotations["nginx.ingress.kubernetes.io/proxy-body-size"] == configmap["CHATTERBOT_MAX_BODY_BYTES"]
    )
    (rule,) = edge["spec"]["rules"]
    (path,) = rule["http"]["paths"]
    assert path["backend"]["service"] == {"name": _name("edge"), "port": {"name": "http"}}
    assert edge["spec"]["tls"][0]["secretName"] == "chat-tls"
    # /metrics is for Prometheus, which scrapes the pods: refused to every address through the ingress.
    metrics = ingresses[_name("edge-metrics")]
    assert (
        metrics["metadata"]["annotations"]["nginx.ingress.kubernetes.io/denylist-source-range"]
        == "0.0.0.0/0,::/0"
    )
    (path,) = metrics["spec"]["rules"][0]["http"]["paths"]
    assert (path["path"], path["pathType"]) == ("/metrics", "Exact")
    # The body limit follows the edge's setting.
    docs = render("--set", "ingress.enabled=true", "--set", "edge.maxBodyBytes=2097152")
    annotations = by_kind(docs, "Ingress")[_name("edge")]["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/proxy-body-size"] == "2097152"
    assert by_kind(docs, "ConfigMap")[_name("config")]["data"]["CHATTERBOT_MAX_BODY_BYTES"] == "2097152"


def test_partner_ingress_and_port():
    docs = _objects("partner-tls")
    partner = by_kind(docs, "Ingress")[_name("chat-partner")]
    annotations = partner["metadata"]["annotations"]
    # chat serves TLS on the partner port, so the ingress speaks TLS to it.
    assert annotations["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPCS"
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 600
    (path,) = partner["spec"]["rules"][0]["http"]["paths"]
    assert path["backend"]["service"] == {"name": _name("chat-partner"), "port": {"name": "partner"}}
    service = by_kind(docs, "Service")[_name("chat-partner")]
    assert [(p["name"], p["port"]) for p in service["spec"]["ports"]] == [("partner", PARTNER_PORT)]
    chat = by_kind(docs, "Deployment")[_name("chat")]
    (container,) = _containers(chat)
    env = _env(container)
    assert {"name": "partner", "containerPort": PARTNER_PORT} in container["ports"]
    assert env["CHATTERBOT_PARTNER_GRPC_PORT"] == str(PARTNER_PORT)
    _assert_files_mounted(
        chat, [env["CHATTERBOT_PARTNER_TLS_CERT"], env["CHATTERBOT_PARTNER_TLS_KEY"]], "partner-tls"
    )
    # Only chat listens for partners.
    for name, deployment in by_kind(docs, "Deployment").items():
        if name != _name("chat"):
            assert "CHATTERBOT_PARTNER_GRPC_PORT" not in _env(_containers(deployment)[0]), name
    # Plaintext partner port: plaintext to the backend.
    docs = render(*PARTNER_TLS, "--set", "partner.tls.secretName=")
    annotations = by_kind(docs, "Ingress")[_name("chat-partner")]["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPC"


def _mounted_files(deployment: dict, volume_name: str) -> dict[str, str]:
    """Path in the container -> key of the Secret, for one secret volume."""
    spec = deployment["spec"]["template"]["spec"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == volume_name]
    (mount,) = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] == volume_name]
    assert mount["readOnly"] is True
    items = volume["secret"].get("items") or [{"key": k, "path": k} for k in ("ca.crt", "tls.crt", "tls.key")]
    return {f"{mount['mountPath']}/{item['path']}": item["key"] for item in items}


def _assert_files_mounted(deployment: dict, paths: list[str], volume_name: str) -> None:
    spec = deployment["spec"]["template"]["spec"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == volume_name]
    (mount,) = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] == volume_name]
    assert "items" not in volume["secret"]  # a kubernetes.io/tls Secret, mounted whole
    for path in paths:
        assert Path(path).parent == Path(mount["mountPath"]), path
        assert Path(path).name in ("tls.crt", "tls.key"), path


def test_mesh_tls_mounts_what_chatterbot_certs_writes(tmp_path: Path):
    """Each tier mounts ca.pem and its own pair from the one Secret, in the layout of `chatterbot certs`, and the
    CHATTERBOT_GRPC_TLS_* paths name those files."""
    result = subprocess.run(
        [str(Path(sys.executable).parent / "chatterbot"), "certs", "--out", str(tmp_path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    written = {p.name for p in tmp_path.iterdir()}
    deployments = by_kind(_objects("partner-tls"), "Deployment")
    for tier in TIERS:
        deployment = deployments[_name(tier)]
        files = _mounted_files(deployment, "mesh-tls")
        env = _env(_containers(deployment)[0])
        tls = [env[f"CHATTERBOT_GRPC_TLS_{part}"] for part in ("CA", "CERT", "KEY")]
        assert set(tls) == set(files), tier
        assert [files[path] for path in tls] == ["ca.pem", f"{tier}.pem", f"{tier}-key.pem"], tier
        assert set(files.values()) <= written, tier
        # A pod sees its own key only, never the CA's.
        assert "ca-key.pem" not in files.values()
    # Without TLS nothing is mounted and the settings stay empty (plaintext).
    for deployment in by_kind(_objects("default"), "Deployment").values():
        assert not {k for k in _env(_containers(deployment)[0]) if k.startswith("CHATTERBOT_GRPC_TLS_")}


def test_mesh_tls_from_cert_manager_secrets():
    docs = render(
        "--set", "tls.enabled=true", "--set-json", 'tls.componentSecrets={"store":"store-mesh-tls"}'
    )
    deployments = by_kind(docs, "Deployment")
    store = deployments[_name("store")]
    volume = next(v for v in store["spec"]["template"]["spec"]["volumes"] if v["name"] == "mesh-tls")
    assert volume["secret"]["secretName"] == "store-mesh-tls"
    env = _env(_containers(store)[0])
    assert [Path(env[f"CHATTERBOT_GRPC_TLS_{p}"]).name for p in ("CA", "CERT", "KEY")] == [
        "ca.crt",
        "tls.crt",
        "tls.key",
    ]
    chat_volume = [
        v
        for v in deployments[_name("chat")]["spec"]["template"]["spec"]["volumes"]
        if v["name"] == "mesh-tls"
    ]
    assert chat_volume[0]["secret"]["secretName"] == "chatterbot-mesh-tls"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tls_probe_checks_a_real_mutual_tls_health_server(tmp_path: Path):
    """The probe a tier runs under mesh TLS, against a grpc.health.v1 server that requires client certificates:
    it passes while SERVING, fails when NOT_SERVING, with a certificate of another CA, or when nothing listens."""
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    certs, other = tmp_path / "certs", tmp_path / "other"
    for out in (certs, other):
        result = subprocess.run(
            [
                str(Path(sys.executable).parent / "chatterbot"),
                "certs",
                "--out",
                str(out),
                "--hosts",
                f"{RELEASE}-{{name}}",
            ],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
    container = _containers(by_kind(_objects("partner-tls"), "Deployment")[_name("store")])[0]
    probe = container["readinessProbe"]["exec"]["command"]
    assert probe[:2] == ["python", "-c"]
    port = _free_port()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    credentials = grpc.ssl_server_credentials(
        [((certs / "store-key.pem").read_bytes(), (certs / "store.pem").read_bytes())],
        root_certificates=(certs / "ca.pem").read_bytes(),
        require_client_auth=True,
    )
    server.add_secure_port(f"127.0.0.1:{port}", credentials)
    server.start()

    def check(port: int, directory: Path = certs) -> int:
        env = {
            **os.environ,
            "CHATTERBOT_GRPC_TLS_CA": str(directory / "ca.pem"),
            "CHATTERBOT_GRPC_TLS_CERT": str(directory / "store.pem"),
            "CHATTERBOT_GRPC_TLS_KEY": str(directory / "store-key.pem"),
        }
        command = [sys.executable, *probe[1:3], str(port), *probe[4:]]
        return subprocess.run(command, check=False, capture_output=True, timeout=30, env=env).returncode

    try:
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert check(port) == 0
        assert check(port, other) != 0, "a client of another CA must be refused"
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert check(port) != 0
    finally:
        server.stop(None)
    assert check(_free_port()) != 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # values.schema.json: names, types and ranges
        (["--set", "settings.LOG_LEVEL=DEBUG"], 'settings: Property name of "LOG_LEVEL" does not match'),
        (["--set", "chat.settings.DEBUG=1"], 'chat.settings: Property name of "DEBUG" does not match'),
        (["--set", "edge.replica=3"], "edge: Additional property replica is not allowed"),
        (
            ["--set-string", "store.replicas=two"],
            "store.replicas: Invalid type. Expected: integer, given: string",
        ),
        (["--set", "nats.jetstreamReplicas=7"], "nats.jetstreamReplicas: Must be less than or equal to 5"),
        (["--set", "edge.forwardedAllowIps=*"], "edge.forwardedAllowIps: Does not match pattern"),
        (
            ["--set", "ray.workers.maxReplicas=0"],
            "ray.workers.maxReplicas: Must be greater than or equal to 1",
        ),
        # the templates: combinations
        (["--set", "partner.ingress.enabled=true"], "partner.ingress.enabled needs partner.enabled"),
        (
            ["--set", "partner.enabled=true", "--set", "partner.ingress.enabled=true"],
            "partner.ingress.tls is required",
        ),
        (["--set", "tls.enabled=true", "--set", "tls.secretName="], "tls.secretName is required"),
        (["--set", "nats.url="], "nats.url is required"),
        (
            [
                "--set",
                "ray.enabled=true",
                "--set",
                "ray.workers.minReplicas=3",
                "--set",
                "ray.workers.maxReplicas=2",
            ],
            "ray.workers.minReplicas must not exceed ray.workers.maxReplicas",
        ),
    ],
)
def test_bad_values_fail_with_a_clear_error(args, message):
    result = _helm("template", RELEASE, str(CHART), *args)
    assert result.returncode != 0
    assert message in result.stderr


# -------------------------------------------------------------------------- network policies


def _selects(selector: dict | None, labels: dict) -> bool:
    """A Kubernetes label selector (matchLabels, matchExpressions); an empty one selects everything."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[operator]
        if not ok:
            return False
    return True


class Pod:
    def __init__(self, name: str, namespace: str, labels: dict, namespace_labels: dict, ports=()):
        self.name, self.namespace, self.labels = name, namespace, labels
        self.namespace_labels = {"kubernetes.io/metadata.name": namespace, **namespace_labels}
        self.ports = list(ports)

    def port_number(self, port) -> int | None:
        if isinstance(port, int):
            return port
        return next((p["containerPort"] for p in self.ports if p.get("name") == port), None)


def ingress_allowed(policies: list[dict], source: Pod, target: Pod, port: int) -> bool:
    """Whether NetworkPolicies let `source` open a TCP connection to `target` on `port`."""
    selecting = [
        p
        for p in policies
        if p["metadata"].get("namespace", NAMESPACE) == target.namespace
        and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
        and _selects(p["spec"]["podSelector"], target.labels)
    ]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress") or []:
            ports = rule.get("ports")
            if ports and not any(
                p.get("protocol", "TCP") == "TCP" and target.port_number(p["port"]) == port for p in ports
            ):
                continue
            peers = rule.get("from")
            if not peers:
                return True
            for peer in peers:
                if "ipBlock" in peer:
                    continue
                namespace_ok = (
                    _selects(peer["namespaceSelector"], source.namespace_labels)
                    if "namespaceSelector" in peer
                    else source.namespace == policy["metadata"].get("namespace", NAMESPACE)
                )
                pod_ok = _selects(peer.get("podSelector"), source.labels) if "podSelector" in peer else True
                if namespace_ok and pod_ok:
                    return True
    return False


def _cluster(docs) -> tuple[dict[str, Pod], dict[str, Pod]]:
    """The release's pods (from its Deployments and Job) and pods around it."""
    release = {}
    for workload in [*by_kind(docs, "Deployment").values(), *by_kind(docs, "Job").values()]:
        tier = workload["metadata"]["name"].removeprefix(f"{RELEASE}-")
        labels = workload["spec"]["template"]["metadata"]["labels"]
        release[tier] = Pod(tier, NAMESPACE, labels, {}, _containers(workload)[0].get("ports", []))
    others = {
        "prometheus": Pod("prometheus", "monitoring", {"app.kubernetes.io/name": "prometheus"}, {}),
        "ingress-controller": Pod(
            "ingress-controller", "ingress-nginx", {"app.kubernetes.io/name": "ingress-nginx"}, {}
        ),
        "other-namespace": Pod("other-namespace", "apps", {"app": "shop"}, {}),
        "same-namespace": Pod("same-namespace", NAMESPACE, {"app": "debug"}, {}),
        "other-release": Pod(
            "other-release",
            NAMESPACE,
            {**release["chat"].labels, "app.kubernetes.io/instance": "staging"},
            {},
        ),
        # Prometheus pods elsewhere than networkPolicy.prometheus says are not Prometheus.
        "impostor": Pod("impostor", "apps", {"app.kubernetes.io/name": "prometheus"}, {}),
    }
    return release, others


def _reachability(docs) -> dict[tuple[str, int], set[str]]:
    """(target tier, port) -> the sources allowed to connect to it."""
    policies = list(by_kind(docs, "NetworkPolicy").values())
    release, others = _cluster(docs)
    sources = {**release, **others}
    return {
        (tier, p["containerPort"]): {
            name
            for name, source in sources.items()
            if name != tier and ingress_allowed(policies, source, pod, p["containerPort"])
        }
        for tier, pod in release.items()
        for p in pod.ports
    }


EVERYONE = {
    *TIERS,
    "migrate",
    "prometheus",
    "ingress-controller",
    "other-namespace",
    "same-namespace",
    "other-release",
    "impostor",
}


def _expected_reachability(partner: bool, edge_health: bool = False) -> dict[tuple[str, int], set[str]]:
    callers = {
        "chat": {"edge"},
        "context": {"chat", "worker"} | ({"edge"} if edge_health else set()),
        "inference": {"chat", "worker"} | ({"edge"} if edge_health else set()),
        # The edge looks up API keys, chat and its workers write history, context rebuilds from it.
        "store": {"chat", "context", "edge", "worker"},
        # The edge's /health asks the workers' gRPC health.
        "worker": {"edge"},
    }
    expected = {("edge", EDGE_PORT): EVERYONE - {"edge"}}
    for tier, callers_of in callers.items():
        expected[(tier, GRPC_PORTS[tier])] = callers_of
        expected[(tier, METRICS_PORT)] = {"prometheus"}
    if partner:
        expected[("chat", PARTNER_PORT)] = EVERYONE - {"chat"}
    return expected


@pytest.mark.parametrize("profile", PROFILES)
def test_network_policies_allow_only_the_mesh_paths(profile):
    """Only the edge (and chat's partner port) from outside the release; store only from chat, context, edge
    and the workers; context and inference only from chat and the workers; metrics only from Prometheus; the
    migration Job takes no connections."""
    docs = _objects(profile)
    reachability = _reachability(docs)
    assert reachability == _expected_reachability(partner=profile == "partner-tls")


def test_network_policies_let_the_edge_check_health_when_asked():
    docs = render("--set", "networkPolicy.edgeHealthChecks=true")
    assert _reachability(docs) == _expected_reachability(partner=False, edge_health=True)


def test_network_policies_narrow_the_edge_to_its_ingress():
    docs = render(
        "--set-json",
        'networkPolicy.edgeFrom=[{"namespaceSelector":{"matchLabels":{"kubernetes.io/metadata.name":"ingress-nginx"}}}]',
    )
    assert _reachability(docs)[("edge", EDGE_PORT)] == {"ingress-controller", "prometheus"}


def test_network_policy_evaluation_denies_by_default():
    """The evaluator itself: without the chart's allow rules, the default deny leaves every port closed."""
    docs = _objects("default")
    deny_only = [
        d for d in docs if d["kind"] != "NetworkPolicy" or d["metadata"]["name"].endswith("default-deny")
    ]
    assert all(not sources for sources in _reachability(deny_only).values())
    no_policies = [d for d in docs if d["kind"] != "NetworkPolicy"]
    assert all(sources == EVERYONE - {tier} for (tier, _), sources in _reachability(no_policies).items())


# --------------------------------------------------------------------------------- monitoring


def _exported_series() -> set[str]:
    """Every series name the code registers with prometheus_client (counters as _total, histograms as
    _bucket/_sum/_count)."""
    import prometheus_client

    for module in (
        "chatterbot.grpc_server",
        "chatterbot.guarded_client",
        "chatterbot.breaker",
        "edge.middleware",
        "edge.rate_limits",
        "chat_svc.degradation",
        "inference_svc.metrics",
    ):
        importlib.import_module(module)
    names = set()
    for family in prometheus_client.REGISTRY.collect():
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names |= {f"{family.name}_{suffix}" for suffix in ("bucket", "sum", "count")}
        else:
            names.add(family.name)
    return names


# prometheus-nats-exporter's JetStream series (collector/jsz.go, run with -jsz=all -prefix=nats as the NATS chart
# does) that the rules and the dashboard read, labelled stream_name and consumer_name.
NATS_EXPORTER_SERIES = {
    "nats_consumer_num_pending",
    "nats_consumer_num_ack_pending",
    "nats_consumer_delivered_stream_seq",
    "nats_stream_total_messages",
}
_SERIES = re.compile(r"\b((?:chatterbot|nats)_[a-z0-9_]+)\b")


def _series_used(expr: str) -> set[str]:
    return set(_SERIES.findall(expr))


@pytest.mark.parametrize("profile", PROFILES)
def test_service_monitors_scrape_every_tier(profile):
    docs = _objects(profile)
    services = by_kind(docs, "Service")
    monitors = by_kind(docs, "ServiceMonitor")
    assert set(monitors) == {_name(t) for t in TIERS}
    for name, monitor in monitors.items():
        selected = [
            s for s in services.values() if _selects(monitor["spec"]["selector"], s["metadata"]["labels"])
        ]
        assert [s["metadata"]["name"] for s in selected] == [name]
        (endpoint,) = monitor["spec"]["endpoints"]
        port_names = {p["name"] for p in selected[0]["spec"]["ports"]}
        assert endpoint["port"] in port_names and endpoint["path"] == "/metrics", name
        assert endpoint["port"] == ("http" if name == _name("edge") else "metrics"), name
        assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}


def _rules(docs) -> dict:
    (rule,) = by_kind(docs, "PrometheusRule").values()
    return rule["spec"]


def test_alert_rules_cover_the_operators_list():
    alerts = {r["alert"]: r for g in _rules(_objects("default"))["groups"] for r in g["rules"]}
    assert {
        "ChatterbotEdgeErrorRatioHigh",  # error ratio
        "ChatterbotGrpcErrorRatioHigh",
        "ChatterbotEdgeLatencyHigh",  # p99 latency
        "ChatterbotTimeToFirstTokenHigh",
        "ChatterbotJobQueueDeep",  # queue depth
        "ChatterbotJobQueueStalled",  # queue age
        "ChatterbotInferenceQueueDeep",
        "ChatterbotDeadLettersGrowing",  # DLQ growth
        "ChatterbotBreakerOpen",  # breaker open
        "ChatterbotDegraded",  # degradation rung
        "ChatterbotShedding",
    } == set(alerts)
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"], name


def test_rules_and_dashboard_use_series_the_code_exports():
    docs = _objects("default")
    known = _exported_series() | NATS_EXPORTER_SERIES
    exprs = [r["expr"] for g in _rules(docs)["groups"] for r in g["rules"]]
    (dashboard,) = [d for d in by_kind(docs, "ConfigMap").values() if "chatterbot.json" in d.get("data", {})]
    board = json.loads(dashboard["data"]["chatterbot.json"])
    panel_exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    assert len(panel_exprs) >= 15
    for expr in [*exprs, *panel_exprs]:
        used = _series_used(expr)
        assert used, expr
        assert used <= known, f"not exported: {sorted(used - known)} in {expr}"
    # The job queue and dead letters are read from the streams the code declares.
    assert any(f'stream_name="{JOBS_STREAM}"' in e for e in exprs)
    assert any(f'stream_name="{DLQ_STREAM}"' in e for e in exprs)
    # What Grafana's sidecar picks up.
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert board["uid"] and {v["name"] for v in board["templating"]["list"]} >= {"datasource", "namespace"}


def _promtool() -> str:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.fail("promtool not found: run `make helm` (Debian's prometheus package)")
    return tool


def _run_promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_promtool(), *args], check=False, capture_output=True, text=True, timeout=60, cwd=cwd
    )


def test_promtool_checks_the_rules_and_the_dashboard_queries(tmp_path: Path):
    docs = _objects("default")
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(_rules(docs)))
    result = _run_promtool("check", "rules", "rules.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    # Dashboard queries as recording rules, Grafana's variables given values, so PromQL parses each one.
    (dashboard,) = [d for d in by_kind(docs, "ConfigMap").values() if "chatterbot.json" in d.get("data", {})]
    board = json.loads(dashboard["data"]["chatterbot.json"])
    variables = {"$__rate_interval": "5m", "$namespace": NAMESPACE, "$release": RELEASE}
    records = []
    for i, target in enumerate(t for p in board["panels"] for t in p.get("targets", [])):
        expr = target["expr"]
        for variable, value in variables.items():
            expr = expr.replace(variable, value)
        records.append({"record": f"dashboard:query{i}", "expr": expr})
    (tmp_path / "dashboard.yaml").write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]})
    )
    result = _run_promtool("check", "rules", "dashboard.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def _counter(rate_per_minute: int, minutes: int = 30) -> str:
    return f"0+{rate_per_minute}x{minutes}"


def _alert_tests() -> list[dict]:
    """Synthetic series for each alert: one scenario where it fires, one where it stays quiet."""
    edge = f'namespace="{NAMESPACE}", job="{_name("edge")}"'
    store = f'namespace="{NAMESPACE}", job="{_name("store")}"'
    chat = f'namespace="{NAMESPACE}", job="{_name("chat")}"'
    inference = f'namespace="{NAMESPACE}", job="{_name("inference")}"'
    jobs = f'stream_name="{JOBS_STREAM}", consumer_name="chat-workers-batch"'
    dlq = f'stream_name="{DLQ_STREAM}"'

    def requests(errors_per_minute: int) -> list[dict]:
        return [
            {
                "series": f'chatterbot_edge_requests_total{{{edge}, route="/chat", method="POST", status="200"}}',
                "values": _counter(90),
            },
            {
                "series": f'chatterbot_edge_requests_total{{{edge}, route="/chat", method="POST", status="503"}}',
                "values": _counter(errors_per_minute),
            },
        ]

    def grpc_calls(failures_per_minute: int) -> list[dict]:
        method = 'method="/chatterbot.v1.StoreService/AppendExchange"'
        return [
            {
                "series": f'chatterbot_grpc_server_handled_total{{{store}, {method}, code="OK"}}',
                "values": _counter(90),
            },
            {
                "series": f'chatterbot_grpc_server_handled_total{{{store}, {method}, code="UNAVAILABLE"}}',
                "values": _counter(failures_per_minute),
            },
            # Refusals a client caused are not failures of the service.
            {
                "series": f'chatterbot_grpc_server_handled_total{{{store}, {method}, code="NOT_FOUND"}}',
                "values": _counter(50),
            },
        ]

    def histogram(metric: str, labels: str, slow: bool) -> list[dict]:
        # 100 observations a minute, all in (30, 60] seconds when slow, all under 0.5 s otherwise.
        bounds = ("0.5", "30", "60", "+Inf")
        filled = {"0.5": 0 if slow else 100, "30": 0 if slow else 100, "60": 100, "+Inf": 100}
        return [{"series": f'{metric}{{{labels}, le="{b}"}}', "values": _counter(filled[b])} for b in bounds]

    def ttft(route: str, slow: bool) -> list[dict]:
        bounds = {"0.5": 0 if slow else 100, "10": 100, "+Inf": 100}
        return [
            {
                "series": f'chatterbot_edge_time_to_first_token_seconds_bucket{{{edge}, route="{route}", le="{b}"}}',
                "values": _counter(n),
            }
            for b, n in bounds.items()
        ]

    def fires(name: str, series: list[dict], labels: dict, at: str = "20m") -> dict:
        return {
            "interval": "1m",
            "input_series": series,
            "alert_rule_test": [{"eval_time": at, "alertname": name, "exp_alerts": [{"exp_labels": labels}]}],
        }

    def quiet(name: str, series: list[dict], at: str = "20m") -> dict:
        return {
            "interval": "1m",
            "input_series": series,
            "alert_rule_test": [{"eval_time": at, "alertname": name, "exp_alerts": []}],
        }

    store_job = _name("store")
    return [
        fires("ChatterbotEdgeErrorRatioHigh", requests(10), {"severity": "critical"}),
        quiet("ChatterbotEdgeErrorRatioHigh", requests(1)),
        fires("ChatterbotGrpcErrorRatioHigh", grpc_calls(10), {"severity": "warning", "job": store_job}),
        quiet("ChatterbotGrpcErrorRatioHigh", grpc_calls(1)),
        fires(
            "ChatterbotEdgeLatencyHigh",
            histogram(
                "chatterbot_edge_request_seconds_bucket", f'{edge}, route="/chat", method="POST"', slow=True
            ),
            {"severity": "warning", "route": "/chat"},
        ),
        # A long stream is not a slow request.
        quiet(
            "ChatterbotEdgeLatencyHigh",
            histogram(
                "chatterbot_edge_request_seconds_bucket",
                f'{edge}, route="/stream/{{correlation_id}}", method="GET"',
                slow=True,
            )
            + histogram(
                "chatterbot_edge_request_seconds_bucket", f'{edge}, route="/chat", method="POST"', slow=False
            ),
        ),
        fires(
            "ChatterbotTimeToFirstTokenHigh",
            ttft("/stream/{correlation_id}", slow=True),
            {"severity": "warning", "route": "/stream/{correlation_id}"},
        ),
        quiet("ChatterbotTimeToFirstTokenHigh", ttft("/stream/{correlation_id}", slow=False)),
        fires(
            "ChatterbotJobQueueDeep",
            [{"series": f"nats_consumer_num_pending{{{jobs}}}", "values": "600x30"}],
            {"severity": "warning", "consumer_name": "chat-workers-batch"},
        ),
        quiet(
            "ChatterbotJobQueueDeep", [{"series": f"nats_consumer_num_pending{{{jobs}}}", "values": "20x30"}]
        ),
        fires(
            "ChatterbotJobQueueStalled",
            [
                {"series": f"nats_consumer_num_pending{{{jobs}}}", "values": "3x30"},
                {"series": f"nats_consumer_delivered_stream_seq{{{jobs}}}", "values": "100x30"},
            ],
            {"severity": "critical", "consumer_name": "chat-workers-batch"},
        ),
        # Pending but moving: workers are busy, not stuck.
        quiet(
            "ChatterbotJobQueueStalled",
            [
                {"series": f"nats_consumer_num_pending{{{jobs}}}", "values": "3x30"},
                {"series": f"nats_consumer_delivered_stream_seq{{{jobs}}}", "values": _counter(5)},
            ],
        ),
        fires(
            "ChatterbotDeadLettersGrowing",
            [{"series": f"nats_stream_total_messages{{{dlq}}}", "values": "0x15 1x15"}],
            {"severity": "warning", "stream_name": DLQ_STREAM},
        ),
        quiet(
            "ChatterbotDeadLettersGrowing",
            [{"series": f"nats_stream_total_messages{{{dlq}}}", "values": "4x30"}],
        ),
        fires(
            "ChatterbotInferenceQueueDeep",
            [
                {
                    "series": f'chatterbot_engine_waiting_sequences{{{inference}, model="m"}}',
                    "values": "200x30",
                }
            ],
            {"severity": "warning", "model": "m"},
        ),
        quiet(
            "ChatterbotInferenceQueueDeep",
            [{"series": f'chatterbot_engine_waiting_sequences{{{inference}, model="m"}}', "values": "3x30"}],
        ),
        fires(
            "ChatterbotBreakerOpen",
            [{"series": f'chatterbot_breaker_state{{{chat}, target="inference"}}', "values": "0x5 2x25"}],
            {"severity": "warning", "job": _name("chat"), "target": "inference"},
        ),
        quiet(
            "ChatterbotBreakerOpen",
            [{"series": f'chatterbot_breaker_state{{{chat}, target="inference"}}', "values": "0x5 1x25"}],
        ),
        fires(
            "ChatterbotDegraded",
            [{"series": f"chatterbot_degradation_rung{{{chat}}}", "values": "0x5 2x25"}],
            {"severity": "warning"},
        ),
        quiet(
            "ChatterbotDegraded", [{"series": f"chatterbot_degradation_rung{{{chat}}}", "values": "0x5 1x25"}]
        ),
        fires(
            "ChatterbotShedding",
            [{"series": f"chatterbot_degradation_rung{{{chat}}}", "values": "0x5 4x25"}],
            {"severity": "critical"},
        ),
        quiet(
            "ChatterbotShedding", [{"series": f"chatterbot_degradation_rung{{{chat}}}", "values": "0x5 3x25"}]
        ),
    ]


def test_alerts_fire_on_their_conditions(tmp_path: Path):
    """`promtool test rules`: each alert fires on series showing its condition and stays quiet on healthy ones.
    Annotations are dropped here (their templates are checked by `promtool check rules`)."""
    groups = _rules(_objects("default"))["groups"]
    for group in groups:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    tests = _alert_tests()
    assert {t["alert_rule_test"][0]["alertname"] for t in tests} == {
        r["alert"] for g in groups for r in g["rules"]
    }
    (tmp_path / "tests.yaml").write_text(
        yaml.safe_dump({"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": tests})
    )
    result = _run_promtool("test", "rules", "tests.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_follow_the_nats_exporter_prefix():
    docs = render("--set", "monitoring.prometheusRule.natsMetricPrefix=jetstream")
    exprs = " ".join(r["expr"] for g in _rules(docs)["groups"] for r in g["rules"])
    assert "jetstream_consumer_num_pending" in exprs and "nats_consumer" not in exprs
    (dashboard,) = [d for d in by_kind(docs, "ConfigMap").values() if "chatterbot.json" in d.get("data", {})]
    assert "jetstream_stream_total_messages" in dashboard["data"]["chatterbot.json"]
