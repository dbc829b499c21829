"""The Kubernetes and KServe manifests as the cluster would receive them: rendered by `kubectl kustomize`.

`kubectl kustomize` renders offline (no cluster needed), unlike `kubectl apply --dry-run`.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml
from deployfiles import REPO_ROOT

K8S_DIR = REPO_ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu")
MONITORING_DIR = K8S_DIR / "monitoring"
ADAPTER_VALUES = MONITORING_DIR / "prometheus-adapter-values.yaml"
INFERENCE_SERVICE = REPO_ROOT / "deploy" / "kserve" / "inferenceservice.yaml"
GRPC_INFERENCE_SERVICE = REPO_ROOT / "deploy" / "kserve" / "inferenceservice-grpc.yaml"
KUBECTL_MISSING = "kubectl is not installed (Debian package `kubectl`; `make tools` installs it)"


def kubectl() -> str | None:
    return shutil.which("kubectl")


def render(directory: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize directory`, as a list of objects."""
    tool = kubectl()
    assert tool, KUBECTL_MISSING
    result = subprocess.run(
        [tool, "kustomize", str(directory)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"kubectl kustomize {directory} failed:\n{result.stderr}"
    return [document for document in yaml.safe_load_all(result.stdout) if document]


def load_file(path: Path) -> list[dict[str, Any]]:
    return [document for document in yaml.safe_load_all(path.read_text(encoding="utf-8")) if document]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [item for item in objects if item["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def main_container(pod_spec: dict[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = pod_spec["containers"]
    assert len(containers) == 1, "the pod should run the service container alone"
    return containers[0]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """A matchLabels selector matches the labels."""
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def container_env(container: dict[str, Any], objects: list[dict[str, Any]]) -> dict[str, str]:
    """The container's environment: its ConfigMap references (by their generated names) and `env`."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        name = source["configMapRef"]["name"]
        config_maps = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == name]
        assert config_maps, f"envFrom names ConfigMap {name}, which the rendering does not contain"
        env.update(config_maps[0]["data"])
    env.update({item["name"]: _env_value(item, container) for item in container.get("env", [])})
    return env


def _env_value(item: dict[str, Any], container: dict[str, Any]) -> str:
    """An `env` entry's value as the kubelet sets it: literal, or a resource of the container (the
    downward API rounds a CPU quantity up to a whole number of its divisor)."""
    if "value" in item:
        return str(item["value"])
    field = item["valueFrom"]["resourceFieldRef"]
    kind, resource = field["resource"].split(".")
    assert resource == "cpu", f"only CPU resources are rendered here, got {field['resource']}"
    quantity = str(container["resources"][kind][resource])
    cores = int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)
    return str(math.ceil(cores / float(field.get("divisor", "1"))))


def adapter_rules() -> list[dict[str, Any]]:
    values = yaml.safe_load(ADAPTER_VALUES.read_text(encoding="utf-8"))
    rules: list[dict[str, Any]] = values["rules"]["custom"]
    return rules
