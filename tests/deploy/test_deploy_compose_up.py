"""`docker compose up` of the real docker-compose.yml + docker-compose.cpu.yml, checked through its ports.

The stack is the one the README tells a CPU host to run, with tests/deploy/compose/offline.yml on top
(what an offline machine forces, each line with its reason): the service from the image the image test
builds, Prometheus with the repository's config and rules. Grafana is left out of `up` (no image can be
had offline); its provisioning is checked statically. Skips with one line when no Docker daemon answers.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import yaml
from composestack import ENABLE_HINT, Stack, compose_unavailable, prometheus_image, seeded_models_dir
from deployfiles import COMPOSE_FILE, PROMETHEUS_CONFIG, load_compose
from dockerimage import (
    DEFAULT_BUILD_BUDGET_S,
    FIGURES,
    IMAGE_TAG,
    build_image,
    build_plan,
    docker,
)
from loadclients import ACCESS_LINE, access_line, drain_outcome, steady_load

from modelcontract import MODEL_FILENAME, complete_versions, publish_version
from tests.liveserver import free_port
from tests.photos import jpeg
from tests.waiting import wait_until

_BUDGET_S = float(os.environ.get("IMAGE_BUILD_BUDGET_S", DEFAULT_BUILD_BUDGET_S))
pytestmark = [pytest.mark.compose, pytest.mark.timeout(int(_BUDGET_S) + 900)]

_UNAVAILABLE = compose_unavailable()
if _UNAVAILABLE:
    pytest.skip(f"compose test not run: {_UNAVAILABLE}; to enable it, {ENABLE_HINT}", allow_module_level=True)

CAT_CLASSES = {281, 282, 285}  # ImageNet tabby, tiger cat, Egyptian cat: scikit-image's chelsea
RULES_DIR = PROMETHEUS_CONFIG.parent / "rules"
REQUEST_ID = "compose-test-cat"
# Bounds on waiting for things that will happen; generous, since they only decide how long a broken
# stack takes to fail. The service's own bound is its healthcheck's start period (docker-compose.yml).
UP_TIMEOUT_S = 300
PROMETHEUS_TIMEOUT_S = 120
# ConvserveDown has `for: 1m`; add an evaluation interval, a scrape and a margin.
ALERT_TIMEOUT_S = 240


def _duration_s(text: str) -> float:
    """A Compose or Prometheus duration of whole seconds or minutes ("5s", "1m"), in seconds."""
    match = re.fullmatch(r"(\d+)(s|m)", text)
    assert match, f"unexpected duration {text!r}"
    return int(match.group(1)) * {"s": 1.0, "m": 60.0}[match.group(2)]


def _scrape_interval_s() -> float:
    return _duration_s(
        yaml.safe_load(PROMETHEUS_CONFIG.read_text(encoding="utf-8"))["global"]["scrape_interval"]
    )


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    try:
        plan = build_plan()
        prometheus, prometheus_note = prometheus_image()
    except LookupError as exc:
        pytest.skip(f"compose test not run: {exc}; to enable it, {ENABLE_HINT}")
    build_image(plan, _BUDGET_S)
    notes = [*plan.notes, *([prometheus_note] if prometheus_note else [])]
    FIGURES["compose substitutions"] = "; ".join(notes) or "none"
    stack = Stack(IMAGE_TAG, prometheus, free_port(), free_port(), seeded_models_dir(IMAGE_TAG))
    started = time.monotonic()
    try:
        stack.compose(
            "up",
            "--detach",
            "--wait",
            "--wait-timeout",
            str(UP_TIMEOUT_S),
            "service",
            "prometheus",
            timeout=UP_TIMEOUT_S + 60,
        )
        FIGURES["compose up --wait to healthy"] = f"{time.monotonic() - started:.1f} s"
        yield stack
    finally:
        stack.client.close()
        stack.compose("down", "--volumes", "--remove-orphans", "--timeout", "60", timeout=180, check=False)
        shutil.rmtree(stack.models_dir, ignore_errors=True)


def test_up_wait_returns_with_the_service_healthy(stack: Stack) -> None:
    assert stack.health("service") == "healthy"


def test_predict_through_the_published_port_names_the_cat(stack: Stack) -> None:
    files = {"file": ("chelsea.jpg", jpeg("chelsea"), "image/jpeg")}
    response = httpx.post(
        f"{stack.service_url}/predict", files=files, headers={"X-Request-ID": REQUEST_ID}, timeout=60
    )
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0][0]["index"] in CAT_CLASSES, response.json()


def test_grpc_through_the_published_port_names_the_cat(stack: Stack) -> None:
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{stack.grpc_port}")
    try:
        assert client.is_server_ready()
        (model,) = client.get_model_repository_index(as_json=True)["models"]
        output = client.get_model_metadata(model["name"], as_json=True)["outputs"][0]["name"]
        image = grpcclient.InferInput("image", [1], "BYTES")
        image.set_data_from_numpy(np.array([jpeg("chelsea")], dtype=np.object_))
        top1 = grpcclient.InferRequestedOutput(output, class_count=1)
        (best,) = client.infer(model["name"], [image], outputs=[top1]).as_numpy(output)[0]
    finally:
        client.close()
    assert int(best.decode().split(":")[1]) in CAT_CLASSES, best


def _samples(stack: Stack, selector: str) -> list[tuple[float, float]]:
    """The raw samples of the last two minutes of one series, as (timestamp, value)."""
    result = stack.query(f"{selector}[2m]")
    assert len(result) <= 1, f"{selector} matches several series: {result}"
    return [(float(t), float(v)) for t, v in result[0]["values"]] if result else []


def test_prometheus_scrapes_the_service_and_counts_a_request_within_two_scrapes(stack: Stack) -> None:
    sent_at = time.time()  # Prometheus and this test share the host's clock
    files = {"file": ("chelsea.jpg", jpeg("chelsea"), "image/jpeg")}
    response = httpx.post(f"{stack.service_url}/predict", files=files, timeout=60)
    assert response.status_code == 200, response.text
    counter = 'convserve_requests_total{job="convserve", endpoint="/predict", status="200"}'
    # Strictly more than before this request: the earlier test's request may already be counted.
    before = max((v for t, v in _samples(stack, counter) if t < sent_at), default=0.0)

    def counted() -> bool:
        return any(t >= sent_at and v > before for t, v in _samples(stack, counter))

    wait_until(counted, "Prometheus counting the request", PROMETHEUS_TIMEOUT_S)
    first_counted = min(t for t, v in _samples(stack, counter) if t >= sent_at and v > before)
    scrapes = [t for t, _ in _samples(stack, 'up{job="convserve"}') if sent_at <= t <= first_counted]
    FIGURES["compose scrape delay"] = (
        f"{first_counted - sent_at:.1f} s (scrape interval {_scrape_interval_s():.0f} s)"
    )
    assert len(scrapes) <= 2, f"the request was counted only at the {len(scrapes)}th scrape after it"
    assert [float(r["value"][1]) for r in stack.query('up{job="convserve"}')] == [1.0]


def test_every_rule_file_loads_and_evaluates_in_the_running_prometheus(stack: Stack) -> None:
    expected = {path.name for path in RULES_DIR.glob("*.yml")}
    shipped = {
        rule.get("alert") or rule["record"]
        for path in RULES_DIR.glob("*.yml")
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]
        for rule in group["rules"]
    }

    def groups() -> list[dict[str, Any]]:
        return list(stack.api("rules")["groups"])

    def all_evaluated() -> bool:
        rules = [rule for group in groups() for rule in group["rules"]]
        return bool(rules) and all(rule["health"] != "unknown" for rule in rules)

    wait_until(all_evaluated, "every rule evaluated once", PROMETHEUS_TIMEOUT_S)
    loaded = groups()
    assert {group["file"].rsplit("/", 1)[-1] for group in loaded} == expected
    rules = {rule["name"]: rule for group in loaded for rule in group["rules"]}
    assert set(rules) == shipped
    unhealthy = {name: rule.get("lastError") for name, rule in rules.items() if rule["health"] != "ok"}
    assert not unhealthy, f"rules failing in Prometheus: {unhealthy}"


def test_a_version_dropped_into_models_on_the_host_is_served(stack: Stack) -> None:
    """Poll mode: a new version published into the host's models directory is loaded by the running
    container and answers, the way a user updates a model without restarting anything."""
    (model_dir,) = [path for path in stack.models_dir.iterdir() if path.is_dir()]
    versions = complete_versions(model_dir)
    staging = model_dir / ".staging"
    staging.mkdir(mode=0o755)
    shutil.copy(model_dir / str(versions[-1]) / MODEL_FILENAME, staging / MODEL_FILENAME)
    (staging / MODEL_FILENAME).chmod(0o644)
    new = int(publish_version(staging, model_dir).name)
    ready = f"{stack.service_url}/v2/models/{model_dir.name}/versions/{new}/ready"
    seconds = wait_until(lambda: httpx.get(ready, timeout=10).status_code == 200, f"version {new} ready", 180)
    FIGURES["compose new version picked up"] = f"version {new} ready {seconds:.1f} s after it was published"
    files = {"file": ("chelsea.jpg", jpeg("chelsea"), "image/jpeg")}
    response = httpx.post(f"{stack.service_url}/predict", params={"version": new}, files=files, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["model"] == {"name": model_dir.name, "version": new}
    assert response.json()["predictions"][0][0]["index"] in CAT_CLASSES, response.json()


def _firing(stack: Stack, alertname: str) -> bool:
    return any(
        alert["labels"]["alertname"] == alertname and alert["state"] == "firing"
        for alert in stack.api("alerts")["alerts"]
    )


def _listed(stack: Stack, alertname: str) -> bool:
    return any(alert["labels"]["alertname"] == alertname for alert in stack.api("alerts")["alerts"])


def test_stop_under_load_loses_no_admitted_request_and_the_down_alert_fires_then_resolves(
    stack: Stack,
) -> None:
    assert not _listed(stack, "ConvserveDown")
    clients = steady_load(stack.service_url)
    grace_s = _duration_s(load_compose(COMPOSE_FILE)["services"]["service"]["stop_grace_period"])
    stack.compose("stop", "service", timeout=grace_s + 60)
    for client in clients:
        client.join(timeout=30)
    exit_code = int(docker("inspect", "-f", "{{.State.ExitCode}}", stack.container("service")).stdout)
    log = stack.logs("service")  # `docker compose logs`: the service's lines, request ids included
    drained = drain_outcome(log, clients)
    seen, lost = drained.admitted, drained.lost
    after_stop = len(re.findall(ACCESS_LINE, log.partition("uvicorn.error: Shutting down")[2]))
    FIGURES["compose stop under load"] = (
        f"{len(lost)} lost of {len(seen)} admitted ({after_stop} finished while draining), exited {exit_code}"
    )
    assert seen, f"`docker compose logs service` shows none of the load requests:\n{log[-3000:]}"
    assert not lost, f"answers that did not reach the client: {lost}\n{log[-3000:]}"
    assert exit_code in (0, 143), f"exit status {exit_code} (137: SIGKILL after stop_grace_period)"

    fire_s = wait_until(lambda: _firing(stack, "ConvserveDown"), "ConvserveDown firing", ALERT_TIMEOUT_S)
    stack.compose("start", "service")
    healthy_s = wait_until(
        lambda: stack.health("service") == "healthy", "the service healthy again", UP_TIMEOUT_S
    )
    resolve_s = wait_until(
        lambda: not _listed(stack, "ConvserveDown"), "ConvserveDown resolved", PROMETHEUS_TIMEOUT_S
    )
    FIGURES["compose ConvserveDown"] = (
        f"fired {fire_s:.0f} s after `stop` returned (for: 1m); after `start`, healthy in {healthy_s:.1f} s "
        f"and resolved {resolve_s:.0f} s later"
    )


def test_logs_show_the_service_requests_with_their_ids(stack: Stack) -> None:
    log = stack.logs("service")
    assert re.search(rf"request_id={REQUEST_ID} method=POST path=/predict status=200", log), log[-3000:]


def test_down_under_load_loses_no_admitted_request(stack: Stack, tmp_path: Path) -> None:
    """Last in this file: `docker compose down` under load removes the stack (the fixture's own `down`
    then finds nothing). `down` removes the container and its logs, so they are followed meanwhile."""
    wait_until(lambda: stack.health("service") == "healthy", "the service healthy", UP_TIMEOUT_S)
    log_path = tmp_path / "service.log"
    command, env = stack.command("logs", "--follow", "--no-color", "service")
    with log_path.open("w", encoding="utf-8") as log_file:
        follower = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            clients = steady_load(stack.service_url, prefix="down")
            grace_s = _duration_s(load_compose(COMPOSE_FILE)["services"]["service"]["stop_grace_period"])
            stack.compose("down", timeout=grace_s + 120)  # the real stop_grace_period applies
            for client in clients:
                client.join(timeout=30)
            follower.wait(timeout=60)  # `logs --follow` ends with the container
        finally:
            if follower.poll() is None:
                follower.kill()
                follower.wait()
    log = log_path.read_text(encoding="utf-8")
    drained = drain_outcome(log, clients, access_line("down"))
    seen, lost = drained.admitted, drained.lost
    FIGURES["compose down under load"] = f"{len(lost)} lost of {len(seen)} admitted"
    assert seen, f"the followed logs show none of the load requests:\n{log[-3000:]}"
    assert not lost, f"answers that did not reach the client: {lost}\n{log[-3000:]}"
    assert "Application shutdown complete" in log, f"the service did not drain and exit:\n{log[-3000:]}"
    assert stack.compose("ps", "--all", "--quiet").stdout.strip() == "", "`down` left containers behind"
