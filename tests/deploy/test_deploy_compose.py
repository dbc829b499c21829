"""docker-compose.yml and its CPU override: valid Compose, and wired the way the README promises."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from deployfiles import (
    COMPOSE_CPU_FILE,
    COMPOSE_FILE,
    DOCKERFILE,
    GRAFANA_DIR,
    PROMETHEUS_CONFIG,
    REPO_ROOT,
    merge_compose,
    strip_compose_tags,
    venv_tool,
)


def validate_against_compose_spec(document: dict[str, Any], tmp_path: Path, name: str) -> None:
    """Validate with check-jsonschema's vendored copy of the Compose Specification schema (offline).

    The document goes through JSON so that Compose's `!reset`/`!override` tags, which check-jsonschema's
    YAML reader rejects, are already resolved to their plain values.
    """
    tool = venv_tool("check-jsonschema")
    assert tool, "check-jsonschema is missing: install the dev extra (pip install -e '.[dev]')"
    instance = tmp_path / f"{name}.json"
    instance.write_text(json.dumps(strip_compose_tags(document)), encoding="utf-8")
    result = subprocess.run(
        [tool, "--builtin-schema", "vendor.compose-spec", str(instance)],
        capture_output=True,
        text=True,
        check=False,
    )
    report = result.stdout + result.stderr
    assert result.returncode == 0, f"{name} violates the Compose Specification:\n{report}"


def test_compose_file_matches_compose_specification_schema(compose: dict[str, Any], tmp_path: Path) -> None:
    validate_against_compose_spec(compose, tmp_path, COMPOSE_FILE.name)


def test_cpu_override_and_merged_result_match_compose_specification_schema(
    compose: dict[str, Any], compose_cpu: dict[str, Any], tmp_path: Path
) -> None:
    validate_against_compose_spec(compose_cpu, tmp_path, COMPOSE_CPU_FILE.name)
    validate_against_compose_spec(merge_compose(compose, compose_cpu), tmp_path, "merged")


def test_schema_validation_rejects_a_misspelled_service_key(compose: dict[str, Any], tmp_path: Path) -> None:
    # Guards the check itself: a schema run that accepted anything would pass every test above.
    broken = strip_compose_tags(compose)
    broken["services"]["service"]["healthcheck"]["intervall"] = "10s"
    with pytest.raises(AssertionError, match="violates the Compose Specification"):
        validate_against_compose_spec(broken, tmp_path, "broken")


def test_service_reserves_one_nvidia_gpu_which_it_serves_as_device_0(compose: dict[str, Any]) -> None:
    devices = compose["services"]["service"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "device_ids": ["${GPU_DEVICE:-0}"], "capabilities": ["gpu"]}]
    assert compose["services"]["service"]["environment"]["CONVSERVE_GPU_DEVICE_ID"] == "0"


def test_service_is_built_from_the_repository_dockerfile_and_publishes_port_8000(
    compose: dict[str, Any],
) -> None:
    service = compose["services"]["service"]
    assert service["build"]["context"] == "."
    assert (REPO_ROOT / service["build"]["dockerfile"]).resolve() == DOCKERFILE
    assert "8000:8000" in service["ports"]
    assert service["environment"]["CONVSERVE_PORT"] == "8000"


def test_service_healthcheck_runs_the_image_readiness_probe(compose: dict[str, Any]) -> None:
    healthcheck = compose["services"]["service"]["healthcheck"]
    assert healthcheck["test"] == ["CMD", "python", "/opt/convserve/healthcheck.py"]
    dockerfile = DOCKERFILE.read_text(encoding="utf-8")
    assert "COPY deploy/healthcheck.py /opt/convserve/healthcheck.py" in dockerfile
    assert re.search(r'HEALTHCHECK .*\n?.*CMD \["python", "/opt/convserve/healthcheck.py"\]', dockerfile)
    for key in ("interval", "timeout", "retries", "start_period"):
        assert key in healthcheck, f"healthcheck should set {key}"


def test_models_directory_is_mounted_read_only(compose: dict[str, Any]) -> None:
    mounts = compose["services"]["service"]["volumes"]
    models = [m for m in mounts if isinstance(m, dict) and m.get("target") == "/app/models"]
    assert models, "the host's ./models must be mounted at /app/models"
    assert models[0]["type"] == "bind"
    assert models[0]["source"] == "./models"
    assert models[0]["read_only"] is True


def test_settings_come_from_an_optional_dot_env_file(compose: dict[str, Any]) -> None:
    env_files = compose["services"]["service"]["env_file"]
    assert {"path": ".env", "required": False} in env_files


def test_prometheus_mounts_the_repository_config_with_retention(compose: dict[str, Any]) -> None:
    prometheus = compose["services"]["prometheus"]
    assert prometheus["image"].startswith("prom/prometheus:v")
    config_target = next(
        m["target"] for m in prometheus["volumes"] if m.get("source") == "./deploy/prometheus/prometheus.yml"
    )
    assert (REPO_ROOT / "deploy/prometheus/prometheus.yml") == PROMETHEUS_CONFIG
    assert f"--config.file={config_target}" in prometheus["command"]
    assert any(flag.startswith("--storage.tsdb.retention.time=") for flag in prometheus["command"])


def test_grafana_mounts_provisioning_and_dashboards_that_exist(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    assert grafana["image"].startswith("grafana/grafana:")
    binds = {m["source"]: m["target"] for m in grafana["volumes"] if m["type"] == "bind"}
    assert binds["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    assert binds["./deploy/grafana/dashboards"] == "/var/lib/grafana/dashboards"
    assert (GRAFANA_DIR / "provisioning" / "datasources").is_dir()
    assert (GRAFANA_DIR / "provisioning" / "dashboards").is_dir()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (GRAFANA_DIR / "dashboards" / Path(home).name).is_file()


def test_every_bind_mount_source_exists_in_the_repository(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for mount in service.get("volumes", []):
            if mount["type"] != "bind" or mount["source"] == "./models":  # ./models is created on demand
                continue
            assert (REPO_ROOT / mount["source"]).exists(), f"{name} mounts missing {mount['source']}"


def test_cpu_override_drops_the_gpu_reservation_and_builds_on_plain_ubuntu(
    compose: dict[str, Any], compose_cpu: dict[str, Any]
) -> None:
    merged = merge_compose(compose, compose_cpu)["services"]["service"]
    assert "devices" not in merged["deploy"]["resources"]["reservations"]
    assert merged["build"]["args"]["RUNTIME_BASE"].startswith("ubuntu:")
    assert merged["build"]["dockerfile"] == "Dockerfile"
    assert merged["image"] != compose["services"]["service"]["image"]
    # Everything else (healthcheck, models mount, env file) is inherited unchanged.
    assert merged["healthcheck"] == compose["services"]["service"]["healthcheck"]
    assert merged["volumes"] == compose["services"]["service"]["volumes"]


def test_cpu_override_build_argument_is_declared_by_the_dockerfile(compose_cpu: dict[str, Any]) -> None:
    declared = set(re.findall(r"^ARG (\w+)", DOCKERFILE.read_text(encoding="utf-8"), flags=re.MULTILINE))
    for argument in compose_cpu["services"]["service"]["build"]["args"]:
        assert argument in declared, f"docker-compose.cpu.yml passes {argument}, which the Dockerfile ignores"
