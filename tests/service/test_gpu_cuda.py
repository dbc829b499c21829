"""The CUDA path on a real GPU: these tests run where `nvidia-smi -L` lists a GPU and skip, with one
line saying so, everywhere else. `make gpu-check` runs them first."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest

from modelcontract import EvalTransform
from service.models.gpu import GpuOptions, gpu_batch_sizes
from service.models.runtime import OnnxModel, check_gpu, load_model, warmup_sizes
from tests.liveserver import service_env, service_process
from tests.photos import photo
from tests.tinymodel import PARITY_PHOTOS

CUDA = ["CUDAExecutionProvider", "CPUExecutionProvider"]
LOGIT_TOLERANCE = 1e-2  # cuDNN's summation order and TF32 against the CPU's float32


def gpu_listed() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    done = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False, timeout=30)
    return done.returncode == 0 and "GPU " in done.stdout


if not gpu_listed():
    pytest.skip(
        "no NVIDIA GPU here (nvidia-smi -L lists none): make gpu-check on a GPU host runs these",
        allow_module_level=True,
    )
pytestmark = pytest.mark.gpu


def test_model_loads_on_cuda_after_the_probes_test_inference(tiny_model_path: Path) -> None:
    model = load_model(tiny_model_path, CUDA, gpu=GpuOptions(require=True))
    check_gpu(model, require_gpu=True)
    assert model.active_provider == "CUDAExecutionProvider" and model.provider_failure is None


def test_cuda_and_cpu_logits_agree_on_real_photos(tiny_model_path: Path, tiny_model: OnnxModel) -> None:
    transform = EvalTransform.from_spec(tiny_model.metadata.eval_spec)
    batch = np.stack([transform(photo(name)) for name in PARITY_PHOTOS])
    on_gpu = load_model(tiny_model_path, CUDA)
    assert on_gpu.on_gpu
    np.testing.assert_allclose(on_gpu.run(batch), tiny_model.run(batch), atol=LOGIT_TOLERANCE)
    assert (on_gpu.run(batch).argmax(1) == tiny_model.run(batch).argmax(1)).all()


def test_gpu_warmup_runs_the_power_of_two_sizes_only(tiny_model_path: Path) -> None:
    model = load_model(tiny_model_path, CUDA)
    assert model.batch_sizes(32) == warmup_sizes(model, 32) == gpu_batch_sizes(32)
    assert model.warmup(warmup_sizes(model, 32)) > 0


def test_a_device_id_that_does_not_exist_falls_back_with_orts_reason(tiny_model_path: Path) -> None:
    model = load_model(tiny_model_path, CUDA, gpu=GpuOptions(device_id=99))
    assert not model.on_gpu and model.provider_failure


def test_service_serves_from_cuda_under_require_gpu(model_repository: Path, tmp_path: Path) -> None:
    env = service_env(model_repository, PROVIDERS="cuda,cpu", REQUIRE_GPU="true")
    with service_process(env, log_path=tmp_path / "service.log") as server:
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'provider="CUDAExecutionProvider"' in metrics
        assert httpx.get(f"{server.url}/healthz").status_code == 200
