"""The metadata contract: one object, its JSON form in `metadata_props`, and errors that name the field."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from PIL import Image

from modelcontract import (
    INTERPOLATIONS,
    METADATA_KEY,
    SCHEMA_VERSION,
    EvalSpec,
    EvalTransform,
    MetadataError,
    ModelMetadata,
    softmax,
)
from modelcontract.metadata import LOGITS, PROBABILITIES

SPEC = EvalSpec((32, 24), 36, "bicubic", (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
METADATA = ModelMetadata(
    labels=("cat", "dog"),
    eval_spec=SPEC,
    backbone="lenet5",
    val_accuracy=0.75,
    parity_max_abs_diff=1e-6,
    created="2026-01-01T00:00:00Z",
    extra={"calibration": {"images": 12}},
)


def _json(**changes: Any) -> str:
    """The metadata JSON of `METADATA` with fields replaced (a value of ... removes the field)."""
    fields = {**METADATA.to_json(), **changes}
    return json.dumps({key: value for key, value in fields.items() if value is not ...})


def test_metadata_round_trips_through_its_props_form() -> None:
    props = METADATA.to_props()
    assert list(props) == [METADATA_KEY]
    parsed = ModelMetadata.from_props(props, "model.onnx")
    assert parsed == METADATA
    assert parsed.input_shape == (3, 32, 24) and parsed.num_classes == 2
    assert (parsed.resize_size, parsed.interpolation, parsed.mean, parsed.std) == (
        36, "bicubic", (0.5, 0.4, 0.3), (0.2, 0.25, 0.3),
    )  # fmt: skip
    assert json.loads(props[METADATA_KEY])["schema_version"] == SCHEMA_VERSION


def test_metadata_written_before_the_schema_version_still_parses() -> None:
    # What exports wrote before the version field, precision and the graph names existed.
    old = {
        "labels": ["cat", "dog"], "input_shape": [3, 32, 24], "resize_size": 36, "interpolation": "bicubic",
        "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "backbone": "lenet5", "val_accuracy": 0.75,
        "parity_max_abs_diff": 1e-6, "created": "2026-01-01T00:00:00Z", "input_name": "input",
        "output_name": "logits", "opset": 18, "num_classes": 2, "calibration": {"images": 12},
    }  # fmt: skip
    assert ModelMetadata.from_json(json.dumps(old), "old.onnx") == replace(METADATA, schema_version=1)


def test_metadata_from_a_newer_schema_is_refused_with_the_way_out() -> None:
    newer = SCHEMA_VERSION + 1
    expected = rf"new\.onnx: .*schema version {newer}, newer than the {SCHEMA_VERSION} .*upgrade convserve"
    with pytest.raises(MetadataError, match=expected):
        ModelMetadata.from_json(_json(schema_version=SCHEMA_VERSION + 1), "new.onnx")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (None, r"m\.onnx has no 'convserve' metadata; export it with `python -m training export`"),
        ("{not json", r"m\.onnx: 'convserve' metadata is not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        (_json(labels=..., std=...), r"lacks \['labels', 'std'\]"),
        (_json(labels=[]), "'labels' must be a non-empty list of strings"),
        (_json(num_classes=3), "'num_classes' is 3 but there are 2 labels"),
        (_json(input_shape=[1, 32, 32]), r"'input_shape' must be \[3, H, W\] \(RGB\), got \[1, 32, 32\]"),
        (_json(input_shape=[3, 32]), "'input_shape' must be three positive integers"),
        (_json(resize_size=0), "'resize_size' must be a positive integer, got 0"),
        (_json(resize_size=16), r"'resize_size' \(16\) must be at least the shorter side of the crop"),
        (_json(interpolation="lanczos"), r"'interpolation' must be one of \('nearest', 'bilinear', 'bicu"),
        (_json(mean=[0.5, "x", 0.5]), "'mean' must be three finite numbers"),
        (_json(std=[0.5, 0.0, 0.5]), r"'std' must be positive, got \[0.5, 0.0, 0.5\]"),
        (_json(val_accuracy="high"), "'val_accuracy' must be a finite number or null"),
        (_json(val_accuracy=97.5), r"'val_accuracy' must be a fraction in \[0, 1\]"),
        (_json(backbone=3), "'backbone' must be a string, got 3"),
        (_json(schema_version="1"), "'schema_version' must be a positive integer"),
        (_json(output_kind="sigmoid"), r"'output_kind' must be one of \('logits', 'probabilities'\)"),
        (
            _json(schema_version=1, output_kind="probabilities"),
            "'output_kind' 'probabilities' needs schema version 2 or later, got 1",
        ),
    ],
)
def test_bad_metadata_is_refused_naming_the_file_and_the_field(text: str | None, message: str) -> None:
    with pytest.raises(MetadataError, match=message) as refused:
        ModelMetadata.from_json(text, "m.onnx")
    assert str(refused.value).startswith("m.onnx")


def test_extra_fields_are_kept_but_may_not_shadow_the_contract() -> None:
    parsed = ModelMetadata.from_json(_json(weights="ImageNet"), "m.onnx")
    assert parsed.extra == {"calibration": {"images": 12}, "weights": "ImageNet"}
    with pytest.raises(ValueError, match=r"may not override contract fields \['backbone'\]"):
        ModelMetadata(labels=("a",), eval_spec=SPEC, extra={"backbone": "x"})


def test_transform_from_the_spec_is_the_transform_with_those_fields() -> None:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    direct = EvalTransform((32, 24), 36, "bicubic", (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    from_metadata = EvalTransform.from_spec(ModelMetadata.from_props(METADATA.to_props(), "m").eval_spec)
    assert from_metadata == direct
    np.testing.assert_array_equal(from_metadata(image), direct(image))


def test_spec_read_back_from_lists_equals_the_original() -> None:
    assert EvalSpec([32, 24], 36, "bicubic", [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]) == SPEC  # type: ignore[arg-type]
    assert set(INTERPOLATIONS) == {"nearest", "bilinear", "bicubic"}


def test_softmax_rows_are_probabilities_even_for_huge_logits() -> None:
    probabilities = softmax(np.array([[1000.0, 1000.0, -1000.0], [0.0, 0.0, 0.0]], dtype=np.float32))
    np.testing.assert_allclose(probabilities, [[0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]])


def test_a_version_1_file_is_a_logits_model_and_a_probabilities_model_round_trips() -> None:
    version_1 = ModelMetadata.from_json(_json(schema_version=1, output_kind=...), "old.onnx")
    assert version_1.output_kind == LOGITS and version_1.schema_version == 1
    probabilities = replace(METADATA, output_kind=PROBABILITIES)
    assert json.loads(probabilities.to_props()[METADATA_KEY])["output_kind"] == "probabilities"
    assert ModelMetadata.from_props(probabilities.to_props(), "p.onnx") == probabilities


def test_scores_are_the_softmax_of_logits_and_the_outputs_of_a_probabilities_model() -> None:
    outputs = np.array([[0.2, 0.7, 0.1], [0.6, 0.3, 0.1]], dtype=np.float32)
    logits_scores = METADATA.scores(outputs)
    np.testing.assert_allclose(logits_scores, softmax(outputs))
    assert not np.allclose(logits_scores, outputs)  # the softmax really changed them
    probability_scores = replace(METADATA, output_kind=PROBABILITIES).scores(outputs)
    assert probability_scores.dtype == np.float64
    np.testing.assert_array_equal(probability_scores, outputs.astype(np.float64))
