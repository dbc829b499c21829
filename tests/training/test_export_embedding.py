"""The export's embedding output: every classifier's pooled features, at unit length, checked against
PyTorch like the logits, declared in the metadata, and kept by INT8 quantization while it stays so."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from modelcontract import (
    EMBEDDING_NAME,
    FEATURES_NAME,
    INPUT_NAME,
    MODEL_FILENAME,
    OUTPUT_NAME,
    version_numbers,
)
from tests.explainmodel import FEATURE_CHANNELS, export_explainable, parity_photos, tiny_conv_classifier
from tests.tinymodel import TINY_LABELS, TINY_SPEC, export_tiny
from training.backbones import create_model
from training.classifier import Classifier
from training.export import EMBEDDING_TOLERANCE, ExportParityError, _embedding_parity, export_onnx
from training.feature_output import drop_output
from training.lenet import LeNet5Features
from training.modelfile import read_metadata
from training.quantize import _without_embedding, embedding_check

LENET_FEATURES = LeNet5Features.num_features


@pytest.fixture(scope="module")
def lenet_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_tiny(tmp_path_factory.mktemp("lenet") / "1", TINY_LABELS)


@pytest.fixture(scope="module")
def conv_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_explainable(tmp_path_factory.mktemp("conv") / "1")


def _lenet() -> Classifier:
    torch.manual_seed(0)  # the seed export_tiny builds its LeNet-5 with
    model = create_model("lenet5", num_classes=len(TINY_LABELS), pretrained=False)
    assert isinstance(model, Classifier)
    return model.eval()


def _run(path: Path, images: torch.Tensor) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, {INPUT_NAME: images.numpy()}), strict=True))


def _unit(rows: np.ndarray) -> np.ndarray:
    """Rows divided by their norm, written out here rather than taken from the code under test."""
    return rows / np.sqrt((rows.astype(np.float64) ** 2).sum(axis=1, keepdims=True))


@pytest.mark.parametrize(
    ("fixture", "outputs", "size"),
    [
        ("lenet_path", [OUTPUT_NAME, EMBEDDING_NAME], LENET_FEATURES),
        ("conv_path", [OUTPUT_NAME, FEATURES_NAME, EMBEDDING_NAME], FEATURE_CHANNELS),
    ],
)
def test_every_classifier_exports_a_declared_embedding_of_its_pooled_width(
    request: pytest.FixtureRequest, fixture: str, outputs: list[str], size: int
) -> None:
    path: Path = request.getfixturevalue(fixture)
    graph = onnx.load(str(path)).graph
    assert [o.name for o in graph.output] == outputs
    dims = graph.output[-1].type.tensor_type.shape.dim
    assert len(dims) == 2 and dims[0].dim_param and dims[1].dim_value == size  # the batch axis stays symbolic
    metadata = read_metadata(path)
    assert metadata.schema_version >= 4 and metadata.has_embedding
    assert (metadata.embedding_output, metadata.embedding_size, metadata.embedding_normalized) == (
        EMBEDDING_NAME, size, True,
    )  # fmt: skip


@pytest.mark.parametrize("rows", [1, 5])
def test_lenet_embedding_is_its_84_unit_vector_at_unit_length(lenet_path: Path, rows: int) -> None:
    """LeNet-5's base already ends in a vector: the embedding is that vector, scaled to length 1, on a
    batch size the export never saw."""
    images = parity_photos()[torch.arange(rows) % 3]
    model = _lenet()
    with torch.no_grad():
        vector = model.base(images).numpy()
        logits = model(images).numpy()
    fetched = _run(lenet_path, images)
    assert fetched[EMBEDDING_NAME].shape == (rows, LENET_FEATURES)
    np.testing.assert_allclose(np.linalg.norm(fetched[EMBEDDING_NAME], axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(fetched[EMBEDDING_NAME], _unit(vector), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(fetched[OUTPUT_NAME], logits, rtol=1e-4, atol=1e-5)


def test_conv_embedding_is_the_average_of_the_feature_map_the_head_reads(conv_path: Path) -> None:
    images = parity_photos()
    model = tiny_conv_classifier(len(TINY_LABELS)).eval()
    with torch.no_grad():
        pooled = model.base(images).mean(dim=(2, 3))
        # The head's linear layer applied to these pooled features gives the model's logits: they are
        # what the head sees, not some other average.
        np.testing.assert_allclose(model.head.linear(pooled).numpy(), model(images).numpy(), rtol=1e-6)
    fetched = _run(conv_path, images)
    np.testing.assert_allclose(fetched[EMBEDDING_NAME], _unit(pooled.numpy()), rtol=1e-4, atol=1e-6)
    # The feature map output is still the one the embedding averages.
    np.testing.assert_allclose(
        _unit(fetched[FEATURES_NAME].mean(axis=(2, 3))), fetched[EMBEDDING_NAME], rtol=1e-4, atol=1e-6
    )


def test_the_embedding_parity_check_refuses_a_drift_beyond_its_tolerance() -> None:
    rng = np.random.default_rng(0)
    reference = _unit(rng.standard_normal((3, 16))).astype(np.float32)
    assert _embedding_parity(reference, reference.copy(), "batch of 3") == 0.0
    largest = float(np.abs(reference).max())
    nudged = reference.copy()
    nudged[0, 0] += largest * EMBEDDING_TOLERANCE / 2
    assert _embedding_parity(reference, nudged, "batch of 3") <= EMBEDDING_TOLERANCE
    nudged[0, 0] += largest * EMBEDDING_TOLERANCE
    with pytest.raises(
        ExportParityError, match=r"batch of 3: ONNX Runtime's embedding differs from PyTorch's"
    ):
        _embedding_parity(reference, nudged, "batch of 3")
    with pytest.raises(ExportParityError, match=r"embedding has shape \[3, 8\], PyTorch's \[3, 16\]"):
        _embedding_parity(reference, reference[:, :8], "batch of 3")


class _ShiftedWhenExported(nn.Module):
    """LeNet-5's base, plus 1 on feature 0 in the exported graph only (eager PyTorch is unchanged)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = LeNet5Features()
        self.register_buffer("shift", torch.eye(LENET_FEATURES)[0])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.inner(images)
        if torch.onnx.is_in_onnx_export():
            return features + self.shift
        return features


def test_an_export_whose_embedding_drifts_is_refused_though_its_logits_agree(tmp_path: Path) -> None:
    """The head ignores feature 0 (its weights are zero), so only the embedding can reveal the shift."""
    torch.manual_seed(0)
    model = Classifier(_ShiftedWhenExported(), LENET_FEATURES, len(TINY_LABELS), [["inner"]]).eval()
    with torch.no_grad():
        model.head.linear.weight[:, 0] = 0.0
    version_dir = tmp_path / "drifting" / "1"
    with pytest.raises(ExportParityError, match="embedding differs from PyTorch's"):
        export_onnx(
            model,
            version_dir,
            labels=TINY_LABELS,
            eval_spec=TINY_SPEC,
            backbone="lenet5",
            parity_inputs=parity_photos(),
        )
    assert not version_dir.exists() and version_numbers(tmp_path / "drifting") == []


def test_an_int8_copy_keeps_a_unit_length_embedding(tmp_path: Path) -> None:
    """ONNX Runtime's quantizer leaves the final division in float: the INT8 embedding still has unit
    length, so the INT8 version keeps it (the feature map goes, its weights being quantized)."""
    from tests.training.images import TINY_LABELS as FOLDER_LABELS  # noqa: PLC0415
    from tests.training.images import write_image_folder  # noqa: PLC0415
    from training.cli import main  # noqa: PLC0415

    model_dir = tmp_path / "models" / "seeing"
    export_explainable(model_dir / "1", list(FOLDER_LABELS))
    data = write_image_folder(tmp_path / "data")
    argv = ["quantize", "--model", str(model_dir / "1"), "--calibration", str(data)]
    assert main([*argv, "--calibration-images", "12", "--throughput-seconds", "0"]) == 0
    int8 = model_dir / "2" / MODEL_FILENAME
    assert [o.name for o in onnx.load(str(int8)).graph.output] == [OUTPUT_NAME, EMBEDDING_NAME]
    metadata = read_metadata(int8)
    assert metadata.precision == "int8" and not metadata.explainable
    assert (metadata.embedding_output, metadata.embedding_size, metadata.embedding_normalized) == (
        EMBEDDING_NAME, FEATURE_CHANNELS, True,
    )  # fmt: skip
    rows = _run(int8, parity_photos())[EMBEDDING_NAME]
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, rtol=1e-5)
    report = json.loads((model_dir / "2" / "quantize.json").read_text())["embedding"]
    assert report["kept"] and report["images"] > 0
    assert -1.0 <= report["min_cosine_to_fp32"] <= report["mean_cosine_to_fp32"] <= 1.0


def _denormalized(source: Path, target: Path) -> Path:
    """A copy of `source` whose embedding output skips the graph's division by the norm."""
    proto = onnx.load(str(source))
    (division,) = [node for node in proto.graph.node if EMBEDDING_NAME in node.output]
    assert division.op_type == "Div"
    division.op_type = "Identity"
    del division.input[1:]
    onnx.save(proto, str(target))
    return target


def test_the_int8_check_drops_an_embedding_that_is_not_as_declared(conv_path: Path, tmp_path: Path) -> None:
    metadata = read_metadata(conv_path)
    images = parity_photos().numpy()
    kept = embedding_check(conv_path, conv_path, metadata, images)
    assert kept["kept"] and kept["min_cosine_to_fp32"] == pytest.approx(1.0, abs=1e-6)
    raw = _denormalized(conv_path, tmp_path / "raw.onnx")
    refused = embedding_check(conv_path, raw, metadata, images)
    assert not refused["kept"] and "off unit length" in refused["reason"]

    proto = onnx.load(str(conv_path))
    stripped = _without_embedding(proto, metadata)
    assert EMBEDDING_NAME not in [o.name for o in proto.graph.output]
    assert not stripped.has_embedding and stripped.embedding_size is None and stripped.explainable
    onnx.save(proto, str(tmp_path / "stripped.onnx"))
    gone = embedding_check(conv_path, tmp_path / "stripped.onnx", metadata, images)
    assert gone == {"kept": False, "reason": "the INT8 graph has no output 'embedding'"}


def test_drop_output_removes_only_the_named_output(lenet_path: Path) -> None:
    proto = onnx.load(str(lenet_path))
    drop_output(proto, "no such output")
    assert [o.name for o in proto.graph.output] == [OUTPUT_NAME, EMBEDDING_NAME]
    drop_output(proto, EMBEDDING_NAME)
    assert [o.name for o in proto.graph.output] == [OUTPUT_NAME]
