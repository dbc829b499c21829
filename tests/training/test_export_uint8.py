"""`input_dtype="uint8"`: the graph takes the cropped pixels and normalizes them itself, and answers as the
float32 export of the same weights does on the same images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from modelcontract import (
    EMBEDDING_NAME,
    FEATURES_NAME,
    INPUT_NAME,
    OUTPUT_NAME,
    SCHEMA_VERSION,
    UINT8,
    EvalTransform,
    softmax,
)
from tests.explainmodel import export_explainable, parity_photos, tiny_conv_classifier
from tests.tinymodel import TINY_LABELS, TINY_SPEC, export_tiny
from training.backbones import create_model
from training.cli import build_parser
from training.export import PARITY_TOLERANCE, export_onnx, pixels_of
from training.modelfile import read_metadata
from training.quantize import QuantizeSettings, quantize_model


def _export_uint8(model: torch.nn.Module, version_dir: Path, backbone: str) -> Path:
    export_onnx(
        model,
        version_dir,
        labels=TINY_LABELS,
        eval_spec=TINY_SPEC,
        backbone=backbone,
        parity_inputs=parity_photos(),
        input_dtype=UINT8,
    )
    return version_dir / "model.onnx"


def _run(path: Path, batch: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {INPUT_NAME: batch}), strict=True))


@pytest.fixture(scope="module")
def lenet_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same seeded LeNet-5 exported with float32 input and with uint8 input."""
    root = tmp_path_factory.mktemp("lenet")
    torch.manual_seed(0)
    model = create_model("lenet5", num_classes=len(TINY_LABELS), pretrained=False)
    return export_tiny(root / "float32", TINY_LABELS, seed=0), _export_uint8(model, root / "uint8", "lenet5")


def test_the_uint8_graph_takes_uint8_pixels_and_says_so(lenet_pair: tuple[Path, Path]) -> None:
    _, pixel_path = lenet_pair
    proto = onnx.load(str(pixel_path))
    graph_input = proto.graph.input[0]
    assert graph_input.name == INPUT_NAME
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert graph_input.type.tensor_type.shape.dim[0].dim_param  # batch axis still symbolic
    metadata = read_metadata(pixel_path)
    assert metadata.input_dtype == UINT8 and metadata.schema_version == SCHEMA_VERSION == 5
    assert metadata.parity_max_abs_diff is not None and metadata.parity_max_abs_diff <= PARITY_TOLERANCE
    assert metadata.mean == TINY_SPEC.mean and metadata.std == TINY_SPEC.std
    assert read_metadata(lenet_pair[0]).input_dtype == "float32"


def test_uint8_logits_match_the_float32_export_on_the_same_photos(lenet_pair: tuple[Path, Path]) -> None:
    float_path, pixel_path = lenet_pair
    rows = parity_photos().numpy()
    pixels = pixels_of(torch.from_numpy(rows), TINY_SPEC)
    float_out, pixel_out = _run(float_path, rows), _run(pixel_path, pixels)
    assert float(np.abs(softmax(float_out[OUTPUT_NAME]) - softmax(pixel_out[OUTPUT_NAME])).max()) <= 1e-5
    np.testing.assert_allclose(pixel_out[OUTPUT_NAME], float_out[OUTPUT_NAME], atol=1e-4)
    np.testing.assert_allclose(pixel_out[EMBEDDING_NAME], float_out[EMBEDDING_NAME], atol=1e-5)


def test_pixels_of_recovers_the_transform_input_exactly() -> None:
    rows = parity_photos()
    pixels = pixels_of(rows, TINY_SPEC)
    assert pixels.dtype == np.uint8
    np.testing.assert_array_equal(EvalTransform.from_spec(TINY_SPEC).normalize(pixels), rows.numpy())


def test_a_feature_map_model_keeps_every_output_with_uint8_input(tmp_path: Path) -> None:
    float_path = export_explainable(tmp_path / "float32")
    pixel_path = _export_uint8(tiny_conv_classifier(len(TINY_LABELS)), tmp_path / "uint8", "tiny_conv")
    metadata = read_metadata(pixel_path)
    assert metadata.explain_output == FEATURES_NAME and metadata.embedding_output == EMBEDDING_NAME
    rows = parity_photos()
    float_out, pixel_out = _run(float_path, rows.numpy()), _run(pixel_path, pixels_of(rows, TINY_SPEC))
    assert list(pixel_out) == [OUTPUT_NAME, FEATURES_NAME, EMBEDDING_NAME]
    for name in pixel_out:
        scale = float(np.abs(float_out[name]).max())
        assert float(np.abs(pixel_out[name] - float_out[name]).max()) <= 1e-5 * max(scale, 1.0), name


def test_parity_inputs_that_are_not_transform_rows_are_refused_before_anything_is_written(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    model = create_model("lenet5", num_classes=len(TINY_LABELS), pretrained=False)
    noise = torch.randn(3, 3, 32, 32)
    with pytest.raises(ValueError, match=r"not the evaluation transform's rows.*EvalTransform.from_spec"):
        export_onnx(
            model,
            tmp_path / "1",
            labels=TINY_LABELS,
            eval_spec=TINY_SPEC,
            backbone="lenet5",
            parity_inputs=noise,
            input_dtype=UINT8,
        )
    assert not (tmp_path / "1").exists()


def test_an_unknown_input_dtype_is_refused(tmp_path: Path) -> None:
    model = create_model("lenet5", num_classes=len(TINY_LABELS), pretrained=False)
    with pytest.raises(ValueError, match=r"input_dtype must be one of \('float32', 'uint8'\)"):
        export_onnx(
            model,
            tmp_path / "1",
            labels=TINY_LABELS,
            eval_spec=TINY_SPEC,
            backbone="lenet5",
            parity_inputs=parity_photos(),
            input_dtype="float16",
        )


def test_the_export_commands_take_input_dtype_defaulting_to_float32() -> None:
    parser = build_parser()
    exported = parser.parse_args(["export", "--checkpoint", "c.pt", "--out", "m", "--input-dtype", "uint8"])
    assert exported.input_dtype == "uint8"
    assert parser.parse_args(["export", "--checkpoint", "c.pt", "--out", "m"]).input_dtype == "float32"
    assert parser.parse_args(["pretrained", "--out", "m", "--input-dtype", "uint8"]).input_dtype == "uint8"
    with pytest.raises(SystemExit):
        parser.parse_args(["export", "--checkpoint", "c.pt", "--out", "m", "--input-dtype", "int8"])


def test_quantize_refuses_a_uint8_model_naming_the_way_out(lenet_pair: tuple[Path, Path]) -> None:
    with pytest.raises(ValueError, match=r"takes uint8 input.*--input-dtype float32 \(the default\)"):
        quantize_model(QuantizeSettings(model=lenet_pair[1].parent))
