"""The image, built and run: what `docker compose up` and a Kubernetes pod really get.

Builds the CPU variant with the legacy builder (see dockerimage.py for the base images and the torch
index), then runs it the way the Kubernetes manifests do (read-only root, /tmp as tmpfs, no capabilities)
and checks readiness, Docker's health status, a real prediction, the user, a model from a bind mount, and
`docker stop` under load. Skips with one line when no Docker daemon answers.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import yaml
from deployfiles import COMPOSE_FILE, DOCKERFILE, REPO_ROOT, load_compose
from dockerimage import (
    DEFAULT_BUILD_BUDGET_S,
    ENABLE_HINT,
    FIGURES,
    Container,
    build_image,
    build_plan,
    docker,
    docker_unavailable,
    image_size_bytes,
    run_container,
    wait_for,
)
from loadclients import ACCESS_LINE, LOAD_CLIENTS, LoadClient, drain_outcome
from PIL import Image

from tests.liveserver import free_port
from tests.photos import jpeg
from tests.tinymodel import TINY_LABELS, export_tiny_model

_BUDGET_S = float(os.environ.get("IMAGE_BUILD_BUDGET_S", DEFAULT_BUILD_BUDGET_S))
# The build runs in the first test's setup: its budget, not pytest's default timeout, bounds it.
pytestmark = [pytest.mark.image, pytest.mark.timeout(int(_BUDGET_S) + 600)]

_UNAVAILABLE = docker_unavailable()
if _UNAVAILABLE:
    pytest.skip(f"image test not run: {_UNAVAILABLE}; to enable it, {ENABLE_HINT}", allow_module_level=True)

CAT_CLASSES = {281, 282, 285}  # ImageNet tabby, tiger cat, Egyptian cat: scikit-image's chelsea
ESPRESSO = 967  # scikit-image's coffee


def _seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+)(ms|s|m)", text)
    assert match, f"unexpected duration {text!r}"
    return int(match.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0}[match.group(2)]


def healthcheck_timing() -> dict[str, float]:
    """The Dockerfile HEALTHCHECK's --interval, --start-period and --retries."""
    options = dict(
        re.findall(r"--([a-z-]+)=(\S+)", DOCKERFILE.read_text(encoding="utf-8").split("HEALTHCHECK")[1])
    )
    return {
        "interval": _seconds(options["interval"]),
        "start_period": _seconds(options["start-period"]),
        "retries": float(options["retries"]),
    }


@pytest.fixture(scope="module")
def image() -> str:
    try:
        plan = build_plan()
    except LookupError as exc:
        pytest.skip(f"image test not run: {exc}; to enable it, {ENABLE_HINT}")
    seconds = build_image(plan, _BUDGET_S)
    substitutions = f" with {'; '.join(plan.notes)}" if plan.notes else ""
    FIGURES["build"] = f"{seconds:.1f} s{substitutions}"
    FIGURES["image size"] = f"{image_size_bytes() / 1e6:.0f} MB"
    return "convserve:image-test"


def ready(container: Container) -> bool:
    try:
        return httpx.get(f"{container.url}/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@pytest.fixture(scope="module")
def served(image: str) -> Iterator[Container]:
    """The image as built: default model baked in, default settings but the CPU provider."""
    with run_container(free_port(), {}) as container:
        seconds = wait_for("/readyz 200", lambda: ready(container), 300, container)
        FIGURES["start to /readyz 200"] = f"{seconds:.1f} s"
        yield dataclasses.replace(container, ready_s=seconds)


def test_readyz_answers_within_the_healthcheck_start_period(served: Container) -> None:
    # A time budget is the point here: probes failing after --start-period count towards an unhealthy
    # container. The fixture waited for readiness; the time it took (the summary's "start to /readyz
    # 200" figure, seconds for the baked-in model) must fit the period, which leaves minutes of margin.
    start_period = healthcheck_timing()["start_period"]
    took = served.ready_s
    assert took is not None, "the fixture records the time to readiness"
    assert took < start_period, (
        f"/readyz took {took:.1f} s, HEALTHCHECK --start-period is {start_period:.0f} s"
    )


def test_docker_reports_the_container_healthy(served: Container) -> None:
    timing = healthcheck_timing()
    limit = timing["start_period"] + timing["interval"] * (timing["retries"] + 1)
    seconds = wait_for(
        "Docker health status `healthy`",
        lambda: served.inspect("{{.State.Health.Status}}") == "healthy",
        limit,
        served,
    )
    FIGURES["start to healthy"] = f"{seconds:.1f} s"


def test_predict_names_the_cat_and_the_espresso(served: Container) -> None:
    cat, coffee = jpeg("chelsea"), jpeg("coffee")
    files = [("file", ("chelsea.jpg", cat, "image/jpeg")), ("file", ("coffee.jpg", coffee, "image/jpeg"))]
    response = httpx.post(f"{served.url}/predict", files=files, timeout=60)
    assert response.status_code == 200, response.text
    first, second = (row[0] for row in response.json()["predictions"])
    assert first["index"] in CAT_CLASSES, first
    assert second["index"] == ESPRESSO, second


def test_grpc_and_the_convserve_command_work_in_the_image(served: Container) -> None:
    assert "usage: convserve" in served.exec("convserve", "--help")
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{served.grpc_port}")
    try:
        assert client.is_server_ready()
        image = grpcclient.InferInput("image", [1], "BYTES")
        image.set_data_from_numpy(np.array([jpeg("coffee")], dtype=np.object_))
        (model,) = client.get_model_repository_index(as_json=True)["models"]
        output = client.get_model_metadata(model["name"], as_json=True)["outputs"][0]["name"]
        top1 = grpcclient.InferRequestedOutput(output, class_count=1)
        (best,) = client.infer(model["name"], [image], outputs=[top1]).as_numpy(output)[0]
    finally:
        client.close()
    assert int(best.decode().split(":")[1]) == ESPRESSO, best


def test_upload_larger_than_the_spool_threshold_uses_the_writable_tmp(served: Container) -> None:
    # Starlette spools uploads over 1 MB to a temporary file: with a read-only root, /tmp (a tmpfs here,
    # an emptyDir in the manifests) is what makes them work.
    pixels = np.random.default_rng(0).integers(0, 256, size=(900, 900, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    assert len(buffer.getvalue()) > 2 * 1024 * 1024
    files = {"file": ("noise.png", buffer.getvalue(), "image/png")}
    response = httpx.post(f"{served.url}/predict", files=files, timeout=60)
    assert response.status_code == 200, response.text


def test_service_runs_as_uid_10001_without_capabilities_or_torch(served: Container) -> None:
    status = served.exec("cat", "/proc/1/status")
    assert re.search(r"^Uid:\s+10001\s+10001\s+10001\s+10001$", status, flags=re.MULTILINE), status
    assert re.search(r"^CapEff:\s+0+$", status, flags=re.MULTILINE), status
    probe = "import importlib.util as u; print([m for m in ('torch', 'training') if u.find_spec(m)])"
    assert served.exec("python", "-c", probe).strip() == "[]"


def test_kubernetes_prestop_command_exists_in_the_image(served: Container) -> None:
    deployment = yaml.safe_load((REPO_ROOT / "deploy/k8s/base/deployment.yaml").read_text(encoding="utf-8"))
    command = deployment["spec"]["template"]["spec"]["containers"][0]["lifecycle"]["preStop"]["exec"][
        "command"
    ]
    result = docker("exec", served.name, command[0], "0", check=False)
    assert result.returncode == 0, f"preStop runs {command}, which the image cannot: {result.stderr}"


@pytest.fixture(scope="module")
def mounted_repository() -> Iterator[Path]:
    """A tiny model in a directory the container's user (10001) can read, as a host would share it."""
    with tempfile.TemporaryDirectory() as scratch:
        repository = Path(scratch) / "models"
        export_tiny_model(repository)
        for path in [Path(scratch), *repository.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        yield repository


def test_model_from_a_bind_mount_is_served(image: str, mounted_repository: Path) -> None:
    mount = ("--mount", f"type=bind,source={mounted_repository},target=/models,readonly")
    with run_container(free_port(), {"CONVSERVE_MODEL_REPOSITORY": "/models"}, mount) as container:
        wait_for("/readyz 200", lambda: ready(container), 300, container)
        assert httpx.get(f"{container.url}/readyz").json()["models"] == {"tiny": [1]}
        cat = jpeg("chelsea")
        response = httpx.post(
            f"{container.url}/predict", files={"file": ("c.jpg", cat, "image/jpeg")}, timeout=60
        )
        assert response.status_code == 200, response.text
        assert response.json()["predictions"][0][0]["label"] in TINY_LABELS


# --- docker stop under load ----------------------------------------------------------------------------


def test_docker_stop_under_load_loses_no_accepted_request(image: str) -> None:
    grace_s = _seconds(load_compose(COMPOSE_FILE)["services"]["service"]["stop_grace_period"])
    with run_container(free_port(), {}) as container:
        wait_for("/readyz 200", lambda: ready(container), 300, container)
        clients = [LoadClient(n, container.url) for n in range(LOAD_CLIENTS)]
        for client in clients:
            client.start()
        # Arrange the condition: every client has had answers, so all of them are in a steady loop.
        wait_for(
            "answers to every load client",
            lambda: all(sum(o == 200 for o in c.outcomes.values()) >= 2 for c in clients),
            120,
            container,
        )
        FIGURES["memory under load"] = docker(
            "stats", "--no-stream", "--format", "{{.MemUsage}}", container.name
        ).stdout.strip()
        started = time.monotonic()
        docker("stop", "-t", str(int(grace_s)), container.name, timeout=grace_s + 30)
        stop_s = time.monotonic() - started
        for client in clients:
            client.join(timeout=30)
        exit_code = int(container.inspect("{{.State.ExitCode}}"))
        log = container.logs()

    drained = drain_outcome(log, clients)
    # Requests the service finished after uvicorn began shutting down: proof the drain ran under load.
    after_stop = len(re.findall(ACCESS_LINE, log.partition("uvicorn.error: Shutting down")[2]))
    outcomes = {rid: outcome for client in clients for rid, outcome in client.outcomes.items()}
    FIGURES["docker stop under load"] = (
        f"{len(drained.lost)} lost of {len(drained.admitted)} accepted ({after_stop} finished while "
        f"draining, {len(drained.refused) + len(drained.never_logged)} refused at the door), "
        f"exited {exit_code} in {stop_s:.1f} s of {grace_s:.0f} s"
    )
    assert not drained.lost, f"answers that did not reach the client: {drained.lost}\n{log[-3000:]}"
    never = drained.never_logged
    assert all(isinstance(outcomes[rid], httpx.TransportError) for rid in never), never
    assert after_stop > 0, "no request finished after `Shutting down`; the drain went untested"
    # Docker SIGKILLs (status 137) whatever is still running when the grace period ends, so a clean
    # status is the proof the drain fit in it; the stop time is a figure, not a flaky window.
    assert exit_code in (0, 143), (
        f"exit status {exit_code} (137 means Docker had to SIGKILL it)\n{log[-3000:]}"
    )
    assert "Application shutdown complete" in log
