"""Deployment files parse and keep the worker rules (no Docker engine here to run them)."""

from __future__ import annotations

import configparser
import itertools
import math
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from varco.tasks.settings import Settings

INFRA = Path(__file__).resolve().parents[1] / "infra"


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_compose_runs_redis_storage_and_gpu_workers() -> None:
    compose = yaml.safe_load((INFRA / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) >= {"redis", "minio", "worker"}
    worker = services["worker"]
    assert worker["command"][:2] == ["varco", "worker"]
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "--appendonly" in services["redis"]["command"]
    names = set(worker["environment"]) - {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "HF_HOME"} - OTEL_VARIABLES
    assert names <= {"VARCO_" + name.upper() for name in Settings.model_fields}


# The standard OpenTelemetry variables the deployment files may pass (tasks/tracing.py reads no others).
OTEL_VARIABLES = {"OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL",
                  "OTEL_EXPORTER_OTLP_HEADERS", "OTEL_SERVICE_NAME", "OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG",
                  "OTEL_RESOURCE_ATTRIBUTES", "OTEL_SDK_DISABLED"}  # fmt: skip


def pip_extras(dockerfile: Path) -> set[str]:
    """The extras a Dockerfile's `pip install '.[a,b]'` installs."""
    [extras] = re.findall(r"pip install [^\n]*'\.\[([a-z,-]+)\]'", dockerfile.read_text())
    return set(extras.split(","))


def test_the_worker_gateway_and_producer_images_install_the_otel_extra() -> None:
    """Issue 23: tracing is one variable away in every image; the gateway and producer images carry no torch."""
    extras = tomllib.loads((INFRA.parent / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    images = {name: pip_extras(INFRA / name) for name in ("Dockerfile", "gateway.Dockerfile", "producer.Dockerfile")}
    assert images == {"Dockerfile": {"worker", "vllm", "otel"}, "gateway.Dockerfile": {"gateway", "otel"},
                      "producer.Dockerfile": {"otel"}}  # fmt: skip
    assert set().union(*images.values()) <= set(extras)
    assert not any(dep.startswith("torch") for dep in extras["gateway"] + extras["otel"])


def test_compose_passes_the_opentelemetry_variables_off_by_default() -> None:
    services = yaml.safe_load((INFRA / "compose.yaml").read_text())["services"]
    for name in ("worker", "gateway"):
        env = services[name]["environment"]
        assert {k for k in env if k.startswith("OTEL_")} <= OTEL_VARIABLES
        # Passed through from the host's environment; unset there, the endpoint is empty: no tracing.
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "${OTEL_EXPORTER_OTLP_ENDPOINT:-}"
    assert services["gateway"]["build"]["dockerfile"] == "infra/gateway.Dockerfile"
    assert services["gateway"]["environment"]["OTEL_SERVICE_NAME"] == "varco-gateway"


def option_values(argv: list[str]) -> dict[str, str]:
    """redis-server's command line as {"--option": "value"}."""
    return {flag: value for flag, value in itertools.pairwise(argv) if flag.startswith("--")}


def test_redis_keeps_queued_jobs_across_restarts_with_aof() -> None:
    """Without persistence a Redis restart loses every queued job and status record (docs/redis.md)."""
    services = yaml.safe_load((INFRA / "compose.yaml").read_text())["services"]
    options = option_values(services["redis"]["command"][1:])
    assert options["--appendonly"] == "yes" and options["--appendfsync"] == "everysec"
    assert any(v.startswith("redis-data:") and v.endswith(":/data") for v in services["redis"]["volumes"])

    docs = [d for f in sorted((INFRA / "k8s").glob("*.yaml")) for d in load_all(f)]
    by_kind = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    redis_set = by_kind[("StatefulSet", "varco-redis")]["spec"]
    container = redis_set["template"]["spec"]["containers"][0]
    options = option_values(container["args"])
    assert options["--appendonly"] == "yes" and options["--appendfsync"] == "everysec"
    data = next(m for m in container["volumeMounts"] if m["mountPath"] == options["--dir"])
    claims = {c["metadata"]["name"] for c in redis_set["volumeClaimTemplates"]}
    assert data["name"] in claims  # the AOF lives on a PersistentVolumeClaim, not in the pod
    # The Service is what the broker URL in the Secret names, with TLS and the same password.
    service = by_kind[("Service", "varco-redis")]["spec"]
    assert service["selector"] == redis_set["selector"]["matchLabels"]
    assert options["--tls-port"] == str(service["ports"][0]["port"]) and options["--port"] == "0"
    assert "@varco-redis:6379/" in by_kind[("Secret", "varco-secrets")]["stringData"]["VARCO_BROKER_URL"]
    assert options["--requirepass"] == "$(REDIS_PASSWORD)"


def test_kubernetes_one_gpu_per_pod_and_queue_autoscaling() -> None:
    docs = [d for f in sorted((INFRA / "k8s").glob("*.yaml")) for d in load_all(f)]
    by_kind = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    worker = by_kind[("Deployment", "varco-worker")]["spec"]["template"]["spec"]
    container = worker["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert worker["terminationGracePeriodSeconds"] >= 120
    scaled = by_kind[("ScaledObject", "varco-worker")]["spec"]
    assert scaled["scaleTargetRef"]["name"] == "varco-worker"
    lanes = {t["metadata"]["listName"] for t in scaled["triggers"] if t["type"] == "redis"}
    assert lanes == {"varco"} | {f"varco:{i}" for i in range(1, 10)}
    config = by_kind[("ConfigMap", "varco-config")]["data"]
    assert {k.removeprefix("VARCO_").lower() for k in config} <= set(Settings.model_fields)
    # The broker URL carries the Redis password: a Secret, never the ConfigMap.
    assert "VARCO_BROKER_URL" not in config
    assert by_kind[("Secret", "varco-secrets")]["stringData"]["VARCO_BROKER_URL"].startswith("rediss://")


def desired_replicas(scaled: dict, lane_lengths: dict[str, int]) -> int:
    """What KEDA's HPA asks for: the scalingModifiers formula over the triggers, as AverageValue."""
    modifiers = scaled["advanced"]["scalingModifiers"]
    values = {t["name"]: lane_lengths.get(t["metadata"]["listName"], 0) for t in scaled["triggers"]}
    terms = [term.strip() for term in modifiers["formula"].split("+")]
    assert set(terms) == set(values), "the formula must add up every lane's trigger"
    total = sum(values[term] for term in terms)
    wanted = math.ceil(total / float(modifiers["target"])) if total >= float(modifiers["activationTarget"]) else 0
    return max(scaled["minReplicaCount"], min(scaled["maxReplicaCount"], wanted))


def test_keda_scales_on_the_sum_of_the_priority_lanes() -> None:
    (scaled,) = [d["spec"] for d in load_all(INFRA / "k8s" / "autoscaling.yaml") if d["kind"] == "ScaledObject"]
    lanes = ["varco"] + [f"varco:{i}" for i in range(1, 10)]
    assert desired_replicas(scaled, dict.fromkeys(lanes, 31)) == 10  # 310 waiting: 10 pods, not 1
    assert desired_replicas(scaled, {"varco:5": 64}) == 2
    assert desired_replicas(scaled, {}) == 1
    assert desired_replicas(scaled, dict.fromkeys(lanes, 1000)) == 16
    assert all(t.get("authenticationRef", {}).get("name") == "varco-redis-auth" for t in scaled["triggers"])


def test_compose_creates_its_bucket_before_the_worker_starts() -> None:
    services = yaml.safe_load((INFRA / "compose.yaml").read_text())["services"]
    init = services["minio-init"]
    assert "mc mb --ignore-existing local/varco-results" in " ".join(init["command"])
    assert services["worker"]["environment"]["VARCO_RESULT_STORE"].startswith("s3://varco-results/")
    assert services["worker"]["depends_on"]["minio-init"] == {"condition": "service_completed_successfully"}


def test_systemd_unit() -> None:
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.read(INFRA / "systemd" / "varco-worker.service")
    assert "varco worker --gpus all" in unit["Service"]["ExecStart"]
    assert unit["Service"]["Restart"] == "always" and unit["Service"]["KillSignal"] == "SIGTERM"


def test_gpu_pods_probe_health_and_leave_webhooks_to_their_deployment() -> None:
    docs = [d for f in sorted((INFRA / "k8s").glob("*.yaml")) for d in load_all(f)]
    by_kind = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    assert ("Deployment", "varco-callbacks") in by_kind
    container = by_kind[("Deployment", "varco-worker")]["spec"]["template"]["spec"]["containers"][0]
    assert "--no-callbacks" in container["command"]
    port = next(p for p in container["ports"] if p["name"] == "metrics")["containerPort"]
    assert port == Settings().metrics_port
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 15 * 60  # a 14B load takes minutes


# KEDA's kinds are custom resources, outside Kubernetes' own schemas: checked against models
# generated from KEDA's CRDs (below).
CUSTOM_KINDS = {"ScaledObject", "TriggerAuthentication"}


def test_kubernetes_manifests_validate_against_the_api_schemas() -> None:
    import kubernetes_validate

    checked = []
    for path in sorted((INFRA / "k8s").glob("*.yaml")):
        for doc in load_all(path):
            if doc["kind"] in CUSTOM_KINDS:
                continue
            kubernetes_validate.validate(doc, "1.30.0", strict=True)  # raises on any unknown or mistyped field
            checked.append(doc["kind"])
    assert sorted(checked) == ["ConfigMap", "Deployment", "Deployment", "Secret", "Service", "StatefulSet"]


def fields_the_schema_does_not_know(original: object, validated: object, path: str = "") -> list[str]:
    """The models ignore unknown fields: what a round trip drops is what the CRD does not define."""
    if isinstance(original, dict):
        return [
            missing
            for key, value in original.items()
            for missing in (
                [f"{path}.{key}"]
                if not isinstance(validated, dict) or key not in validated
                else fields_the_schema_does_not_know(value, validated[key], f"{path}.{key}")
            )
        ]
    if isinstance(original, list) and isinstance(validated, list):
        return [m for i, (a, b) in enumerate(zip(original, validated, strict=False))
                for m in fields_the_schema_does_not_know(a, b, f"{path}[{i}]")]  # fmt: skip
    return []


def test_keda_resources_validate_against_keda_crd_models() -> None:
    from cloudcoil.models.keda import v1alpha1

    docs = load_all(INFRA / "k8s" / "autoscaling.yaml")
    assert {d["kind"] for d in docs} == CUSTOM_KINDS
    for doc in docs:
        model = getattr(v1alpha1, doc["kind"]).model_validate(doc)  # raises on mistyped fields
        dumped = model.model_dump(by_alias=True, exclude_unset=True, mode="json")
        assert fields_the_schema_does_not_know(doc, dumped) == [], doc["kind"]


def test_compose_file_follows_the_compose_specification() -> None:
    from compose_spec import PyCompose

    # The gateway merges the shared environment (`<<: *varco-env`): the parser reads merged services.
    text = yaml.safe_dump(yaml.safe_load((INFRA / "compose.yaml").read_text()), sort_keys=False)
    compose = PyCompose.from_yaml(text)  # raises on unknown keys, wrong types, unknown enum values
    assert compose.service_names() == ["redis", "minio", "minio-init", "worker", "gateway"]
    with pytest.raises(Exception, match="stop_grace_perod"):  # it does catch a typo
        PyCompose.from_yaml(text.replace("stop_grace_period", "stop_grace_perod"))


# --- the RabbitMQ variant (docs/brokers.md) ------------------------------------------------------
RABBIT_K8S = INFRA / "k8s" / "rabbitmq"


def test_rabbitmq_kubernetes_manifests_validate_and_form_a_three_node_cluster() -> None:
    import kubernetes_validate

    docs = load_all(RABBIT_K8S / "rabbitmq.yaml")
    for doc in docs:
        kubernetes_validate.validate(doc, "1.30.0", strict=True)
    kinds = sorted(doc["kind"] for doc in docs)
    assert kinds == ["ConfigMap", "Role", "RoleBinding", "Secret", "Service", "Service", "ServiceAccount",
                     "StatefulSet"]  # fmt: skip
    [nodes] = [doc for doc in docs if doc["kind"] == "StatefulSet"]
    assert nodes["spec"]["replicas"] == 3
    [config] = [doc for doc in docs if doc["kind"] == "ConfigMap"]
    assert "quorum_queue.initial_group_size = 3" in config["data"]["rabbitmq.conf"]


def test_keda_scales_on_the_rabbitmq_job_queue() -> None:
    from cloudcoil.models.keda import v1alpha1

    docs = load_all(RABBIT_K8S / "autoscaling.yaml")
    for doc in docs:
        model = getattr(v1alpha1, doc["kind"]).model_validate(doc)
        dumped = model.model_dump(by_alias=True, exclude_unset=True, mode="json")
        assert fields_the_schema_does_not_know(doc, dumped) == [], doc["kind"]
    [scaled] = [doc for doc in docs if doc["kind"] == "ScaledObject"]
    [trigger] = scaled["spec"]["triggers"]
    assert trigger["type"] == "rabbitmq" and trigger["metadata"]["queueName"] == "varco"


def test_compose_rabbitmq_variant_follows_the_specification() -> None:
    from compose_spec import PyCompose

    text = (INFRA / "compose.rabbitmq.yaml").read_text()
    resolved = yaml.safe_load(text)  # the nodes share a YAML anchor; the parser reads merged services
    compose = PyCompose.from_yaml(yaml.safe_dump(resolved))
    assert compose.service_names() == ["rabbitmq-0", "rabbitmq-1", "rabbitmq-2", "worker"]
    env = resolved["services"]["worker"]["environment"]
    broker, status = env["VARCO_BROKER_URL"], env["VARCO_STATUS_URL"]
    assert broker.count(";") == 2 and all(part.startswith("amqp://") for part in broker.split(";"))
    assert Settings(broker_url=broker, status_url=status).status_redis_url.startswith("redis://")
    conf = (INFRA / "rabbitmq" / "rabbitmq.conf").read_text()
    assert all(f"rabbit@rabbitmq-{i}" in conf for i in range(3))
