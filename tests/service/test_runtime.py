"""ONNX Runtime loading: active provider, metadata checks, and REQUIRE_GPU with ORT's own reason."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from modelcontract import METADATA_KEY
from service.errors import StartupError
from service.models.runtime import OnnxModel, check_gpu, load_model
from tests.service.photos import TINY_LABELS


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
    path = rewrite_metadata(tiny_model_path, tmp_path / "model.onnx", value)
    with pytest.raises(StartupError, match=message):
        load_model(path, ["CPUExecutionProvider"])


def test_metadata_that_contradicts_the_graph_refuses_to_load(tmp_path: Path, tiny_model: OnnxModel) -> None:
    wrong = dict(tiny_model.metadata.raw, input_shape=[3, 64, 64])
    path = rewrite_metadata(tiny_model.path, tmp_path / "model.onnx", json.dumps(wrong))
    with pytest.raises(StartupError, match=r"metadata promises float32 \[batch, 3, 64, 64\]"):
        load_model(path, ["CPUExecutionProvider"])


def test_file_that_is_not_onnx_refuses_to_load(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"definitely not a protobuf")
    with pytest.raises(StartupError, match="ONNX Runtime cannot load"):
        load_model(path, ["CPUExecutionProvider"])
