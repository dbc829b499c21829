"""The corpus and the in-process ceiling, on a tiny real ONNX model and the service's preprocessing."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from PIL import Image

from benchmarks.common.corpus import Photo, build_corpus, describe_corpus
from benchmarks.performance.ceiling import CeilingPlan, ceiling_spread, measure_ceiling, measure_pipeline
from modelcontract.transform import EvalTransform
from service.inference.preprocessing import ImagePreprocessor

SIDE = 32
CLASSES = 4


def _tiny_classifier(path: Path) -> None:
    """Global average pool -> linear, [N,3,32,32] -> [N,4], with a symbolic batch axis."""
    weights = np.random.default_rng(0).normal(size=(3, CLASSES)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["features"]),
            helper.make_node("MatMul", ["features", "weights"], ["logits"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, SIDE, SIDE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])],
        initializer=[helper.make_tensor("weights", TensorProto.FLOAT, weights.shape, weights.ravel())],
    )
    # IR version 10 (ONNX 1.16): new enough for opset 18, old enough for every supported ORT release.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


@pytest.fixture(scope="module")
def photos() -> list[Photo]:
    return build_corpus([0.05, 0.08, 0.12])


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "model.onnx"
    _tiny_classifier(path)
    return path


PREPROCESS = ImagePreprocessor(
    EvalTransform(
        input_size=(SIDE, SIDE), resize_size=36, interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3
    )
)


def _session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_corpus_jpegs_decode_at_their_requested_megapixels() -> None:
    photos = build_corpus([0.3, 2.0])
    for photo, megapixels in zip(photos, [0.3, 2.0], strict=True):
        image = Image.open(io.BytesIO(photo.data))
        assert image.format == "JPEG" and image.mode == "RGB"
        assert image.size == (photo.width, photo.height)
        assert photo.megapixels == pytest.approx(megapixels, rel=0.01)
    description = describe_corpus(photos)
    assert description["megapixels_min"] == pytest.approx(0.3, rel=0.01)
    assert description["megapixels_max"] == pytest.approx(2.0, rel=0.01)


def test_corpus_is_the_same_on_every_build() -> None:
    assert [p.data for p in build_corpus([0.05, 0.1])] == [p.data for p in build_corpus([0.05, 0.1])]


def test_ceiling_measures_every_configuration_and_picks_the_best(
    model_path: Path, photos: list[Photo]
) -> None:
    plan = CeilingPlan(
        batch_sizes=(1, 4),
        intra_op_threads=(0, 1),
        decode_threads=(1, 2),
        single_image_runs=6,
        seconds_per_measurement=0.2,
        confirm_seconds=0.2,
        confirm_configurations=2,
        confirm_repeats=2,
    )
    result = measure_ceiling(lambda threads: _session(model_path, threads), "input", PREPROCESS, photos, plan)
    assert len(result["pipeline"]) == 2 * 2 * 2
    assert len(result["ort_only"]) == 2 * 2
    grid_best = max(result["pipeline"], key=lambda entry: entry["img_per_s"])
    assert result["grid_best_img_per_s"] == grid_best["img_per_s"] > 0
    # The grid's two best configurations, twice each, interleaved.
    confirmed = result["confirmations"]
    assert [row["repeat"] for row in confirmed] == [1, 1, 2, 2]
    assert confirmed[0]["batch_size"] == grid_best["batch_size"]
    # The ceiling is the best window of all, grid and repeats, with its configuration's spread.
    windows = [*result["pipeline"], *confirmed]
    best = max(windows, key=lambda entry: entry["img_per_s"])
    assert result["ceiling_img_per_s"] == best["img_per_s"] >= result["grid_best_img_per_s"]
    assert result["best_batch_size"] == best["batch_size"]
    spread = result["ceiling_spread"]
    assert spread["windows"] == 3  # one grid window and two repeats
    assert spread["max_img_per_s"] == result["ceiling_img_per_s"]
    assert 0 <= spread["relative_spread"] < 1
    assert 0 < result["single_image_p50_ms"] <= result["single_image_p99_ms"]


def test_ceiling_spread_is_relative_to_the_best_window() -> None:
    assert ceiling_spread([80.8, 139.7, 120.0]) == {
        "windows": 3,
        "min_img_per_s": 80.8,
        "max_img_per_s": 139.7,
        "relative_spread": 0.422,
    }
    assert ceiling_spread([])["relative_spread"] is None


def test_pipeline_feeds_whole_batches_of_preprocessed_images(model_path: Path, photos: list[Photo]) -> None:
    seen: list[tuple[int, ...]] = []
    session = _session(model_path, 1)

    class RecordingSession:
        """Forwards to the real session and records the batch shapes it was given."""

        def run(self, names: object, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
            seen.append(feed["input"].shape)
            return session.run(None, feed)

    rate = measure_pipeline(
        RecordingSession(), "input", PREPROCESS, photos, batch_size=5, seconds=0.1, decode_threads=2
    )
    assert rate > 0
    assert set(seen) == {(5, 3, SIDE, SIDE)}
