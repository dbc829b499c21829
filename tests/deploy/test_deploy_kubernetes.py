"""deploy/k8s (kustomize base, cpu and gpu overlays, monitoring) and deploy/kserve, checked offline.

Both overlays are rendered by `kubectl kustomize` and every object validated against the Kubernetes
schemas bundled in kubernetes-validate; the InferenceService and ServiceMonitor against schemas generated
from KServe's and the Prometheus Operator's published models (crdschemas.py). The probe paths, port, uid
and settings are compared with the Dockerfile and with a live server, and the autoscaler's metric is
traced through the prometheus-adapter rule to a series the live server really exports.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml
from crdschemas import custom_resource_errors
from deployfiles import DOCKERFILE, PROMTOOL_MISSING
from k8smanifests import (
    GRPC_INFERENCE_SERVICE,
    INFERENCE_SERVICE,
    K8S_DIR,
    KUBECTL_MISSING,
    MONITORING_DIR,
    OVERLAYS,
    adapter_rules,
    container_env,
    kubectl,
    load_file,
    main_container,
    one,
    render,
    selects,
)
from prometheus_client.parser import text_string_to_metric_families

from service.models.threads import ThreadPlan
from service.settings import Settings
from tests.liveserver import LiveServer

if kubectl() is None:
    pytest.skip(KUBECTL_MISSING, allow_module_level=True)

# The oldest Kubernetes release still commonly run, and the newest the bundled schemas know.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
# Seconds beyond preStop + REQUEST_TIMEOUT_S the pod needs to finish the drain and exit before SIGKILL.
SHUTDOWN_MARGIN_S = 10


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return render(K8S_DIR / "overlays" / request.param)


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: render(K8S_DIR / "overlays" / name) for name in OVERLAYS}


@pytest.fixture(scope="module")
def monitoring() -> list[dict[str, Any]]:
    return render(MONITORING_DIR)


@pytest.fixture(scope="module")
def inference_service() -> dict[str, Any]:
    (document,) = load_file(INFERENCE_SERVICE)
    return document


@pytest.fixture(scope="module")
def grpc_inference_service() -> dict[str, Any]:
    (document,) = load_file(GRPC_INFERENCE_SERVICE)
    return document


def pod_spec(objects: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = one(objects, "Deployment")["spec"]["template"]["spec"]
    return spec


def image_uid() -> int:
    match = re.search(r"^USER (\d+):(\d+)$", DOCKERFILE.read_text(encoding="utf-8"), flags=re.MULTILINE)
    assert match, "the Dockerfile should name a numeric USER uid:gid"
    return int(match.group(1))


def image_ports() -> tuple[int, int]:
    """The HTTP and gRPC ports the image exposes, in that order."""
    match = re.search(r"^EXPOSE (\d+) (\d+)$", DOCKERFILE.read_text(encoding="utf-8"), flags=re.MULTILINE)
    assert match, "the Dockerfile should EXPOSE the HTTP port, then the gRPC port"
    return int(match.group(1)), int(match.group(2))


# --- rendering and schemas --------------------------------------------------------------------------


def test_each_overlay_renders_the_whole_base(overlay: list[dict[str, Any]]) -> None:
    kinds = sorted(item["kind"] for item in overlay)
    assert kinds == sorted(
        ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service"]
    )


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_rendered_object_matches_the_kubernetes_schema(
    overlay: list[dict[str, Any]], version: str
) -> None:
    for item in overlay:
        try:
            kubernetes_validate.validate(item, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = f"{item['kind']}/{item['metadata']['name']}"
            path = ".".join(str(part) for part in exc.path)
            pytest.fail(f"{where} is invalid for Kubernetes {version}: {path}: {exc.message}")


def test_kubernetes_schema_check_rejects_a_misspelt_field(rendered: dict[str, list[dict[str, Any]]]) -> None:
    # Guards the check above: strict validation must fail on a key the API does not know.
    deployment = copy.deepcopy(one(rendered["cpu"], "Deployment"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


def test_inference_service_and_service_monitor_match_their_published_schemas(
    inference_service: dict[str, Any], monitoring: list[dict[str, Any]]
) -> None:
    assert custom_resource_errors(inference_service) == []
    assert custom_resource_errors(one(monitoring, "ServiceMonitor")) == []


def test_custom_resource_schemas_reject_misplaced_and_malformed_fields(
    inference_service: dict[str, Any], monitoring: list[dict[str, Any]]
) -> None:
    broken = copy.deepcopy(inference_service)
    broken["spec"]["predictor"]["scaleTargt"] = 3
    broken["spec"]["predictor"]["containers"][0]["ports"][0]["containerPort"] = "8080"
    errors = " | ".join(custom_resource_errors(broken))
    assert "scaleTargt" in errors and "containerPort" in errors, errors
    monitor = copy.deepcopy(one(monitoring, "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["interval"] = "15 seconds"
    assert custom_resource_errors(monitor), "the ServiceMonitor schema accepted an invalid duration"


# --- objects that must agree with each other -----------------------------------------------------------


def test_selectors_and_references_tie_the_objects_together(overlay: list[dict[str, Any]]) -> None:
    deployment = one(overlay, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    assert selects(one(overlay, "Service")["spec"]["selector"], pod_labels)
    assert selects(one(overlay, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], pod_labels)
    target = one(overlay, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert "replicas" not in deployment["spec"], "a fixed replica count would fight the autoscaler"


def test_service_monitor_scrapes_the_service_port_the_pods_serve(
    overlay: list[dict[str, Any]], monitoring: list[dict[str, Any]]
) -> None:
    service = one(overlay, "Service")
    monitor = one(monitoring, "ServiceMonitor")
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    port_names = {port["name"] for port in service["spec"]["ports"]}
    container_ports = {port["name"] for port in main_container(pod_spec(overlay))["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"
    assert {port["targetPort"] for port in service["spec"]["ports"]} <= container_ports


def test_port_and_uid_agree_with_the_dockerfile_and_the_settings(overlay: list[dict[str, Any]]) -> None:
    spec = pod_spec(overlay)
    container = main_container(spec)
    env = container_env(container, overlay)
    http, grpc = container["ports"]
    defaults = Settings()
    assert (http["name"], grpc["name"]) == ("http", "grpc")
    assert http["containerPort"] == image_ports()[0] == int(env["CONVSERVE_PORT"]) == defaults.port
    assert grpc["containerPort"] == image_ports()[1] == int(env["CONVSERVE_GRPC_PORT"]) == defaults.grpc_port
    service_ports = {port["name"]: port for port in one(overlay, "Service")["spec"]["ports"]}
    assert service_ports["grpc"]["appProtocol"] == "kubernetes.io/h2c"
    assert service_ports["grpc"]["port"] == grpc["containerPort"]
    port = http
    annotations = one(overlay, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == port["containerPort"]
    assert spec["securityContext"]["runAsUser"] == spec["securityContext"]["runAsGroup"] == image_uid()


def test_pod_is_non_root_read_only_without_capabilities(overlay: list[dict[str, Any]]) -> None:
    spec = pod_spec(overlay)
    pod_security = spec["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}
    container = main_container(spec)
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    # The one writable path (uploads spool to /tmp) comes from a volume.
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]


def test_settings_in_the_config_map_are_accepted_by_the_service(
    overlay: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = container_env(main_container(pod_spec(overlay)), overlay)
    known = {f"CONVSERVE_{name.upper()}" for name in Settings.model_fields}
    assert set(env) <= known, f"unknown settings: {sorted(set(env) - known)}"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()  # raises on a value the service would refuse at start-up
    if not settings.require_gpu:  # a GPU pod runs several to feed its one GPU (overlays/gpu/gpu.yaml)
        assert settings.workers == 1, "one worker per pod: scale with replicas"


def test_cpu_pods_size_their_batches_by_the_cpu_they_request(
    overlay: list[dict[str, Any]], inference_service: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without a CPU limit the container sees every core of its node: the service must be told the
    # request, or it would run one batch per node core.
    containers = [main_container(pod_spec(overlay)), inference_service["spec"]["predictor"]["containers"][0]]
    for container in containers:
        env = container_env(container, overlay)
        if env.get("CONVSERVE_PROVIDERS", "").startswith("cuda"):
            continue  # a GPU computes one batch at a time whatever the cores
        requested = container["resources"]["requests"]["cpu"]
        assert env["CONVSERVE_CPUS"] == str(requested), container["name"]
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        plan = ThreadPlan.from_settings(Settings())
        assert (plan.instances, plan.lone_threads) == (int(requested), int(requested))


def test_termination_grace_covers_the_pause_and_the_drain(overlay: list[dict[str, Any]]) -> None:
    spec = pod_spec(overlay)
    container = main_container(spec)
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep", command
    pause_s = int(command[1])
    request_timeout_s = float(container_env(container, overlay)["CONVSERVE_REQUEST_TIMEOUT_S"])
    assert pause_s >= 5, "endpoints need a few seconds to drop the pod"
    assert spec["terminationGracePeriodSeconds"] >= pause_s + request_timeout_s + SHUTDOWN_MARGIN_S


def test_resources_have_requests_and_a_memory_limit(overlay: list[dict[str, Any]]) -> None:
    resources = main_container(pod_spec(overlay))["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert "memory" in resources["limits"]
    assert "cpu" not in resources["limits"], "CPU limits throttle batches mid-run (see the overlay's comment)"


# What one worker needs outside CONVSERVE_MEMORY_BUDGET_MB at the CPU overlay's settings: the process
# with its shared arena grown by two batches of 32 (~0.8 GB), a full queue of decoded images (154 MB)
# and bodies in flight; the overlay's comment has the reasoning, docs/performance.md the measurements.
WORKER_BASE_MIB = 1024


def test_a_memory_budget_leaves_the_memory_limit_room_for_each_worker(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    budgets = {}
    for name, objects in rendered.items():
        container = main_container(pod_spec(objects))
        env = container_env(container, objects)
        if "CONVSERVE_MEMORY_BUDGET_MB" in env:
            budgets[name] = budget = int(env["CONVSERVE_MEMORY_BUDGET_MB"])
            workers = int(env.get("CONVSERVE_WORKERS", "1"))
            limit_mib = mebibytes(container["resources"]["limits"]["memory"])
            assert workers * (budget + WORKER_BASE_MIB) <= limit_mib, name
    assert "cpu" in budgets, "the CPU overlay sets the budget with its memory limit"


def mebibytes(quantity: str) -> int:
    units = {"Mi": 1, "Gi": 1024}
    return int(quantity[:-2]) * units[quantity[-2:]]


def test_only_the_gpu_overlay_asks_for_a_gpu_and_tolerates_gpu_nodes(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    gpu = pod_spec(rendered["gpu"])
    assert main_container(gpu)["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in gpu["tolerations"])
    assert container_env(main_container(gpu), rendered["gpu"])["CONVSERVE_PROVIDERS"].startswith("cuda")
    cpu = pod_spec(rendered["cpu"])
    assert "nvidia.com/gpu" not in main_container(cpu)["resources"]["limits"]
    assert container_env(main_container(cpu), rendered["cpu"])["CONVSERVE_PROVIDERS"] == "cpu"


# --- against a live server -----------------------------------------------------------------------------


def probe_paths(container: dict[str, Any]) -> dict[str, str]:
    return {
        kind: container[kind]["httpGet"]["path"]
        for kind in ("startupProbe", "readinessProbe", "livenessProbe")
        if kind in container
    }


def test_probes_use_the_routes_that_mean_started_ready_and_alive(
    overlay: list[dict[str, Any]], inference_service: dict[str, Any], live_server: LiveServer
) -> None:
    container = main_container(pod_spec(overlay))
    assert probe_paths(container) == {
        "startupProbe": "/healthz",
        "readinessProbe": "/readyz",
        "livenessProbe": "/healthz",
    }
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == "http"
    kserve = inference_service["spec"]["predictor"]["containers"][0]
    assert probe_paths(kserve) == {"readinessProbe": "/v2/health/ready", "livenessProbe": "/v2/health/live"}
    for path in {*probe_paths(container).values(), *probe_paths(kserve).values()}:
        assert httpx.get(f"{live_server.url}{path}", timeout=10).status_code == 200, path


def test_grpc_inference_service_routes_the_grpc_port_and_probes_readiness_inside(
    grpc_inference_service: dict[str, Any],
) -> None:
    assert custom_resource_errors(grpc_inference_service) == []
    container = grpc_inference_service["spec"]["predictor"]["containers"][0]
    assert container["name"] == "kserve-container"
    env = container_env(container, [])
    (port,) = container["ports"]
    assert port["name"] == "h2c" and port["containerPort"] == int(env["CONVSERVE_GRPC_PORT"])
    assert int(env["CONVSERVE_PORT"]) != port["containerPort"]
    assert container["readinessProbe"]["exec"]["command"] == ["python", "/opt/convserve/healthcheck.py"]
    assert container["livenessProbe"]["tcpSocket"]["port"] == port["containerPort"]
    assert container["securityContext"]["runAsUser"] == image_uid()


def test_inference_service_runs_the_image_as_kserve_expects(inference_service: dict[str, Any]) -> None:
    container = inference_service["spec"]["predictor"]["containers"][0]
    assert container["name"] == "kserve-container"
    env = container_env(container, [])
    (port,) = container["ports"]
    assert port["containerPort"] == int(env["CONVSERVE_PORT"])
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == port["containerPort"]
    assert container["securityContext"]["runAsUser"] == image_uid()
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert "/tmp" in {mount["mountPath"] for mount in container["volumeMounts"]}


def exported_series(metrics_text: str) -> set[str]:
    """Sample names the live server exposes, including those of histograms with no observation yet."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    names: set[str] = set()
    for family in text_string_to_metric_families(metrics_text):
        names.update(sample.name for sample in family.samples)
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
    return names


def test_autoscaler_metric_comes_from_the_adapter_rule_on_exported_series(
    overlay: list[dict[str, Any]], live_server: LiveServer
) -> None:
    (metric,) = one(overlay, "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    wanted = metric["pods"]["metric"]["name"]
    exported = exported_series(httpx.get(f"{live_server.url}/metrics", timeout=10).text)
    producing = []
    for rule in adapter_rules():
        series = re.match(r"([a-zA-Z_:][\w:]*)", rule["seriesQuery"])
        assert series, rule["seriesQuery"]
        name = re.sub(rule["name"]["matches"], rule["name"]["as"], series.group(1))
        if name == wanted:
            producing.append(rule)
            assert series.group(1) in exported, f"{series.group(1)} is not on the live server's /metrics"
            used = set(re.findall(r"\b(convserve_\w+)\{", rule["metricsQuery"]))
            assert used and used <= exported, f"the rule's query uses unexported series {used - exported}"
            overrides = rule["resources"]["overrides"]
            assert overrides["pod"]["resource"] == "pod", "the HPA's Pods metric needs the pod label mapped"
            assert overrides["namespace"]["resource"] == "namespace"
    assert len(producing) == 1, f"no single adapter rule yields the HPA's metric {wanted}"


def test_adapter_query_is_valid_promql(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip(PROMTOOL_MISSING)
    # The adapter's template placeholders, filled in the way it fills them for a Pods metric.
    placeholders = {"<<.GroupBy>>": "pod", "<<.LabelMatchers>>": 'namespace="default",pod=~"convserve-.*"'}
    rules = []
    for number, rule in enumerate(adapter_rules()):
        query = rule["metricsQuery"]
        for placeholder, value in placeholders.items():
            query = query.replace(placeholder, value)
        assert "<<" not in query, f"unfilled placeholder in {query}"
        rules.append({"record": f"adapter_rule_{number}", "expr": query})
    path = tmp_path / "adapter-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "adapter", "rules": rules}]}), encoding="utf-8")
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, f"promtool rejects an adapter query:\n{result.stdout}{result.stderr}"
