"""The exporter: one verified ONNX file with a symbolic batch axis and the contract's metadata."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from modelcontract import (
    EMBEDDING_NAME,
    INPUT_NAME,
    MODEL_FILENAME,
    ONNX_OPSET,
    OUTPUT_NAME,
    SCHEMA_VERSION,
    EvalSpec,
    ModelMetadata,
    version_numbers,
)
from tests.training.images import TINY_LABELS, preprocess
from training.backbones import create_model
from training.export import ExportParityError, export_onnx, next_version_dir
from training.modelfile import read_metadata


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, tiny_batch: torch.Tensor, tiny_spec: EvalSpec):
    torch.manual_seed(0)
    model = create_model("lenet5", num_classes=len(TINY_LABELS), pretrained=False)
    version_dir = next_version_dir(tmp_path_factory.mktemp("repo") / "tiny")
    metadata = export_onnx(
        model,
        version_dir,
        labels=TINY_LABELS,
        eval_spec=tiny_spec,
        backbone="lenet5",
        parity_inputs=tiny_batch[:4],
        val_accuracy=0.5,
        extra_metadata={"run": "test"},
    )
    return model, version_dir, metadata


def _session(version_dir: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(version_dir / MODEL_FILENAME), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("batch_size", [1, 17])
def test_exported_model_answers_any_batch_size_like_pytorch(
    exported: Any, photos: list[Image.Image], tiny_spec: EvalSpec, batch_size: int
) -> None:
    model, version_dir, _ = exported
    images = preprocess([photos[i % len(photos)] for i in range(batch_size)], tiny_spec)
    logits = _session(version_dir).run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})[0]
    with torch.no_grad():
        expected = model(images).numpy()
    assert logits.shape == (batch_size, len(TINY_LABELS))
    np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=1e-4)


def test_exported_file_is_single_checked_onnx_with_symbolic_batch(exported: Any) -> None:
    _, version_dir, _ = exported
    assert sorted(p.name for p in version_dir.iterdir()) == [MODEL_FILENAME]
    onnx.checker.check_model(str(version_dir / MODEL_FILENAME), full_check=True)
    proto = onnx.load(str(version_dir / MODEL_FILENAME))
    assert all(init.data_location == onnx.TensorProto.DEFAULT for init in proto.graph.initializer)
    assert {op.domain: op.version for op in proto.opset_import}[""] == ONNX_OPSET
    session = _session(version_dir)
    (model_input,), (model_output, embedding) = session.get_inputs(), session.get_outputs()
    assert (model_input.name, model_input.type) == (INPUT_NAME, "tensor(float)")
    assert isinstance(model_input.shape[0], str) and model_input.shape[1:] == [3, 32, 32]
    assert (model_output.name, embedding.name) == (OUTPUT_NAME, EMBEDDING_NAME)
    assert isinstance(model_output.shape[0], str) and model_output.shape[1] == len(TINY_LABELS)


def test_metadata_round_trips_through_onnxruntime(exported: Any, tiny_spec: EvalSpec) -> None:
    _, version_dir, metadata = exported
    session = _session(version_dir)
    stored = ModelMetadata.from_props(session.get_modelmeta().custom_metadata_map, "the export")
    assert stored == metadata == read_metadata(version_dir / MODEL_FILENAME)
    assert stored.labels == tuple(TINY_LABELS) and stored.num_classes == len(TINY_LABELS)
    assert stored.eval_spec == tiny_spec and stored.input_shape == (3, 32, 32)
    assert stored.backbone == "lenet5" and stored.val_accuracy == 0.5 and stored.precision == "fp32"
    assert stored.extra == {"run": "test"} and stored.schema_version == SCHEMA_VERSION
    assert stored.parity_max_abs_diff is not None and 0 <= stored.parity_max_abs_diff <= 1e-4
    assert stored.created is not None and stored.created.endswith("Z")
    assert (stored.input_name, stored.output_name, stored.opset) == (INPUT_NAME, OUTPUT_NAME, ONNX_OPSET)


def test_extra_metadata_may_not_override_the_contract(exported: Any) -> None:
    _, _, metadata = exported
    with pytest.raises(ValueError, match=r"may not override contract fields \['labels'\]"):
        replace(metadata, extra={"labels": ["x"]})
    # What the contract writes for the extra fields is plain JSON, next to its own.
    assert json.loads(metadata.to_props()[next(iter(metadata.to_props()))])["run"] == "test"


class _ExportDiffers(torch.nn.Module):
    """Eager PyTorch and the exported graph disagree: the exporter traces a shifted output."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.model(images)
        if torch.onnx.is_in_onnx_export():
            return logits.flip(dims=[1]) * 3.0
        return logits


def test_parity_failure_raises_and_leaves_no_version(
    tmp_path: Path, lenet: torch.nn.Module, tiny_batch: torch.Tensor, tiny_spec: EvalSpec
) -> None:
    version_dir = next_version_dir(tmp_path / "broken")
    with pytest.raises(ExportParityError, match="differs from PyTorch"):
        export_onnx(
            _ExportDiffers(lenet),
            version_dir,
            labels=TINY_LABELS,
            eval_spec=tiny_spec,
            backbone="lenet5",
            parity_inputs=tiny_batch[:4],
        )
    assert not version_dir.exists()
    assert version_numbers(tmp_path / "broken") == []


def test_export_refuses_one_parity_image_and_wrong_shapes(
    tmp_path: Path, lenet: torch.nn.Module, tiny_batch: torch.Tensor, tiny_spec: EvalSpec
) -> None:
    arguments: dict[str, Any] = {"labels": TINY_LABELS, "eval_spec": tiny_spec, "backbone": "lenet5"}
    with pytest.raises(ValueError, match="at least 2 images"):
        export_onnx(lenet, tmp_path / "1", parity_inputs=tiny_batch[:1], **arguments)
    with pytest.raises(ValueError, match=r"\[N, 3, 32, 32\]"):
        export_onnx(lenet, tmp_path / "1", parity_inputs=torch.zeros(2, 3, 40, 40), **arguments)
    with pytest.raises(ValueError, match="2 labels"):
        export_onnx(
            lenet, tmp_path / "1", parity_inputs=tiny_batch[:2], **{**arguments, "labels": ["a", "b"]}
        )
    assert not (tmp_path / "1").exists()


def test_export_never_overwrites_an_existing_model(exported: Any, tiny_batch: torch.Tensor) -> None:
    model, version_dir, _ = exported
    before = (version_dir / "model.onnx").read_bytes()
    with pytest.raises(FileExistsError, match="never overwritten"):
        export_onnx(
            model,
            version_dir,
            labels=TINY_LABELS,
            eval_spec=EvalSpec((32, 32), 36, "bilinear", (0.5,) * 3, (0.5,) * 3),
            backbone="lenet5",
            parity_inputs=tiny_batch[:2],
        )
    assert (version_dir / "model.onnx").read_bytes() == before


def test_next_version_dir_counts_up_past_the_highest_and_ignores_other_names(tmp_path: Path) -> None:
    root = tmp_path / "models" / "digits"
    assert next_version_dir(root) == root / "1"
    assert next_version_dir(root) == root / "2"
    for name in ("7", "0", "latest", ".export-x"):
        (root / name).mkdir()
    (root / "9").write_text("a file is not a version")
    assert version_numbers(root) == [1, 2, 7]
    assert next_version_dir(root) == root / "8"
    assert (root / "8").is_dir()
