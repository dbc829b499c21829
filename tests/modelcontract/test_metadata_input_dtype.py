"""Schema 5's `input_dtype`: float32 rows or uint8 pixels, and the transform that makes either."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from PIL import Image

from modelcontract import (
    FLOAT32,
    METADATA_KEY,
    SCHEMA_VERSION,
    UINT8,
    EvalSpec,
    EvalTransform,
    MetadataError,
    ModelMetadata,
)
from tests.photos import photo

SPEC = EvalSpec((32, 24), 36, "bicubic", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
FLOAT_MODEL = ModelMetadata(labels=("cat", "dog"), eval_spec=SPEC, backbone="lenet5")
PIXEL_MODEL = replace(FLOAT_MODEL, input_dtype=UINT8)


def _json(metadata: ModelMetadata, **changes: Any) -> str:
    """The metadata JSON of `metadata` with fields replaced (a value of ... removes the field)."""
    fields = {**metadata.to_json(), **changes}
    return json.dumps({key: value for key, value in fields.items() if value is not ...})


def test_a_uint8_model_round_trips_at_the_current_schema() -> None:
    written = json.loads(PIXEL_MODEL.to_props()[METADATA_KEY])
    assert SCHEMA_VERSION == 5 and written["schema_version"] == 5 and written["input_dtype"] == "uint8"
    parsed = ModelMetadata.from_props(PIXEL_MODEL.to_props(), "m.onnx")
    assert parsed == PIXEL_MODEL and parsed.input_dtype == UINT8
    assert parsed.mean == SPEC.mean and parsed.std == SPEC.std  # still describe the normalization


def test_a_float32_model_writes_its_input_dtype_too() -> None:
    assert json.loads(FLOAT_MODEL.to_props()[METADATA_KEY])["input_dtype"] == "float32"


@pytest.mark.parametrize("version", [1, 2, 3, 4])
def test_files_of_older_versions_read_as_float32(version: int) -> None:
    old = _json(FLOAT_MODEL, schema_version=version, input_dtype=..., embedding_output=...)
    parsed = ModelMetadata.from_json(old, "old.onnx")
    assert parsed.schema_version == version and parsed.input_dtype == FLOAT32


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"input_dtype": "int8"}, r"'input_dtype' must be one of \('float32', 'uint8'\), got 'int8'"),
        ({"input_dtype": "UINT8"}, r"'input_dtype' must be one of \('float32', 'uint8'\), got 'UINT8'"),
        ({"input_dtype": 8}, "'input_dtype' must be a string, got 8"),
        ({"input_dtype": None}, "'input_dtype' must be a string, got None"),
        ({"schema_version": 4}, "'input_dtype' 'uint8' needs schema version 5 or later, got 4"),
    ],
)
def test_a_bad_input_dtype_is_refused_naming_the_field(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(MetadataError, match=message) as refused:
        ModelMetadata.from_json(_json(PIXEL_MODEL, **changes), "m.onnx")
    assert str(refused.value).startswith("m.onnx: ")


def test_uint8_rows_are_the_cropped_pixels_the_float32_rows_are_made_of() -> None:
    image = photo("chelsea")
    rows = EvalTransform.from_spec(SPEC)(image)
    pixels = EvalTransform.from_spec(SPEC, UINT8)(image)
    assert pixels.dtype == np.uint8 and pixels.shape == (3, 32, 24)
    # The same crop, laid out CHW, and normalizing it gives the float32 rows bit for bit.
    np.testing.assert_array_equal(pixels, EvalTransform.from_spec(SPEC).crop(image).transpose(2, 0, 1))
    np.testing.assert_array_equal(EvalTransform.from_spec(SPEC).normalize(pixels), rows)


def test_uint8_rows_of_a_small_image_keep_the_zero_padding() -> None:
    # Resized to 24 rows, a wide image is 8 rows short of the 32-row crop: 4 zero rows above and below.
    short = replace(SPEC, resize_size=24)
    wide = Image.fromarray(np.full((10, 14, 3), 200, dtype=np.uint8))
    pixels = EvalTransform.from_spec(short, UINT8)(wide)
    assert pixels[:, :4].max() == 0 and pixels[:, -4:].max() == 0 and pixels[:, 4:28].min() == 200
    np.testing.assert_array_equal(
        EvalTransform.from_spec(short).normalize(pixels), EvalTransform.from_spec(short)(wide)
    )


def test_a_transform_refuses_a_row_of_the_other_dtype() -> None:
    image = photo("coffee")
    with pytest.raises(ValueError, match="writes uint8 rows, got an float32 array"):
        EvalTransform.from_spec(SPEC, UINT8)(image, np.empty((3, 32, 24), np.float32))
    with pytest.raises(ValueError, match="input_dtype must be one of"):
        EvalTransform.from_spec(SPEC, "float16")
