"""Export a trained model to a verified, self-describing ONNX file in the model repository.

`export_onnx` is the only way a model enters `models/<name>/<version>/`: it exports in eval mode with
a symbolic batch axis, runs the ONNX checker, proves PyTorch and ONNX Runtime agree on real images,
embeds the contract's `ModelMetadata` and only then moves `model.onnx` into place, so the service never
sees a half-written or unverified file.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from modelcontract import (
    INPUT_NAME,
    MODEL_FILENAME,
    ONNX_OPSET,
    OUTPUT_NAME,
    EvalSpec,
    ModelMetadata,
    softmax,
    version_numbers,
)
from training.modelfile import set_metadata

logger = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-4
"""Largest allowed absolute difference between PyTorch and ONNX Runtime softmax probabilities."""


class ExportParityError(RuntimeError):
    """ONNX Runtime does not reproduce the PyTorch model closely enough; the export is refused."""


def next_version_dir(model_root: Path) -> Path:
    """Create and return `model_root/<highest version + 1>`; an existing version is never reused."""
    model_root.mkdir(parents=True, exist_ok=True)
    while True:
        versions = version_numbers(model_root)
        candidate = model_root / str((versions[-1] if versions else 0) + 1)
        try:
            candidate.mkdir()  # atomic: a concurrent export that took this number makes us retry
        except FileExistsError:
            continue
        return candidate


def _validate_arguments(labels: Sequence[str], parity_inputs: torch.Tensor, spec: EvalSpec) -> None:
    if len(labels) < 1 or len(set(labels)) != len(labels):
        raise ValueError(f"labels must be a non-empty list of distinct class names, got {list(labels)}")
    expected = (3, *spec.input_size)
    if parity_inputs.dim() != 4 or tuple(parity_inputs.shape[1:]) != expected:
        raise ValueError(
            f"parity_inputs must have shape [N, {expected[0]}, {expected[1]}, {expected[2]}] "
            f"(the eval spec's input size), got {list(parity_inputs.shape)}"
        )
    if parity_inputs.shape[0] < 2:
        raise ValueError(
            "parity_inputs needs at least 2 images: the export example batch must be >= 2 to keep the "
            "batch axis symbolic, and parity on a single image proves little"
        )


def _torch_export(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    # Dynamo exporter (the default since torch 2.9); external_data=False keeps the weights inside the
    # single file the contract promises, and an example batch >= 2 keeps the batch axis symbolic.
    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        opset_version=ONNX_OPSET,
        dynamo=True,
        external_data=False,
        dynamic_shapes=({0: "batch"},),
        verbose=False,
    )


def _check_graph(proto: onnx.ModelProto, num_classes: int, spec: EvalSpec) -> None:
    onnx.checker.check_model(proto, full_check=True)
    inputs = [i for i in proto.graph.input if i.name not in {init.name for init in proto.graph.initializer}]
    if [i.name for i in inputs] != [INPUT_NAME] or [o.name for o in proto.graph.output] != [OUTPUT_NAME]:
        raise ExportParityError(
            f"exported graph has inputs {[i.name for i in inputs]} and outputs "
            f"{[o.name for o in proto.graph.output]}; expected [{INPUT_NAME!r}] and [{OUTPUT_NAME!r}]"
        )
    input_dims = inputs[0].type.tensor_type.shape.dim
    output_dims = proto.graph.output[0].type.tensor_type.shape.dim
    if not input_dims[0].dim_param or not output_dims[0].dim_param:
        raise ExportParityError("exported graph has a fixed batch size; the batch axis must be symbolic")
    shape = [d.dim_value for d in input_dims[1:]]
    if shape != [3, *spec.input_size] or output_dims[1].dim_value != num_classes:
        raise ExportParityError(
            f"exported graph maps [batch, {shape}] to [batch, {output_dims[1].dim_value}]; expected "
            f"[batch, 3, {spec.input_size[0]}, {spec.input_size[1]}] to [batch, {num_classes}]"
        )


def _parity(reference: np.ndarray, candidate: np.ndarray, what: str) -> float:
    """Max abs softmax difference; raises `ExportParityError` beyond tolerance or on a top-1 change."""
    diff = float(np.abs(softmax(reference) - softmax(candidate)).max())
    same_top1 = bool((reference.argmax(axis=1) == candidate.argmax(axis=1)).all())
    if diff > PARITY_TOLERANCE or not same_top1:
        raise ExportParityError(
            f"{what}: ONNX Runtime differs from PyTorch (max abs softmax difference {diff:.3g}, "
            f"tolerance {PARITY_TOLERANCE:g}; identical top-1: {same_top1}); the model was not exported"
        )
    return diff


def _run_onnx(path: Path, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run([OUTPUT_NAME], {INPUT_NAME: images})[0])


def build_metadata(
    *,
    labels: Sequence[str],
    eval_spec: EvalSpec,
    backbone: str,
    val_accuracy: float | None,
    parity_max_abs_diff: float,
    extra_metadata: Mapping[str, Any] | None,
) -> ModelMetadata:
    """The metadata of a freshly exported FP32 model, stamped with the current UTC time."""
    return ModelMetadata(
        labels=tuple(labels),
        eval_spec=eval_spec,
        backbone=backbone,
        val_accuracy=val_accuracy,
        parity_max_abs_diff=parity_max_abs_diff,
        created=datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        extra=extra_metadata or {},
    )


def export_onnx(
    model: nn.Module,
    version_dir: Path,
    *,
    labels: Sequence[str],
    eval_spec: EvalSpec,
    backbone: str,
    parity_inputs: torch.Tensor,
    val_accuracy: float | None = None,
    extra_metadata: Mapping[str, Any] | None = None,
) -> ModelMetadata:
    """Export `model` (moved to CPU, eval mode) to `version_dir/model.onnx`; return its metadata.

    `extra_metadata` adds JSON fields to the metadata; they may not override the contract's own.

    `parity_inputs` are real preprocessed images ([N >= 2, 3, H, W], N = the export example batch):
    ONNX Runtime must reproduce PyTorch's softmax within `PARITY_TOLERANCE` with the same top-1, on
    the whole batch and on a batch of one, or `ExportParityError` is raised and nothing is written.
    """
    _validate_arguments(labels, parity_inputs, eval_spec)
    target = version_dir / MODEL_FILENAME
    if target.exists():
        raise FileExistsError(f"{target} already exists; versions are never overwritten")
    model = model.to("cpu").eval()
    images = parity_inputs.detach().to("cpu", torch.float32).contiguous()
    with torch.no_grad():
        reference = model(images).numpy()
    if reference.shape != (len(images), len(labels)):
        raise ValueError(f"model outputs {list(reference.shape)} but there are {len(labels)} labels")

    version_dir.mkdir(parents=True, exist_ok=True)
    try:
        metadata = _export_verified(
            model,
            version_dir,
            images,
            reference,
            labels=labels,
            eval_spec=eval_spec,
            backbone=backbone,
            val_accuracy=val_accuracy,
            extra_metadata=extra_metadata,
        )
    except BaseException:
        # A failed export must not leave an empty version directory for the service to trip over.
        if version_dir.is_dir() and not any(version_dir.iterdir()):
            version_dir.rmdir()
        raise
    logger.info(
        "exported %s (%d classes, input %s, parity max abs softmax diff %.2g)",
        target,
        len(labels),
        list(metadata.input_shape),
        metadata.parity_max_abs_diff,
    )
    return metadata


def _export_verified(
    model: nn.Module,
    version_dir: Path,
    images: torch.Tensor,
    reference: np.ndarray,
    *,
    labels: Sequence[str],
    eval_spec: EvalSpec,
    backbone: str,
    val_accuracy: float | None,
    extra_metadata: Mapping[str, Any] | None,
) -> ModelMetadata:
    # The staging directory starts with "." and holds no model.onnx, so the service ignores it.
    with tempfile.TemporaryDirectory(prefix=".export-", dir=version_dir) as staging_name:
        staging = Path(staging_name)
        raw_path, final_path = staging / "raw.onnx", staging / MODEL_FILENAME
        _torch_export(model, images, raw_path)
        proto = onnx.load(str(raw_path))
        _check_graph(proto, len(labels), eval_spec)
        diff = _parity(reference, _run_onnx(raw_path, images.numpy()), f"batch of {len(images)}")
        metadata = build_metadata(
            labels=labels,
            eval_spec=eval_spec,
            backbone=backbone,
            val_accuracy=val_accuracy,
            parity_max_abs_diff=diff,
            extra_metadata=extra_metadata,
        )
        set_metadata(proto, metadata)
        onnx.checker.check_model(proto, full_check=True)
        onnx.save_model(proto, str(final_path), save_as_external_data=False)
        _parity(reference[:1], _run_onnx(final_path, images[:1].numpy()), "batch of 1")
        os.replace(final_path, version_dir / MODEL_FILENAME)
    return metadata
