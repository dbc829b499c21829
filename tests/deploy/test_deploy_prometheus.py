"""deploy/prometheus/prometheus.yml: accepted by promtool and pointed at the compose service."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from deployfiles import GRAFANA_DIR, PROMETHEUS_CONFIG, PROMTOOL_MISSING


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip(PROMTOOL_MISSING)
    return path


@pytest.fixture(scope="module")
def prometheus_config() -> dict[str, Any]:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text(encoding="utf-8"))
    assert isinstance(config, dict)
    return config


def test_promtool_accepts_the_prometheus_config() -> None:
    result = subprocess.run(
        [promtool(), "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, f"promtool check config failed:\n{result.stdout}{result.stderr}"


def test_promtool_rejects_a_broken_config(tmp_path: Path) -> None:
    # Guards the check above: promtool must fail on a config with a wrongly typed duration.
    broken = tmp_path / "prometheus.yml"
    broken.write_text("global:\n  scrape_interval: five seconds\n", encoding="utf-8")
    result = subprocess.run([promtool(), "check", "config", str(broken)], capture_output=True, check=False)
    assert result.returncode != 0


def test_scrapes_the_compose_service_metrics_every_5_seconds(
    prometheus_config: dict[str, Any], compose: dict[str, Any]
) -> None:
    assert prometheus_config["global"]["scrape_interval"] == "5s"
    jobs = prometheus_config["scrape_configs"]
    convserve = next(job for job in jobs if job["job_name"] == "convserve")
    assert convserve.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for group in convserve["static_configs"] for t in group["targets"]]
    assert targets == ["service:8000"]
    host, port = targets[0].split(":")
    assert host in compose["services"]
    assert compose["services"][host]["environment"]["CONVSERVE_PORT"] == port


def test_grafana_datasource_points_at_the_compose_prometheus(compose: dict[str, Any]) -> None:
    provisioning = yaml.safe_load(
        (GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text(encoding="utf-8")
    )
    source = provisioning["datasources"][0]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    assert "prometheus" in compose["services"]
    assert "9090:9090" in compose["services"]["prometheus"]["ports"]
