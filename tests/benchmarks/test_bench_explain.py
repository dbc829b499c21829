"""The explain benchmark's pieces on real small inputs: its composites, how it scores a map's peak,
and the graph variants it compares (the in-graph maps must be the maps the service makes, or the
comparison means nothing)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from benchmarks.performance.explain import (
    CANVAS,
    COMPOSITES,
    MARGIN,
    OBJECTS,
    TOLERANCE,
    _peaks,
    composites,
    graph_cost,
    in_graph_maps,
    render,
    strip_features,
)
from benchmarks.performance.in_process import in_worker_thread
from modelcontract import FEATURES_NAME, INPUT_NAME, OUTPUT_NAME, class_activation_maps
from service.models.runtime import load_model
from tests.explainmodel import export_explainable, parity_photos


@pytest.fixture(scope="module")
def explainable(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_explainable(tmp_path_factory.mktemp("bench-explain") / "1")


def test_composites_are_seeded_and_the_photo_lies_where_the_crop_sees() -> None:
    made = composites()
    assert len(made) == COMPOSITES
    assert {c.subject for c in made} == set(OBJECTS)
    assert {c.background for c in made} >= {"neutral", "brick", "grass", "gravel"}
    for composite in made:
        x0, y0, x1, y1 = composite.box
        assert composite.image.size == (CANVAS, CANVAS)
        assert MARGIN <= x0 < x1 <= CANVAS - MARGIN and MARGIN <= y0 < y1 <= CANVAS - MARGIN
    again = composites()
    assert [c.box for c in again] == [c.box for c in made]
    assert np.array_equal(np.asarray(again[1].image), np.asarray(made[1].image))


def test_the_hottest_cell_is_scored_at_its_centre_on_every_edge_of_the_map() -> None:
    # A map hottest in its top-left cell, and the same map turned half round: the two cells' centres
    # are mirror images about the crop box's centre (an argmax over the upsampled map put the first
    # at the crop's very corner, half a cell off, and the second at its cell's centre).
    crop_box = (40.0, 40.0, 600.0, 600.0)  # 80 pixels a cell
    rows, cols = np.mgrid[0:7, 0:7]
    cam = -(rows + cols).astype(np.float32)
    corner = _peaks(cam, crop_box, (45, 45, 130, 130))
    assert corner["cell"] == [80.0, 80.0] and corner["cell_hit"] and corner["hit"]
    opposite = _peaks(cam[::-1, ::-1], crop_box, (45, 45, 130, 130))
    assert opposite["cell"] == [560.0, 560.0] and not opposite["cell_hit"] and not opposite["hit"]
    # Just outside the pasted box: a miss, within the tolerance.
    near = _peaks(cam, crop_box, (81, 81, 200, 200))
    assert not near["hit"] and near["hit_within_tolerance"]
    assert not _peaks(cam, crop_box, (80 + TOLERANCE + 1, 0, 200, 200))["hit_within_tolerance"]


def test_in_graph_maps_are_the_maps_the_service_makes(explainable: Path, tmp_path: Path) -> None:
    in_graph_maps(explainable, tmp_path / "maps.onnx")
    session = ort.InferenceSession(str(tmp_path / "maps.onnx"), providers=["CPUExecutionProvider"])
    images = parity_photos().numpy()
    features, maps = session.run([FEATURES_NAME, "class_maps"], {INPUT_NAME: images})
    served = in_worker_thread(lambda: load_model(explainable, ["CPUExecutionProvider"], intra_op_threads=1))
    classes = np.arange(served.metadata.num_classes)
    expected = np.stack([served.class_maps(row, classes) for row in features])
    np.testing.assert_allclose(maps, expected, rtol=1e-4, atol=1e-5)
    assert served.explain_weights is not None
    np.testing.assert_allclose(
        expected[0], class_activation_maps(features[0], served.explain_weights, classes), rtol=1e-6
    )


def test_the_stripped_model_is_the_same_model_without_the_output(explainable: Path, tmp_path: Path) -> None:
    strip_features(explainable, tmp_path / "plain" / "model.onnx")
    plain = in_worker_thread(
        lambda: load_model(tmp_path / "plain" / "model.onnx", ["CPUExecutionProvider"], intra_op_threads=1)
    )
    assert not plain.explainable
    full = in_worker_thread(lambda: load_model(explainable, ["CPUExecutionProvider"], intra_op_threads=1))
    # Every output but the feature map stays (an export may carry others, such as an embedding).
    outputs = [o.name for o in full.session.get_outputs()]
    assert OUTPUT_NAME in outputs and FEATURES_NAME in outputs
    assert [o.name for o in plain.session.get_outputs()] == [n for n in outputs if n != FEATURES_NAME]
    images = parity_photos().numpy()
    np.testing.assert_array_equal(plain.run(images), full.run(images))


def test_graph_cost_measures_every_variant_and_renders(explainable: Path, tmp_path: Path) -> None:
    in_graph_maps(explainable, tmp_path / "maps.onnx")
    strip_features(explainable, tmp_path / "plain.onnx")
    paths = {"no extra output": tmp_path / "plain.onnx", "feature map output": explainable}
    cost = graph_cost({**paths, "all class maps in the graph": tmp_path / "maps.onnx"}, rounds=1)
    assert set(cost) == {"batch_32", "batch_1"}
    assert all(rate > 0 for rates in cost.values() for rate in rates.values())
    game = {
        "model": "tiny", "crop": [32, 32], "feature_map": [8, 8], "hits": 1, "trials": 2, "fraction": 0.5,
        "hits_within_tolerance": 2, "cell_hits": 1, "top1_hits": 0, "top1_fraction": 0.0,
        "top1_is_target": 0, "check": {"seeds": [1], "trials": 4, "hits": 3, "cell_hits": 2, "top1_hits": 1},
    }  # fmt: skip
    window = {"img_per_s": 1.0, "p99_ms": 2.0, "rounds": [{}]}
    text = render(
        {
            "pointing_game": [game],
            "graph_cost": cost,
            "service_cost": {
                "predict_without_features": window,
                "predict_with_features_unrequested": window,
                "explain": {"img_per_s": 1.0, "p99_ms": 2.0},
                "throughput_change": 0.0,
                "paired_ratios": [1.0],
                "other_processes_cpu_percent": [0.0],
            },
        }
    )
    assert (
        "| tiny | 32x32 | 8x8 | 1 / 2 (50%) | 2 / 2 | 1 / 2 (50%) | 0 / 2 (0%) | 0 / 2 | 75% / 50% / 25% |"
        in text
    )
    assert "all class maps in the graph" in text
