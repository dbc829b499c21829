"""The few-shot benchmark's pieces on small constructed inputs: its views, its episodes, its scoring
through the product's search, the derived stage outputs and the docs block. No training here."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from benchmarks.common.docblock import block_between
from benchmarks.common.results import read_json
from benchmarks.fewshot import BLOCK_END, BLOCK_START, DOC, RESULTS
from benchmarks.fewshot.digits import SEEN, split_seen
from benchmarks.fewshot.embedders import Embedder, pooled_pixels, stage_name, with_stage_outputs
from benchmarks.fewshot.episodes import centered, draw_shots, scores, top1
from benchmarks.fewshot.report import render, score_cell
from benchmarks.fewshot.views import (
    CROP_FRACTIONS,
    MAX_QUERY_OVERLAP,
    View,
    draw_views,
    encode_jpeg,
    overlap,
    random_view,
    view_image,
)
from modelcontract import INPUT_NAME
from tests.tinymodel import TINY_LABELS, TINY_SPEC, export_tiny
from training.backbones import create_model
from training.transforms import eval_transform


def test_overlap_of_constructed_boxes() -> None:
    assert overlap((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert overlap((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0
    assert overlap((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)


def test_views_are_seeded_inside_the_photo_and_queries_stay_apart_from_the_gallery() -> None:
    size = (451, 300)
    gallery, queries = draw_views(size, 5, 8, np.random.default_rng(3))
    again = draw_views(size, 5, 8, np.random.default_rng(3))
    assert (gallery, queries) == again
    assert (gallery, queries) != draw_views(size, 5, 8, np.random.default_rng(4))
    for view in gallery + queries:
        x0, y0, x1, y1 = view.box
        assert 0 <= x0 < x1 <= size[0] and 0 <= y0 < y1 <= size[1]
        assert x1 - x0 == y1 - y0
        assert CROP_FRACTIONS[0] * 300 - 1 <= x1 - x0 <= CROP_FRACTIONS[1] * 300
    for query in queries:
        assert max(overlap(query.box, example.box) for example in gallery) <= MAX_QUERY_OVERLAP
    # Flips and output sizes vary: the views are not one crop at one scale.
    views = [random_view(size, np.random.default_rng(seed)) for seed in range(8)] + gallery + queries
    assert {v.flip for v in views} == {True, False}
    assert len({v.side for v in views}) > 1


def test_a_photo_too_small_for_apart_queries_is_refused_with_the_fix() -> None:
    # Forty crops of at least a third of the side leave no crop of a 20 px photo untouched.
    with pytest.raises(ValueError, match="lower the shots or raise the overlap allowed"):
        draw_views((20, 20), 40, 8, np.random.default_rng(0), max_overlap=0.0)


def test_rendered_views_are_cropped_resized_and_mirrored() -> None:
    photo = Image.fromarray(np.arange(40 * 30 * 3, dtype=np.uint8).reshape(30, 40, 3) % 251)
    plain = view_image(photo, View((4, 2, 24, 22), flip=False, side=20))
    mirrored = view_image(photo, View((4, 2, 24, 22), flip=True, side=20))
    assert plain.size == mirrored.size == (20, 20)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(photo)[2:22, 4:24])
    np.testing.assert_array_equal(np.asarray(mirrored), np.asarray(plain)[:, ::-1])
    assert encode_jpeg(plain)[:2] == b"\xff\xd8"


def test_draw_shots_nests_the_one_shot_gallery_in_the_five_shot_one() -> None:
    labels = np.repeat(np.arange(3), 7)
    shots = draw_shots(labels, 5, seed=1)
    assert shots.shape == (3, 5)
    assert [set(labels[row]) for row in shots] == [{0}, {1}, {2}]
    np.testing.assert_array_equal(shots, draw_shots(labels, 5, seed=1))
    assert len({int(i) for i in shots.ravel()}) == 15
    with pytest.raises(ValueError, match="fewer than 8 shots"):
        draw_shots(labels, 8, seed=0)


def test_seen_digits_held_out_are_apart_from_the_fine_tunes_images() -> None:
    labels = np.repeat(np.arange(10), 12)
    train, held_out = split_seen(labels, 4, seed=0)
    assert not set(train) & set(held_out)
    assert set(train) | set(held_out) == set(np.flatnonzero(labels < 5))
    assert [int((labels[held_out] == d).sum()) for d in SEEN] == [4] * 5
    np.testing.assert_array_equal(held_out, split_seen(labels, 4, seed=0)[1])


def test_knn_top1_on_raw_pixels_of_a_constructed_case() -> None:
    # Two classes of 2x2 "images", bright on the left or on the right column, on a grey offset.
    left, right = np.array([1.0, 0, 1, 0]), np.array([0, 1.0, 0, 1])
    gallery = np.stack([left + 10, right + 10])
    queries = np.stack([0.9 * left + 10, right * 0.8 + 10, left * 1.2 + 10])
    truth = ["left", "right", "left"]
    assert top1(gallery, ["left", "right"], queries, truth) == 1.0
    wrong = np.stack([right + 10, left + 10])
    assert top1(wrong, ["left", "right"], queries, truth) == 0.0
    # One "right" example nearer to a query than its two "left" examples: 1-NN is wrong, the vote right.
    crowd = np.stack([left, left * 0.9 + right * 0.1, 0.6 * left + 0.4 * right])
    labels = ["left", "left", "right"]
    asked = np.stack([0.62 * left + 0.38 * right])
    assert top1(crowd, labels, asked, ["left"]) == 0.0
    assert top1(crowd, labels, asked, ["left"], neighbours=3) == 1.0
    shifted_gallery, shifted_queries = centered(gallery, queries)
    np.testing.assert_allclose(shifted_gallery.mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(shifted_queries[0], 0.9 * left - 0.5 * (left + right))


def test_scores_report_every_k_and_variant_of_an_episode() -> None:
    rng = np.random.default_rng(0)
    centres = np.eye(3, 6) * 5
    vectors = np.concatenate([centres[c] + rng.normal(0, 0.1, (6, 6)) for c in range(3)])
    labels = [str(c) for c in range(3) for _ in range(6)]
    gallery = draw_shots(np.asarray(labels), 5, seed=0)
    queries = np.setdiff1d(np.arange(18), gallery.ravel())
    found = scores(vectors, labels, gallery, queries, (1, 5))
    assert set(found) == {"k1", "k1_centered", "k5", "k5_centered", "k5_vote"}
    assert found["k1"] == found["k5"] == 1.0
    # Queries that sit on another class's centre are all wrong, whatever the variant.
    moved = vectors.copy()
    moved[queries] = centres[(np.arange(3) + 1) % 3]
    assert all(value == 0.0 for value in scores(moved, labels, gallery, queries, (1, 5)).values())


def test_pooled_pixels_average_equal_cells() -> None:
    inputs = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)
    rows = pooled_pixels(inputs, 2)
    assert rows.shape == (2, 12)
    assert rows[0, 0] == pytest.approx(inputs[0, 0, :2, :2].mean())
    assert rows[1, 11] == pytest.approx(inputs[1, 2, 2:, 2:].mean())
    with pytest.raises(ValueError, match="does not divide"):
        pooled_pixels(inputs, 3)


def test_stage_outputs_are_the_pooled_maps_of_that_width(tmp_path: Path) -> None:
    source = export_tiny(tmp_path / "tiny" / "1", TINY_LABELS)
    staged = with_stage_outputs(source, tmp_path / "staged.onnx", channels=(16,))
    torch.manual_seed(0)  # export_tiny's seed: the same LeNet-5 weights
    model = create_model("lenet5", num_classes=len(TINY_LABELS), pretrained=False).eval()
    transform = eval_transform(TINY_SPEC)
    images = torch.stack([transform(Image.new("RGB", (40, 40), colour)) for colour in ("red", "teal")])
    session = ort.InferenceSession(str(staged), providers=["CPUExecutionProvider"])
    (pooled,) = session.run([stage_name(16)], {INPUT_NAME: images.numpy()})
    with torch.no_grad():
        convolutions = torch.nn.Sequential(
            model.get_submodule("base.conv1"), model.get_submodule("base.conv2")
        )
        expected = convolutions(images).mean(dim=(2, 3)).numpy()
    np.testing.assert_allclose(pooled, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="no 4-D tensor with \\[7\\] channels"):
        with_stage_outputs(source, tmp_path / "none.onnx", channels=(7,))
    rows = Embedder(staged).embed([encode_jpeg(Image.new("RGB", (50, 40), "navy"))] * 3)
    assert list(rows) == ["embedding"]  # 16 channels is no EfficientNet stage: not reported
    np.testing.assert_allclose(np.linalg.norm(rows["embedding"], axis=1), 1.0, rtol=1e-5)


SMALL_ROW = {
    "representation": "raw pixels (8x8)",
    "dim": 64,
    "k1": {"mean": 0.5, "min": 0.4, "max": 0.6},
    "k5": {"mean": 0.9, "min": 0.9, "max": 0.9},
    "k1_centered": {"mean": 0.5, "min": 0.5, "max": 0.5},
    "k5_centered": {"mean": 0.8, "min": 0.7, "max": 0.85},
    "k5_vote": {"mean": 0.7, "min": 0.6, "max": 0.8},
}


def _named(name: str, dim: int, k5: float) -> dict:
    return copy.deepcopy(SMALL_ROW) | {
        "representation": name,
        "dim": dim,
        "k5": {"mean": k5, "min": k5, "max": k5},
    }


def _small_results() -> dict:
    models = [
        _named("ImageNet default (224 px): embedding", 1280, 0.6),
        _named("ImageNet weights at 96 px: embedding", 1280, 0.7),
        _named("fine-tuned on 0-4, 2+3 epochs: embedding", 1280, 0.8),
        _named("fine-tuned on 0-4, 2+3 epochs: block 6 (192 ch)", 192, 0.85),
    ]
    section = {"classes": ["5", "6"], "queries": 10, "seeds": [0, 1], "rows": [SMALL_ROW, *models]}
    return {
        "photos": {
            "classes": {"brick": "texture", "chelsea": "animal"},
            "queries": 16,
            "seeds": [0, 1, 2],
            "views": {
                "crop_fraction_of_shorter_side": [0.35, 0.7],
                "output_side_px": [128, 384],
                "max_query_overlap_iou": 0.25,
                "encoding": "JPEG quality 90",
            },
            "rows": [SMALL_ROW | {"representation": "raw pixels (32x32)"}, models[0]],
        },
        "digits": {
            "fine_tunes": [
                {
                    "backbone": "efficientnet_lite0",
                    "classes": ["0", "1"],
                    "images": 12,
                    "options": {"frozen_epochs": 2, "unfrozen_epochs": 3, "image_size": 96},
                    "seconds": 61.2,
                    "val_accuracy": 0.99,
                }
            ],
            "unchanged_by_fine_tune": {"fine-tuned on 0-4, 2+3 epochs": ["block 4 (80 ch)"]},
            "unseen": section,
            "seen": section | {"classes": ["0", "1"]},
        },
    }


def test_the_docs_block_renders_from_a_small_results_dict() -> None:
    text = render(_small_results())
    assert (
        "| raw pixels (8x8) | 64 | 0.50 (0.40–0.60) | 0.90 | 0.50 | 0.80 (0.70–0.85) | 0.70 (0.60–0.80) |"
        in text
    )
    assert "2 classes (chance 0.50), 10 queries per seed, seeds 0–1" in text
    assert "brick (texture), chelsea (animal)" in text
    assert "Fine-tune 2+3 epochs: efficientnet_lite0, 12 images of 0, 1 at 96 px" in text
    assert "block 4 (80 ch) not listed" in text
    assert "| fine-tuned on 0-4, 2+3 epochs: block 6 (192 ch) | 192 | 0.50 (0.40–0.60) | 0.85 |" in text
    assert "raw pixels reach 0.90; the fine-tuned embeddings 0.80 (on their own classes 0–4: 0.80)" in text
    assert "the ImageNet default 0.60, the same weights at 96 px 0.70" in text
    assert "the best model representation is fine-tuned on 0-4, 2+3 epochs: block 6 (192 ch) at 0.85" in text
    assert score_cell({"mean": 1.0, "min": 1.0, "max": 1.0}) == "1.00"


def test_the_docs_block_is_what_the_results_file_renders() -> None:
    block = block_between(DOC.read_text(), BLOCK_START, BLOCK_END, source=str(DOC))
    assert block == render(read_json(RESULTS)), (
        "docs/galleries.md's few-shot block differs from benchmarks/results/fewshot.json: run "
        "python -m benchmarks.fewshot --report-only"
    )
