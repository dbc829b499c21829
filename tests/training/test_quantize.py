"""`python -m training quantize` on a real tiny exported model and a real image folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from modelcontract import METADATA_KEY, complete_versions
from service.runtime import load_model
from tests.tinymodel import TINY_SPEC, export_tiny
from tests.training.images import TINY_LABELS, photo, preprocess, write_image_folder
from training.cli import main


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("quantize")
    export_tiny(root / "models" / "tiny" / "1", list(TINY_LABELS))
    return root / "models" / "tiny", write_image_folder(root / "data")


def _metadata(path: Path) -> dict[str, object]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    result: dict[str, object] = json.loads(session.get_modelmeta().custom_metadata_map[METADATA_KEY])
    return result


@pytest.fixture(scope="module")
def int8_version(repository: tuple[Path, Path]) -> Path:
    """The version `quantize` published from version 1, calibrated on 12 of the folder's images."""
    model_dir, data = repository
    before = complete_versions(model_dir)
    argv = ["quantize", "--model", str(model_dir / "1"), "--calibration", str(data)]
    assert main([*argv, "--calibration-images", "12"]) == 0
    after = complete_versions(model_dir)
    assert after == [*before, before[-1] + 1]  # exactly one new version, the next number
    assert not [p for p in model_dir.iterdir() if p.name.startswith(".")]  # no staging left behind
    return model_dir / str(after[-1])


def test_quantize_publishes_int8_next_version_the_service_serves(
    repository: tuple[Path, Path], int8_version: Path
) -> None:
    model_dir, data = repository
    version = int8_version
    metadata = _metadata(version / "model.onnx")
    assert metadata["precision"] == "int8"
    assert metadata["calibration"] == {"source": str(data), "images": 12, "method": "MinMax"}
    assert metadata["labels"] == list(TINY_LABELS)
    report = json.loads((version / "quantize.json").read_text())
    comparison = report["comparison"]
    assert comparison["images"] == 6  # the folder's validation split: 2 of each class's 8 images
    assert {"fp32_accuracy", "int8_accuracy", "top1_agreement"} <= set(comparison)
    assert report["bytes"]["int8"] < report["bytes"]["fp32"]

    served = load_model(version / "model.onnx", ["CPUExecutionProvider"], intra_op_threads=1)
    fp32 = load_model(model_dir / "1" / "model.onnx", ["CPUExecutionProvider"], intra_op_threads=1)
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
    assert main([*argv, "--max-accuracy-drop", "-100.5"]) == 2
    assert sorted(p.name for p in model_dir.iterdir()) == before


def test_quantize_on_sample_photos_reports_agreement(repository: tuple[Path, Path]) -> None:
    model_dir, _ = repository
    argv = ["quantize", "--model", str(model_dir / "1"), "--calibration", "skimage:photos"]
    assert main([*argv, "--calibration-images", "16"]) == 0
    version = model_dir / str(complete_versions(model_dir)[-1])
    comparison = json.loads((version / "quantize.json").read_text())["comparison"]
    assert comparison["images"] == 8 * 7 and "fp32_accuracy" not in comparison
    assert comparison["top1_agreement"] >= 90.0
    assert _metadata(version / "model.onnx")["calibration"] == {
        "source": "skimage:photos",
        "images": 16,
        "method": "MinMax",
    }


def test_quantize_refuses_an_int8_model(repository: tuple[Path, Path], int8_version: Path) -> None:
    model_dir, data = repository
    int8 = int8_version
    before = sorted(p.name for p in model_dir.iterdir())
    assert main(["quantize", "--model", str(int8), "--calibration", str(data)]) == 2
    assert sorted(p.name for p in model_dir.iterdir()) == before
