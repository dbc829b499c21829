"""The Grafana dashboard: valid PromQL that names only what the real service exports on /metrics.

Every panel narrows model series to the `$model`/`$version` selection, and the state timeline's query is
run by Prometheus's own engine (`promtool test rules`) over a version swap.

The live half starts the real app (`service.app.create_app`) under uvicorn on a free loopback port with a
tiny LeNet-5 exported by the training package's exporter, sends a few good and bad requests, and reads
/metrics back.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from dashboardqueries import Query, dashboard_queries, label_names, metric_names, selectors
from deployfiles import DASHBOARD_FILE, GRAFANA_DIR, PROMETHEUS_CONFIG, PROMTOOL_MISSING
from prometheus_client.parser import text_string_to_metric_families

from tests.liveserver import LiveServer
from tests.photos import jpeg
from tests.tinymodel import zero_inputs

# Sample-name suffixes each metric type exposes in the text format.
_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "gauge": ("",),
    "summary": ("", "_sum", "_count"),
}
# Labels Prometheus attaches at scrape time, which the service itself never exposes.
_SCRAPE_LABELS = {"instance", "job"}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def queries() -> list[Query]:
    found = dashboard_queries(DASHBOARD_FILE)
    assert len(found) >= 10, "the dashboard should hold its panels' queries"
    return found


def test_every_query_uses_the_provisioned_datasource(dashboard: dict[str, Any]) -> None:
    provisioning = yaml.safe_load(
        (GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text(encoding="utf-8")
    )
    uid = provisioning["datasources"][0]["uid"]

    def check(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            if panel.get("type") != "row":
                assert panel["datasource"]["uid"] == uid, f"panel {panel['title']!r} uses another datasource"
            for target in panel.get("targets", []):
                assert target["datasource"]["uid"] == uid
            check(panel.get("panels", []))

    check(dashboard["panels"])


def test_dashboard_has_the_panels_issue_4_asks_for(dashboard: dict[str, Any]) -> None:
    titles = " | ".join(panel["title"].lower() for panel in dashboard["panels"])
    for wanted in (
        "throughput",
        "p50 / p95 / p99",
        "batch size distribution",
        "queue depth",
        "queue wait vs inference",
        "rejections by reason",
        "errors by status",
        "predicted class",
        "confidence",
        "model loads",
        "model load duration",
        "model version states",
    ):
        assert wanted in titles, f"no panel about {wanted!r}"


def test_model_and_version_variables_list_loaded_versions(dashboard: dict[str, Any]) -> None:
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    model, version = variables["model"], variables["version"]
    assert model["query"]["query"] == "label_values(convserve_model_info, model)"
    # The version list follows the model selection.
    assert version["query"]["query"] == 'label_values(convserve_model_info{model=~"$model"}, version)'
    for variable in (model, version):
        assert variable["multi"] and variable["includeAll"], f"${variable['name']}: several values and All"
        # All as `.*`, not the list of current versions: an unloaded version's history stays visible.
        assert variable["allValue"] == ".*"


def test_dashboard_panels_do_not_overlap(dashboard: dict[str, Any]) -> None:
    occupied: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, f"panel {panel['title']!r} is wider than the grid"
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in occupied, f"{panel['title']!r} overlaps {occupied.get((x, y))!r}"
                occupied[(x, y)] = panel["title"]


def test_every_query_is_valid_promql(queries: list[Query], tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip(PROMTOOL_MISSING)
    # promtool parses recording rules with the real PromQL parser.
    promql = list(queries)
    for query in promql:
        assert "$" not in query.promql(), f"{query.where}: unknown Grafana variable in {query.expr}"
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard_query_{n}", "expr": q.promql()} for n, q in enumerate(promql)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules), encoding="utf-8")
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, f"promtool rejects a dashboard query:\n{result.stdout}{result.stderr}"


def test_state_timeline_shows_each_version_through_a_swap(queries: list[Query], tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip(PROMTOOL_MISSING)
    # Prometheus's own engine (promtool test rules) runs the panel's query over a swap from version 1 to 2
    # on one instance: 2 loads while 1 serves, 1 drains, then leaves. A multi-worker server zeroes a
    # series it retires instead of removing it, as these do (one sample per minute).
    (timeline,) = [query for query in queries if query.where.startswith("panel 'Model version states'")]
    info = 'convserve_model_info{{model="digits", version="{}", state="{}", provider="CPU"}}'
    series = {
        info.format(1, "READY"): "1 1 1 1 0 0 0",
        info.format(1, "UNLOADING"): "_ _ _ _ 1 1 0",
        info.format(2, "LOADING"): "1 1 0 0 0 0 0",
        info.format(2, "READY"): "_ _ 1 1 1 1 1",
        info.format(3, "UNAVAILABLE"): "_ _ _ _ _ 1 1",  # a failed load
    }
    expected = {  # minute -> version -> shown value (1 READY, 2 LOADING, 3 UNLOADING, 4 UNAVAILABLE, 0 gone)
        1: {"1": 1, "2": 2},
        3: {"1": 1, "2": 1},
        5: {"1": 3, "2": 1, "3": 4},
        6: {"1": 0, "2": 1, "3": 4},
    }
    tests = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": name, "values": values} for name, values in series.items()],
                "promql_expr_test": [
                    {
                        "expr": timeline.promql(),
                        "eval_time": f"{minute}m",
                        "exp_samples": [
                            {"labels": f'{{model="digits", version="{version}"}}', "value": value}
                            for version, value in shown.items()
                        ],
                    }
                    for minute, shown in expected.items()
                ],
            }
        ],
    }
    path = tmp_path / "timeline-test.yml"
    path.write_text(yaml.safe_dump(tests), encoding="utf-8")
    result = subprocess.run(
        [promtool, "test", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, f"the state timeline shows other states:\n{result.stdout}{result.stderr}"


def test_query_reader_finds_metric_and_label_names() -> None:
    # Guards the reader the live test relies on, on the constructs the dashboard uses.
    expr = (
        'histogram_quantile(0.95, sum by (le, endpoint) (rate(convserve_x_bucket{status!~"2..", '
        'endpoint=~"$endpoint"}[$__rate_interval]))) / scalar(sum(rate(convserve_y_total[5m])))'
    )
    assert metric_names(expr) == {"convserve_x_bucket", "convserve_y_total"}
    assert label_names(expr) == {"le", "endpoint", "status"}
    assert selectors(expr) == [
        ("convserve_x_bucket", 'status!~"2..", endpoint=~"$endpoint"'),
        ("convserve_y_total", ""),
    ]
    variable = 'label_values(convserve_z_total{status!="200"}, endpoint)'
    assert metric_names(variable) == {"convserve_z_total"}
    assert label_names(variable) == {"endpoint", "status"}
    assert Query("variable", variable).promql() == 'count by (endpoint) (convserve_z_total{status!="200"})'


# --- against the live service ------------------------------------------------------------------------


def exposed_series(metrics_text: str) -> dict[str, set[str]]:
    """Every sample name /metrics can expose, with the label names it carries.

    Derived from each family's type as well as from the samples present, so that a labelled metric with
    no observation yet (exposed as HELP/TYPE lines only) still counts as exported.
    """
    series: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(metrics_text):
        labels: set[str] = set()
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
            labels.update(name for name in sample.labels if name not in {"le", "quantile"})
        for suffix in _SUFFIXES.get(family.type, ("",)):
            series.setdefault(family.name + suffix, set()).update(labels)
            if suffix == "_bucket":
                series[family.name + suffix].add("le")
    return series


def scrape_target_labels() -> set[str]:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text(encoding="utf-8"))
    labels = set(_SCRAPE_LABELS)
    for job in config["scrape_configs"]:
        for group in job.get("static_configs", []):
            labels.update(group.get("labels", {}))
    return labels


@pytest.fixture(scope="module")
def metrics_after_traffic(live_server: LiveServer) -> str:
    """/metrics after a good image, a good tensor, and inputs the service must reject."""
    chelsea, coffee = jpeg("chelsea"), jpeg("coffee")
    with httpx.Client(base_url=live_server.url, timeout=30) as client:
        good = client.post("/predict", files=[("a", ("cat.jpg", chelsea, "image/jpeg"))])
        assert good.status_code == 200, good.text
        good_many = client.post(
            "/predict",
            files=[("a", ("cat.jpg", chelsea, "image/jpeg")), ("b", ("coffee.jpg", coffee, "image/jpeg"))],
        )
        assert good_many.status_code == 200, good_many.text
        tensor = client.post("/predict", json={"inputs": zero_inputs(2)})
        assert tensor.status_code == 200, tensor.text
        # Only failure is asserted here: which 4xx is right is the service tests' business; these two
        # exist to put error statuses and rejections on /metrics.
        unsupported = client.post("/predict", content=b"hello", headers={"Content-Type": "text/plain"})
        assert unsupported.status_code >= 400
        wrong_shape = client.post("/predict", json={"inputs": [[[0.0]]]})
        assert wrong_shape.status_code >= 400
        metrics = client.get("/metrics")
    assert metrics.status_code == 200
    return metrics.text


def test_dashboard_queries_name_only_metrics_the_service_exports(
    queries: list[Query], metrics_after_traffic: str
) -> None:
    exposed = exposed_series(metrics_after_traffic)
    missing = {
        query.where: sorted(metric_names(query.expr) - exposed.keys())
        for query in queries
        if metric_names(query.expr) - exposed.keys()
    }
    assert missing == {}, (
        f"dashboard queries name metrics /metrics does not expose; exposed: {sorted(exposed)}"
    )
    for query in queries:
        assert metric_names(query.expr), f"{query.where} selects no metric: {query.expr}"


def test_dashboard_queries_use_only_labels_those_metrics_carry(
    queries: list[Query], metrics_after_traffic: str
) -> None:
    exposed = exposed_series(metrics_after_traffic)
    scrape_labels = scrape_target_labels()
    for query in queries:
        available = set(scrape_labels)
        for name in metric_names(query.expr):
            available |= exposed.get(name, set())
        unknown = label_names(query.expr) - available
        assert not unknown, f"{query.where} uses labels {sorted(unknown)} that its metrics do not carry"


def test_panels_filter_model_series_on_the_selected_versions(
    queries: list[Query], metrics_after_traffic: str
) -> None:
    # A selector that forgot the filter would mix every model into a panel the user narrowed to one.
    exposed = exposed_series(metrics_after_traffic)
    wanted = {"model": 'model=~"$model"', "version": 'version=~"$version"'}
    checked = set()
    for query in queries:
        if not query.where.startswith("panel"):
            continue  # the variables' own queries list the values the filters choose from
        for name, matchers in selectors(query.expr):
            for label, matcher in wanted.items():
                if label in exposed.get(name, set()):
                    checked.add(name)
                    assert matcher in matchers, f"{query.where}: {name} is not filtered on {matcher}"
    assert {"convserve_model_info", "convserve_model_loads_total", "convserve_batch_size_sum"} <= checked


def test_traffic_fills_the_series_the_main_panels_plot(metrics_after_traffic: str) -> None:
    # The dashboard would be empty if these stayed at zero after successful predictions.
    observed = {
        sample.name: sample.value
        for family in text_string_to_metric_families(metrics_after_traffic)
        for sample in family.samples
        if not sample.labels or sample.name.endswith(("_count", "_total"))
    }
    for name in (
        "convserve_batch_size_count",
        "convserve_inference_duration_seconds_count",
        "convserve_queue_wait_seconds_count",
        "convserve_preprocess_duration_seconds_count",
        "convserve_prediction_confidence_count",
    ):
        assert observed.get(name, 0) > 0, f"{name} did not move after successful predictions"
