"""The GPU deployments agree with the service: one GPU per pod or service, served as device 0; CPU
sized per worker; start-up allowances derived from the provider probe's bound and the warmup."""

from __future__ import annotations

from typing import Any

import pytest
from deployfiles import COMPOSE_FILE, load_compose
from k8smanifests import K8S_DIR, container_env, main_container, one, render

from service.models.gpu import gpu_batch_sizes
from service.models.providers import PROBE_TIMEOUT_S
from service.settings import Settings

SESSION_AND_WARMUP_S = 60.0
"""What the start-up allowance grants beyond the probe: session creation and the warmup of
`gpu_batch_sizes(32)` (six shapes; seconds each at most)."""


@pytest.fixture(scope="module")
def gpu_overlay() -> list[dict[str, Any]]:
    return render(K8S_DIR / "overlays" / "gpu")


def gpu_settings(objects: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for key, value in container_env(main_container(pod_spec(objects)), objects).items():
        monkeypatch.setenv(key, value)
    return Settings()


def pod_spec(objects: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = one(objects, "Deployment")["spec"]["template"]["spec"]
    return spec


def cores(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def test_gpu_pod_serves_its_one_gpu_as_device_0_and_requires_it(
    gpu_overlay: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = gpu_settings(gpu_overlay, monkeypatch)
    assert main_container(pod_spec(gpu_overlay))["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert settings.gpu_device_id == 0  # the device plugin exposes the pod's one GPU as device 0
    assert settings.require_gpu and settings.providers[0] == "CUDAExecutionProvider"


def test_gpu_pod_has_two_cores_per_worker_to_feed_the_gpu(
    gpu_overlay: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = gpu_settings(gpu_overlay, monkeypatch)
    requested = cores(main_container(pod_spec(gpu_overlay))["resources"]["requests"]["cpu"])
    assert settings.workers > 1
    assert requested >= 2 * settings.workers


def test_gpu_start_up_allowance_covers_the_probe_bound_and_the_warmup(
    gpu_overlay: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = gpu_settings(gpu_overlay, monkeypatch)
    assert len(gpu_batch_sizes(settings.max_batch_size)) <= 7  # the warmup the allowance is sized for
    startup = main_container(pod_spec(gpu_overlay))["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= PROBE_TIMEOUT_S + SESSION_AND_WARMUP_S
    liveness = main_container(pod_spec(gpu_overlay))["livenessProbe"]
    assert liveness["httpGet"]["path"] == "/healthz"


def test_compose_reserves_one_gpu_and_waits_for_the_probe_bound() -> None:
    service = load_compose(COMPOSE_FILE)["services"]["service"]
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert len(device["device_ids"]) == 1 and "count" not in device
    assert service["environment"]["CONVSERVE_GPU_DEVICE_ID"] == "0"
    start_period_s = float(service["healthcheck"]["start_period"].removesuffix("s"))
    assert start_period_s >= PROBE_TIMEOUT_S + SESSION_AND_WARMUP_S
