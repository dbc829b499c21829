"""A session that fails on its GPU while serving: counted and logged, then served from the CPU, or,
under REQUIRE_GPU, refused with ORT's reason and reported by `/healthz` so the process is restarted.

No GPU fails on demand, so each test puts a real session of the tiny model in the state a provider
failure during `session.run` leads to (`OnnxModel.leave_gpu`, which `run` calls on ORT's EPFail).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from service.app import create_app
from service.models.gpu import GpuOptions
from service.models.runtime import load_model
from service.settings import Settings
from tests.photos import jpeg
from tests.waiting import wait_until

CUDA_FAULT = "EPFail: CUDA failure 700: an illegal memory access was encountered"


def zeros(rows: int) -> np.ndarray:
    return np.zeros((rows, 3, 32, 32), np.float32)


def test_a_gpu_failure_while_serving_is_counted_logged_and_served_from_the_cpu(
    tiny_model_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reasons: list[str] = []
    model = load_model(tiny_model_path, ["CPUExecutionProvider"], gpu=GpuOptions(on_fallback=reasons.append))
    expected = model.run(zeros(2))
    with caplog.at_level(logging.WARNING, logger="service.models.runtime"):
        model.leave_gpu(CUDA_FAULT)
        model.leave_gpu(CUDA_FAULT)  # a second instance failing on the same device: one switch
    assert reasons == [CUDA_FAULT]
    assert model.provider_failure == CUDA_FAULT and model.gpu_lost is None
    assert model.active_provider == "CPUExecutionProvider"
    np.testing.assert_allclose(model.run(zeros(2)), expected, rtol=1e-6)
    errors = [record.getMessage() for record in caplog.records if record.levelno == logging.ERROR]
    assert len(errors) == 1 and CUDA_FAULT in errors[0]


def test_under_require_gpu_a_gpu_failure_refuses_this_batch_and_every_later_one(
    tiny_model_path: Path,
) -> None:
    reasons: list[str] = []
    model = load_model(
        tiny_model_path, ["CPUExecutionProvider"], gpu=GpuOptions(require=True, on_fallback=reasons.append)
    )
    with pytest.raises(RuntimeError, match=r"REQUIRE_GPU=true but .*failed while serving.*CUDA failure 700"):
        model.leave_gpu(CUDA_FAULT)
    with pytest.raises(RuntimeError, match="REQUIRE_GPU=true"):
        model.run(zeros(1))
    assert reasons == [CUDA_FAULT] and model.gpu_lost is not None


def test_healthz_fails_once_a_required_gpu_is_lost_so_the_process_is_restarted(
    make_settings: Callable[..., Settings],
) -> None:
    with TestClient(create_app(make_settings(), CollectorRegistry())) as client:
        wait_until(lambda: client.get("/readyz").status_code == 200, "the tiny model ready")
        assert client.get("/healthz").json() == {"status": "alive"}
        model = client.app.state.convserve.registry.resolve("tiny", 1).model  # type: ignore[attr-defined]
        model.gpu = GpuOptions(require=True)  # what CONVSERVE_REQUIRE_GPU=true gives a GPU session
        with pytest.raises(RuntimeError):
            model.leave_gpu(CUDA_FAULT)

        health = client.get("/healthz")
        assert health.status_code == 503
        assert (
            "model tiny version 1" in health.json()["error"] and "CUDA failure 700" in health.json()["error"]
        )
        answer = client.post("/predict", files={"file": ("cat.jpg", jpeg("chelsea"), "image/jpeg")})
        assert answer.status_code >= 500 and "REQUIRE_GPU=true" in answer.json()["error"]
