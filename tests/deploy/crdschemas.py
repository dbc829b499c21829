"""Schemas of the custom resources we ship (KServe InferenceService, Prometheus Operator ServiceMonitor
and PrometheusRule).

Their CRDs cannot be fetched at test time, so the schemas are generated once from PyPI packages that carry
them and kept in `crdschemas/`: KServe's Python SDK (its models are generated from KServe's OpenAPI
spec: field names, JSON keys and types) and cloudcoil's Prometheus Operator models (pydantic models
generated from the operator's CRDs, with their patterns and enums). Every object is made strict
(`additionalProperties: false`), so a misspelt or misplaced key fails. Kubernetes' own types inside
them (containers, probes, metadata) point at kubernetes-validate's bundled definitions.

Regenerate after changing the versions below: `.venv/bin/python tests/deploy/crdschemas.py`.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import referencing
import referencing.jsonschema

SCHEMA_DIR = Path(__file__).resolve().parent / "crdschemas"
KSERVE_SDK = "kserve==0.21.0"
PROMETHEUS_OPERATOR_MODELS = ("cloudcoil==0.6.0", "cloudcoil-models-prometheus-operator==0.80.1.0")
# Kubernetes definitions the custom resources' embedded core types are checked against.
K8S_SCHEMA_VERSION = "v1.37.0-local-strict"
K8S_DEFINITIONS = "https://kubernetes.io/api/_definitions.json"
SCHEMA_FILES = {
    ("serving.kserve.io/v1beta1", "InferenceService"): "inferenceservice-serving.kserve.io-v1beta1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring.coreos.com-v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule-monitoring.coreos.com-v1.json",
}


# --- validation (at test time) --------------------------------------------------------------------------


def _k8s_definitions() -> dict[str, Any]:
    path = resources.files("kubernetes_validate") / "kubernetes-json-schema" / K8S_SCHEMA_VERSION
    document: dict[str, Any] = json.loads((path / "_definitions.json").read_text(encoding="utf-8"))
    return document


def custom_resource_errors(document: dict[str, Any]) -> list[str]:
    """Every schema violation of one rendered custom resource, as `path: message` lines."""
    key = (document.get("apiVersion"), document.get("kind"))
    if key not in SCHEMA_FILES:
        return [f"no vendored schema for {key}; known: {sorted(SCHEMA_FILES)}"]
    schema = json.loads((SCHEMA_DIR / SCHEMA_FILES[key]).read_text(encoding="utf-8"))  # type: ignore[index]
    definitions = referencing.Resource.from_contents(_k8s_definitions())
    registry: referencing.Registry[Any] = definitions @ referencing.Registry()
    validator = jsonschema.Draft202012Validator(schema, registry=registry)
    return [
        f"{'.'.join(str(part) for part in error.absolute_path) or '(root)'}: {error.message}"
        for error in validator.iter_errors(document)
    ]


# --- generation (offline maintenance, needs the package index) --------------------------------------------


def _strict(node: Any) -> Any:
    """The schema with `additionalProperties: false` on every object that lists its properties."""
    if isinstance(node, dict):
        result = {key: _strict(value) for key, value in node.items() if key not in {"title", "default"}}
        if "properties" in result and "additionalProperties" not in result:
            result["additionalProperties"] = False
        return result
    if isinstance(node, list):
        return [_strict(item) for item in node]
    return node


def _sdk_classes(models_dir: Path) -> dict[str, tuple[dict[str, str], dict[str, str]]]:
    """Class name -> (openapi_types, attribute_map) of every model of an OpenAPI-generated SDK."""
    classes = {}
    for path in models_dir.glob("*.py"):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if not isinstance(node, ast.ClassDef):
                continue
            found = {
                statement.targets[0].id: ast.literal_eval(statement.value)
                for statement in node.body
                if isinstance(statement, ast.Assign) and isinstance(statement.targets[0], ast.Name)
            }
            if "openapi_types" in found and "attribute_map" in found:
                classes[node.name] = (found["openapi_types"], found["attribute_map"])
    return classes


def _k8s_ref(name: str, k8s: dict[str, Any]) -> dict[str, Any] | None:
    """`V1Container` (kubernetes client) or `K8sIoApiAppsV1DeploymentStrategy` -> a definitions $ref."""
    match = re.fullmatch(r"K8sIoApi([A-Z][a-z]+)(V\d\w*?)([A-Z]\w+)", name)
    if match:
        group, version, kind = match.groups()
        candidates = [f"io.k8s.api.{group.lower()}.{version.lower()}.{kind}"]
    else:
        match = re.fullmatch(r"(V\d(?:alpha\d|beta\d)?)([A-Z]\w+)", name)
        if not match:
            return None
        version, kind = match.group(1).lower(), match.group(2)
        candidates = [
            f"io.k8s.api.core.{version}.{kind}",
            f"io.k8s.apimachinery.pkg.apis.meta.{version}.{kind}",
        ]
    for candidate in candidates:
        if candidate in k8s["$defs"]:
            return {"$ref": f"{K8S_DEFINITIONS}#/$defs/{candidate}"}
    return None


def kserve_schema(models_dir: Path) -> dict[str, Any]:
    """JSON schema of `InferenceService` (spec only; status is the controller's) from the SDK's models."""
    classes, k8s, definitions = _sdk_classes(models_dir), _k8s_definitions(), {}
    quantity = {"anyOf": [{"type": "string"}, {"type": "number"}]}

    def convert(type_name: str) -> dict[str, Any]:  # noqa: PLR0911 - one return per kind of type name
        scalars = {"str": "string", "int": "integer", "bool": "boolean", "float": "number"}
        if type_name in scalars:
            return {"type": scalars[type_name]}
        if type_name == "object":
            return {}
        if type_name.startswith("list[") and type_name.endswith("]"):
            return {"type": "array", "items": convert(type_name[5:-1])}
        if type_name.startswith("dict(str, ") and type_name.endswith(")"):
            return {"type": "object", "additionalProperties": convert(type_name[10:-1])}
        if type_name in ("ResourceQuantity", "V1beta1MetricQuantity"):
            return quantity
        if type_name in classes:
            if type_name not in definitions:
                definitions[type_name] = {}  # placeholder first: the models are recursive
                definitions[type_name] = object_schema(type_name)
            return {"$ref": f"#/$defs/{type_name}"}
        return _k8s_ref(type_name, k8s) or {}  # Knative/KEDA status types: not checked

    def object_schema(class_name: str) -> dict[str, Any]:
        types, keys = classes[class_name]
        properties = {keys[attr]: convert(kind) for attr, kind in types.items() if attr != "status"}
        return {"type": "object", "properties": properties, "additionalProperties": False}

    root = object_schema("V1beta1InferenceService")
    root["properties"]["apiVersion"] = {"const": "serving.kserve.io/v1beta1"}
    root["properties"]["kind"] = {"const": "InferenceService"}
    root["required"] = ["apiVersion", "kind", "metadata", "spec"]
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "description": f"InferenceService, generated by tests/deploy/crdschemas.py from the {KSERVE_SDK} SDK",
        **root,
        "$defs": definitions,
    }


def prometheus_operator_schema(kind: str) -> dict[str, Any]:
    """JSON schema of one Prometheus Operator kind (`ServiceMonitor`, `PrometheusRule`) from cloudcoil's
    pydantic models of the operator's CRDs."""
    # Only to regenerate the committed schema, which needs cloudcoil (not a test dependency).
    from cloudcoil.models.prometheus_operator import v1  # type: ignore[import-not-found]  # noqa: PLC0415

    schema: dict[str, Any] = _strict(getattr(v1, kind).model_json_schema(by_alias=True))
    schema["$defs"].pop("ObjectMeta", None)
    schema["properties"]["metadata"] = {
        "$ref": f"{K8S_DEFINITIONS}#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
    }
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    described = ", ".join(PROMETHEUS_OPERATOR_MODELS)
    schema["description"] = f"{kind}, generated by tests/deploy/crdschemas.py from {described}"
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def _unused_defs_removed(schema: dict[str, Any]) -> dict[str, Any]:
    """Drop definitions nothing reachable refers to (e.g. what only the removed ObjectMeta used)."""
    definitions = schema.get("$defs", {})
    reachable: set[str] = set()
    pending = [{key: value for key, value in schema.items() if key != "$defs"}]
    while pending:
        for name in re.findall(r'"#/\$defs/([^"]+)"', json.dumps(pending.pop())):
            if name not in reachable:
                reachable.add(name)
                pending.append(definitions[name])
    return {**schema, "$defs": {name: definitions[name] for name in sorted(reachable)}}


def main() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        site = Path(scratch)
        packages = [KSERVE_SDK, *PROMETHEUS_OPERATOR_MODELS]
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-deps",
                "--target",
                str(site),
                *packages,
            ],
            check=True,
        )
        sys.path.insert(0, str(site))
        outputs = {
            "InferenceService": kserve_schema(site / "kserve" / "models"),
            "ServiceMonitor": prometheus_operator_schema("ServiceMonitor"),
            "PrometheusRule": prometheus_operator_schema("PrometheusRule"),
        }
    for (_, kind), name in SCHEMA_FILES.items():
        text = json.dumps(_unused_defs_removed(outputs[kind]), indent=1, sort_keys=True)
        (SCHEMA_DIR / name).write_text(text + "\n", encoding="utf-8")
        print(f"wrote {SCHEMA_DIR / name}")


if __name__ == "__main__":
    main()
