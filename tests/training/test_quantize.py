"""`python -m training quantize` on a real tiny exported model and a real image folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from modelcontract import INPUT_NAME, MODEL_FILENAME, OUTPUT_NAME, ModelMetadata, complete_versions
from service.models.runtime import load_model
from tests.tinymodel import TINY_SPEC, export_tiny
from tests.training.images import TINY_LABELS, photo, preprocess, write_image_folder
from training.cli import main
from training.qdq import depthwise_weights, quantize_file


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("quantize")
    export_tiny(root / "models" / "tiny" / "1", list(TINY_LABELS))
    return root / "models" / "tiny", write_image_folder(root / "data")


def _metadata(path: Path) -> ModelMetadata:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return ModelMetadata.from_props(session.get_modelmeta().custom_metadata_map, str(path))


@pytest.fixture(scope="module")
def int8_version(repository: tuple[Path, Path]) -> Path:
    """The version `quantize` published from version 1, calibrated on 12 of the folder's images."""
    model_dir, data = repository
    before = complete_versions(model_dir)
    argv = ["quantize", "--model", str(model_dir / "1"), "--calibration", str(data)]
    assert main([*argv, "--calibration-images", "12", "--throughput-seconds", "0"]) == 0
    after = complete_versions(model_dir)
    assert after == [*before, before[-1] + 1]  # exactly one new version, the next number
    assert not [p for p in model_dir.iterdir() if p.name.startswith(".")]  # no staging left behind
    return model_dir / str(after[-1])


def test_quantize_publishes_int8_next_version_the_service_serves(
    repository: tuple[Path, Path], int8_version: Path
) -> None:
    model_dir, data = repository
    version = int8_version
    metadata = _metadata(version / MODEL_FILENAME)
    assert metadata.precision == "int8"
    assert metadata.extra["calibration"] == {"source": str(data), "images": 12, "method": "MinMax"}
    assert metadata.labels == tuple(TINY_LABELS)
    assert metadata.eval_spec == _metadata(model_dir / "1" / MODEL_FILENAME).eval_spec
    report = json.loads((version / "quantize.json").read_text())
    comparison = report["comparison"]
    assert comparison["images"] == 6  # the folder's validation split: 2 of each class's 8 images
    assert {"fp32_accuracy", "int8_accuracy", "top1_agreement"} <= set(comparison)
    assert report["bytes"]["int8"] < report["bytes"]["fp32"]
    assert report["throughput"] is None  # --throughput-seconds 0 skips it

    served = load_model(version / MODEL_FILENAME, ["CPUExecutionProvider"], intra_op_threads=1)
    fp32 = load_model(model_dir / "1" / MODEL_FILENAME, ["CPUExecutionProvider"], intra_op_threads=1)
    batch = preprocess([photo("chelsea"), photo("coffee")], TINY_SPEC).numpy()
    logits = served.run(batch)
    assert logits.shape == (2, len(TINY_LABELS)) and np.isfinite(logits).all()
    # Quantized, not copied: the logits move a little, the argmax does not on these photos.
    assert not np.array_equal(logits, fp32.run(batch))
    assert np.array_equal(logits.argmax(axis=1), fp32.run(batch).argmax(axis=1))


def test_quantize_refuses_an_accuracy_drop_beyond_the_limit_and_publishes_nothing(
    repository: tuple[Path, Path],
) -> None:
    model_dir, data = repository
    before = sorted(p.name for p in model_dir.iterdir())
    # Any drop exceeds -100.5 points (accuracy cannot rise by more than 100), so the gate must refuse.
    argv = ["quantize", "--model", str(model_dir / "1"), "--calibration", str(data)]
    assert main([*argv, "--max-accuracy-drop", "-100.5", "--throughput-seconds", "0"]) == 2
    assert sorted(p.name for p in model_dir.iterdir()) == before


def test_quantize_on_sample_photos_reports_agreement_and_throughput(repository: tuple[Path, Path]) -> None:
    model_dir, _ = repository
    argv = ["quantize", "--model", str(model_dir / "1"), "--calibration", "skimage:photos"]
    assert main([*argv, "--calibration-images", "16", "--throughput-seconds", "0.05"]) == 0
    version = model_dir / str(complete_versions(model_dir)[-1])
    report = json.loads((version / "quantize.json").read_text())
    comparison = report["comparison"]
    assert comparison["images"] == 8 * 7 and "fp32_accuracy" not in comparison
    assert comparison["top1_agreement"] >= 90.0
    # The confident subset is reported beside, never instead of, the agreement on every view.
    assert 0 <= comparison["confident_images"] <= comparison["images"]
    assert comparison["confident_probability"] == 0.3
    assert comparison["fp32_top1_in_int8_top5"] >= comparison["top1_agreement"]
    assert comparison["mean_kl_divergence"] >= 0.0
    speed = report["throughput"]
    assert speed["intra_op_threads"] == 2
    for precision in ("fp32", "int8"):
        assert set(speed["images_per_second"][precision]) == {"1", "8"}
        assert min(speed["images_per_second"][precision].values()) > 0
    assert set(speed["int8_speedup"]) == {"1", "8"}
    assert _metadata(version / MODEL_FILENAME).extra["calibration"] == {
        "source": "skimage:photos",
        "images": 16,
        "method": "MinMax",
    }


def test_quantize_rejects_a_negative_throughput_time(repository: tuple[Path, Path]) -> None:
    model_dir, data = repository
    before = sorted(p.name for p in model_dir.iterdir())
    argv = ["quantize", "--model", str(model_dir / "1"), "--calibration", str(data)]
    assert main([*argv, "--throughput-seconds", "-1"]) == 2
    assert sorted(p.name for p in model_dir.iterdir()) == before


def _conv_model(path: Path, weight: np.ndarray, bias: np.ndarray, group: int) -> None:
    """A one-Conv ONNX model: [N, 3, 8, 8] in, `weight` and `bias`, `group` groups."""
    conv = helper.make_node(
        "Conv", [INPUT_NAME, "w", "b"], [OUTPUT_NAME], group=group, pads=[1, 1, 1, 1], name="conv"
    )
    graph = helper.make_graph(
        [conv],
        "conv",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", weight.shape[0], 8, 8])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(path))


def test_depthwise_weights_finds_only_one_channel_per_group_convs(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    bias = np.zeros(3, np.float32)
    _conv_model(tmp_path / "dw.onnx", rng.standard_normal((3, 1, 3, 3)).astype(np.float32), bias, group=3)
    _conv_model(tmp_path / "full.onnx", rng.standard_normal((3, 3, 3, 3)).astype(np.float32), bias, group=1)
    assert depthwise_weights(onnx.load(str(tmp_path / "dw.onnx"))) == ["w"]
    assert depthwise_weights(onnx.load(str(tmp_path / "full.onnx"))) == []


def test_quantized_dead_channel_keeps_its_bias(tmp_path: Path) -> None:
    # BatchNorm folding leaves channels with ~0 weights and a large bias (EfficientNet-Lite0's stem);
    # their weight scale must not be so small that the int32 bias is clipped to nothing.
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    weight[0] = 1e-12
    bias = np.array([7.0, 0.1, -0.2, 0.3], np.float32)
    _conv_model(tmp_path / "fp32.onnx", weight, bias, group=1)
    images = rng.standard_normal((16, 3, 8, 8)).astype(np.float32)
    quantize_file(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", images, tmp_path)
    session = ort.InferenceSession(str(tmp_path / "int8.onnx"), providers=["CPUExecutionProvider"])
    dead = session.run([OUTPUT_NAME], {INPUT_NAME: images[:2]})[0][:, 0]
    np.testing.assert_allclose(dead, 7.0, atol=0.05)


def test_quantize_refuses_an_int8_model(repository: tuple[Path, Path], int8_version: Path) -> None:
    model_dir, data = repository
    int8 = int8_version
    before = sorted(p.name for p in model_dir.iterdir())
    argv = ["quantize", "--model", str(int8), "--calibration", str(data), "--throughput-seconds", "0"]
    assert main(argv) == 2
    assert sorted(p.name for p in model_dir.iterdir()) == before
