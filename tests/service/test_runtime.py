"""ONNX Runtime loading: active provider, metadata checks, and REQUIRE_GPU with ORT's own reason, read
from its native log and its wrapper's stdout in the provider probe, whose test inference really runs."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest

from modelcontract import METADATA_KEY, MODEL_FILENAME
from service.errors import StartupError
from service.models.gpu import GpuOptions
from service.models.providers import failure_reason, run_probe
from service.models.runtime import OnnxModel, check_gpu, load_model, provider_options
from service.settings import Settings
from tests.tinymodel import TINY_LABELS


def test_loaded_model_reports_its_provider_metadata_and_answers_any_batch_size(tiny_model: OnnxModel) -> None:
    assert tiny_model.active_provider == "CPUExecutionProvider"
    assert tiny_model.provider_failure is None
    assert tiny_model.metadata.labels == TINY_LABELS
    assert tiny_model.metadata.input_shape == (3, 32, 32)
    for batch in (1, 5):
        assert tiny_model.run(np.zeros((batch, 3, 32, 32), np.float32)).shape == (batch, 3)


def test_cuda_fallback_is_explained_and_require_gpu_refuses_with_orts_reason(tiny_model_path: Path) -> None:
    model = load_model(tiny_model_path, ["CUDAExecutionProvider", "CPUExecutionProvider"])
    if model.on_gpu:
        pytest.skip("a GPU is active here; the fallback path cannot be observed")
    assert model.active_provider == "CPUExecutionProvider"
    assert model.provider_failure and "CUDA" in model.provider_failure
    with pytest.raises(
        StartupError, match=r"REQUIRE_GPU=true.*CPUExecutionProvider.*ONNX Runtime said"
    ) as refused:
        check_gpu(model, require_gpu=True)
    assert model.provider_failure in str(refused.value)
    check_gpu(model, require_gpu=False)  # without the requirement, CPU fallback is fine


def _cuda_request() -> str:
    return json.dumps(
        [[name, provider_options(name)] for name in ("CUDAExecutionProvider", "CPUExecutionProvider")]
    )


def test_orts_log_text_still_yields_a_clean_reason(tiny_model_path: Path) -> None:
    """Fails when an ONNX Runtime upgrade changes its native log format: the reason must stay readable."""
    probe = run_probe(tiny_model_path, _cuda_request())
    if probe.active[0] == "CUDAExecutionProvider":
        pytest.skip("a GPU is usable here; ONNX Runtime logs no provider failure")
    assert probe.active == ("CPUExecutionProvider",) and probe.conclusive
    assert probe.failure is not None and "CUDA" in probe.failure
    for prefix_residue in ("\x1b[", "onnxruntime:Default", "[ONNXRuntimeError]", ".cc:"):
        assert prefix_residue not in probe.failure, probe.failure


def test_reason_is_taken_from_orts_error_and_warning_lines_only() -> None:
    # Two lines as onnxruntime 1.31 writes them (colours included), between unrelated output.
    log = (
        "\x1b[1;31m2026-01-05 13:25:30.648 [E:onnxruntime:Default, provider_bridge_ort.cc:2458 operator()] "
        "/src/provider_bridge_ort.cc:2043 onnxruntime::Provider& Get() [ONNXRuntimeError] : 1 : FAIL : "
        "Failed to load library libonnxruntime_providers_cuda.so\n\x1b[m\n"
        "some other line\n"
        "\x1b[0;93m2026-01-05 13:25:30.648 [W:onnxruntime:Default, onnxruntime_pybind_state.cc:1295 "
        "CreateExecutionProviderFactoryInstance] Failed to create CUDAExecutionProvider.\x1b[m\n"
    )
    assert failure_reason(log) == (
        "Failed to load library libonnxruntime_providers_cuda.so | Failed to create CUDAExecutionProvider."
    )
    assert failure_reason("nothing from onnxruntime\n") is None


def test_gpu_load_leaves_the_process_stderr_alone(
    tiny_model_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """The probe runs in a child: this process's fd 2 stays put, and ORT's failure is not logged again."""
    os.write(2, b"before\n")
    model = load_model(tiny_model_path, ["CUDAExecutionProvider", "CPUExecutionProvider"])
    os.write(2, b"after\n")
    err = capfd.readouterr().err
    assert err.splitlines()[0] == "before" and err.splitlines()[-1] == "after"
    if not model.on_gpu:
        assert "Failed to create CUDAExecutionProvider" not in err  # CUDA was left out of the request


def test_unreadable_file_is_refused_and_says_nothing_about_the_gpu(tmp_path: Path) -> None:
    path = tmp_path / MODEL_FILENAME
    path.write_bytes(b"definitely not a protobuf")
    assert not run_probe(path, _cuda_request()).conclusive  # so it is not cached as the GPU's verdict
    with pytest.raises(StartupError, match="ONNX Runtime cannot load"):
        load_model(path, ["CUDAExecutionProvider", "CPUExecutionProvider"])


def rewrite_metadata(source: Path, target: Path, value: str | None) -> Path:
    proto = onnx.load(str(source))
    del proto.metadata_props[:]
    if value is not None:
        onnx.helper.set_model_props(proto, {METADATA_KEY: value})
    onnx.save(proto, str(target))
    return target


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (None, "has no 'convserve' metadata"),
        ("{not json", "not valid JSON"),
        (json.dumps({"labels": ["a", "b", "c"]}), "lacks"),
    ],
    ids=["missing", "not-json", "incomplete"],
)
def test_model_without_usable_metadata_refuses_to_load(
    tmp_path: Path, tiny_model_path: Path, value: str | None, message: str
) -> None:
    path = rewrite_metadata(tiny_model_path, tmp_path / MODEL_FILENAME, value)
    with pytest.raises(StartupError, match=message):
        load_model(path, ["CPUExecutionProvider"])


def test_metadata_that_contradicts_the_graph_refuses_to_load(tmp_path: Path, tiny_model: OnnxModel) -> None:
    wrong = dict(tiny_model.metadata.to_json(), input_shape=[3, 64, 64], resize_size=72)
    path = rewrite_metadata(tiny_model.path, tmp_path / MODEL_FILENAME, json.dumps(wrong))
    with pytest.raises(StartupError, match=r"metadata promises float32 \[batch, 3, 64, 64\]"):
        load_model(path, ["CPUExecutionProvider"])


def test_file_that_is_not_onnx_refuses_to_load(tmp_path: Path) -> None:
    path = tmp_path / MODEL_FILENAME
    path.write_bytes(b"definitely not a protobuf")
    with pytest.raises(StartupError, match="ONNX Runtime cannot load"):
        load_model(path, ["CPUExecutionProvider"])


def test_provider_that_raised_while_created_is_explained_from_orts_stdout(tiny_model_path: Path) -> None:
    """ORT's Python wrapper prints an "EP Error" to stdout when creating a provider raised, then
    retries on the CPU: here the CUDA entry's options are not a dict, which it refuses before loading
    any CUDA library, so this path runs with or without a GPU."""
    requested = json.dumps([["CUDAExecutionProvider", "not-a-dict"], ["CPUExecutionProvider", {}]])
    probe = run_probe(tiny_model_path, requested)
    assert probe.active == ("CPUExecutionProvider",) and probe.conclusive
    assert probe.failure is not None
    assert "'providers' values must be either strings or (string, dict) tuples" in probe.failure


def test_reason_includes_the_wrappers_stdout_lines() -> None:
    stdout = (
        "*************** EP Error ***************\n"
        "EP Error CUDA failure 35: CUDA driver version is insufficient for CUDA runtime version "
        "when using ['CUDAExecutionProvider', 'CPUExecutionProvider']\n"
        "Falling back to ['CPUExecutionProvider'] and retrying.\n"
        "****************************************\n"
    )
    assert failure_reason(stdout) == (
        "CUDA failure 35: CUDA driver version is insufficient for CUDA runtime version when using "
        "['CUDAExecutionProvider', 'CPUExecutionProvider']"
    )


def failing_graph(path: Path) -> Path:
    """A graph that loads on any provider but fails when run: it reshapes 3x32x32 values to 7."""
    image = onnx.helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["batch", 3, 32, 32])
    out = onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, None)
    shape = onnx.helper.make_tensor("shape", onnx.TensorProto.INT64, [1], [7])
    node = onnx.helper.make_node("Reshape", ["image", "shape"], ["logits"])
    graph = onnx.helper.make_graph([node], "fails-when-run", [image], [out], initializer=[shape])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_probe_runs_one_image_and_a_failed_run_is_not_the_gpus_verdict(tmp_path: Path) -> None:
    """The probe's test inference really runs: a graph that fails when run is reported with ORT's
    error, and, since it failed on the CPU too, it says nothing about the GPU (not cached)."""
    probe = run_probe(failing_graph(tmp_path / MODEL_FILENAME), _cuda_request())
    assert not probe.conclusive
    assert probe.failure is not None and "a test inference failed on CPUExecutionProvider" in probe.failure
    assert "Reshape" in probe.failure or "reshape" in probe.failure


def test_gpu_device_id_setting_reaches_onnx_runtime(
    tiny_model_path: Path, make_settings: Callable[..., Settings]
) -> None:
    """CONVSERVE_GPU_DEVICE_ID is passed to ORT's CUDA provider: without a GPU, ORT names it in its reason."""
    settings = make_settings(providers=["cuda", "cpu"], gpu_device_id=5)
    model = load_model(tiny_model_path, settings.providers, gpu=GpuOptions.from_settings(settings))
    if model.on_gpu:
        pytest.skip("a GPU is active here; ONNX Runtime logs no provider failure")
    assert model.provider_failure is not None and "device_id=5" in model.provider_failure
