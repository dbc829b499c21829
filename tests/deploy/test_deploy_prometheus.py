"""deploy/prometheus: the config and the alerting rules, accepted and unit-tested by promtool, wired into
Compose and the Kubernetes monitoring overlay."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from crdschemas import custom_resource_errors
from deployfiles import GRAFANA_DIR, PROMETHEUS_CONFIG, PROMTOOL_MISSING, REPO_ROOT


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


# --- alerting and recording rules ------------------------------------------------------------------------

RULES_DIR = PROMETHEUS_CONFIG.parent / "rules"
RULE_TESTS = Path(__file__).resolve().parent / "promtool" / "rules_test.yml"
PROMETHEUS_RULE = REPO_ROOT / "deploy" / "k8s" / "monitoring" / "prometheusrule.yaml"


def rule_files() -> list[Path]:
    files = sorted(RULES_DIR.glob("*.yml"))
    assert files, f"no rule files in {RULES_DIR}"
    return files


def test_config_loads_every_rules_file(prometheus_config: dict[str, Any], compose: dict[str, Any]) -> None:
    assert prometheus_config["rule_files"] == ["rules/*.yml"]
    binds = {
        m["source"]: m["target"] for m in compose["services"]["prometheus"]["volumes"] if m["type"] == "bind"
    }
    config_dir = Path(binds["./deploy/prometheus/prometheus.yml"]).parent
    assert binds["./deploy/prometheus/rules"] == str(config_dir / "rules")


def test_promtool_accepts_the_rule_files() -> None:
    result = subprocess.run(
        [promtool(), "check", "rules", *map(str, rule_files())], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, f"promtool check rules failed:\n{result.stdout}{result.stderr}"


def test_promtool_unit_tests_of_the_alerts_pass() -> None:
    result = subprocess.run(
        [promtool(), "test", "rules", str(RULE_TESTS)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, f"promtool test rules failed:\n{result.stdout}{result.stderr}"


def test_every_shipped_alert_has_a_unit_test() -> None:
    alerts = {
        rule["alert"]
        for path in rule_files()
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }
    tests = yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))["tests"]
    tested = {case["alertname"] for test in tests for case in test.get("alert_rule_test", [])}
    assert alerts <= tested, f"alerts without a promtool test: {sorted(alerts - tested)}"
    assert {
        "ConvserveDown",
        "ConvserveNotReady",
        "ConvserveModelLoadFailed",
        "ConvserveSaturated",
        "ConvserveHigh5xxRate",
        "ConvserveHighLatencyP99",
    } <= alerts


def test_promtool_unit_tests_fail_when_an_alert_changes(tmp_path: Path) -> None:
    # Guards the check above: the same tests against rules whose ConvserveDown waits 5 m must fail.
    rules = (RULES_DIR / "convserve.yml").read_text(encoding="utf-8")
    changed = rules.replace(
        'expr: up{job="convserve"} == 0\n        for: 1m', 'expr: up{job="convserve"} == 0\n        for: 5m'
    )
    assert changed != rules
    (tmp_path / "deploy" / "prometheus" / "rules").mkdir(parents=True)
    (tmp_path / "deploy" / "prometheus" / "rules" / "convserve.yml").write_text(changed, encoding="utf-8")
    (tmp_path / "tests" / "deploy" / "promtool").mkdir(parents=True)
    copy = tmp_path / "tests" / "deploy" / "promtool" / RULE_TESTS.name
    copy.write_text(RULE_TESTS.read_text(encoding="utf-8"), encoding="utf-8")
    result = subprocess.run([promtool(), "test", "rules", str(copy)], capture_output=True, check=False)
    assert result.returncode != 0


def test_kubernetes_prometheusrule_holds_the_same_groups_as_the_rules_file() -> None:
    rule = yaml.safe_load(PROMETHEUS_RULE.read_text(encoding="utf-8"))
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    groups = [
        group for path in rule_files() for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]
    ]
    assert rule["spec"]["groups"] == groups, (
        f"{PROMETHEUS_RULE.relative_to(REPO_ROOT)} differs from deploy/prometheus/rules/: copy its groups"
    )
    kustomization = yaml.safe_load(
        (PROMETHEUS_RULE.parent / "kustomization.yaml").read_text(encoding="utf-8")
    )
    assert PROMETHEUS_RULE.name in kustomization["resources"]


def test_kubernetes_prometheusrule_matches_the_operator_schema() -> None:
    rule = yaml.safe_load(PROMETHEUS_RULE.read_text(encoding="utf-8"))
    assert custom_resource_errors(rule) == []
    # Guards the check: the schema must refuse a misspelt key.
    rule["spec"]["groups"][0]["rules"][0]["expresion"] = "up"
    assert custom_resource_errors(rule), "the PrometheusRule schema accepted an unknown key"
