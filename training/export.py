"""Export a trained model to a verified, self-describing ONNX file in the model repository.

`export_onnx` is the only way a model enters `models/<name>/<version>/`: it exports in eval mode with
a symbolic batch axis, runs the ONNX checker, proves PyTorch and ONNX Runtime agree on real images,
embeds the contract's `ModelMetadata` and only then moves `model.onnx` into place, so the service never
sees a half-written or unverified file.

A `Classifier` whose head pools a feature map (every backbone but LeNet-5) is exported with a second
output, that feature map (`training.feature_output`), declared in the metadata with the initializer
holding the head's weights, and checked like the logits: the class activation maps ONNX Runtime's
features and the file's weights make must match PyTorch's.

Every `Classifier` (every backbone) also gets an `embedding` output [N, C]: the pooled features its
head's linear layer reads, scaled to unit L2 length in the graph (`training.feature_output`), declared
in the metadata with its size and `embedding_normalized`, and checked like the logits: ONNX Runtime's
rows must match PyTorch's within `EMBEDDING_TOLERANCE`.

With `input_dtype="uint8"` the graph takes the RGB pixels the evaluation transform crops, [N, 3, H, W]
uint8, and normalizes them itself (`UInt8Input`): a GPU then receives a quarter of the bytes, and the
service's decode threads skip the normalization. The parity check feeds ONNX Runtime the pixels and
compares with PyTorch on the float32 rows the evaluation transform makes of the same pixels.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from modelcontract import (
    EMBEDDING_NAME,
    FEATURES_NAME,
    FLOAT32,
    INPUT_DTYPES,
    INPUT_NAME,
    MODEL_FILENAME,
    ONNX_OPSET,
    OUTPUT_NAME,
    UINT8,
    EvalSpec,
    EvalTransform,
    ModelMetadata,
    class_activation_maps,
    softmax,
    version_numbers,
)
from training.classifier import Classifier
from training.feature_output import (
    EMBEDDING_NORMALIZED,
    ExportedOutputs,
    embeddable,
    explainable,
    find_weights_initializer,
    head_weights,
    reference_embedding,
)
from training.modelfile import set_metadata

logger = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-4
"""Largest allowed absolute difference between PyTorch and ONNX Runtime softmax probabilities."""
MAPS_TOLERANCE = 1e-3
"""Largest allowed difference between PyTorch's and ONNX Runtime's class activation maps, relative to
the largest absolute value of PyTorch's (maps are shown normalized, so their scale is what matters)."""
EMBEDDING_TOLERANCE = 1e-3
"""Largest allowed difference between PyTorch's and ONNX Runtime's embeddings, relative to the largest
absolute value of PyTorch's (search compares directions, so their scale is what matters)."""


_ONNX_INPUT_TYPES = {FLOAT32: onnx.TensorProto.FLOAT, UINT8: onnx.TensorProto.UINT8}


class ExportParityError(RuntimeError):
    """ONNX Runtime does not reproduce the PyTorch model closely enough; the export is refused."""


class UInt8Input(nn.Module):
    """`model` behind its input normalization: uint8 pixels [N, 3, H, W] -> float32 -> `model`.

    The evaluation transform's `(v / 255 - mean) / std` is one multiply-add per channel,
    `v * (1 / (255 * std)) + (-mean / std)`, so the graph gains two elementwise nodes (a Mul and an
    Add, which ONNX Runtime runs in one pass over the batch) and the constants are folded at export.
    """

    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(self, model: nn.Module, spec: EvalSpec) -> None:
        super().__init__()
        self.model = model
        std = torch.tensor(spec.std, dtype=torch.float64).view(1, 3, 1, 1)
        mean = torch.tensor(spec.mean, dtype=torch.float64).view(1, 3, 1, 1)
        # Computed in float64, then rounded once: the float32 constants closest to the exact values.
        self.register_buffer("scale", (1.0 / (255.0 * std)).to(torch.float32))
        self.register_buffer("shift", (-mean / std).to(torch.float32))

    def forward(self, pixels: torch.Tensor) -> Any:
        return self.model(pixels.to(torch.float32) * self.scale + self.shift)


def pixels_of(rows: torch.Tensor, spec: EvalSpec) -> np.ndarray:
    """The uint8 pixels [N, 3, H, W] whose evaluation-transform rows are `rows` (normalized float32).

    The transform maps each of the 256 grey levels to one float per channel, so the pixels are found
    by inverting it and rounding; `ValueError` when `rows` are not rows of that transform (another
    normalization, augmented or resampled tensors), since a uint8 graph could not be checked on them.
    """
    values = rows.detach().to("cpu", torch.float64).numpy()
    mean = np.asarray(spec.mean, dtype=np.float64).reshape(1, 3, 1, 1)
    std = np.asarray(spec.std, dtype=np.float64).reshape(1, 3, 1, 1)
    pixels = np.clip(np.rint((values * std + mean) * 255.0), 0, 255).astype(np.uint8)
    again = EvalTransform.from_spec(spec).normalize(pixels)
    worst = float(np.abs(again - values).max())
    if worst > 1e-5:
        raise ValueError(
            f"parity_inputs are not the evaluation transform's rows of whole pixels (they differ from the "
            f"nearest ones by up to {worst:.3g}); for a uint8 export pass rows made by "
            "`EvalTransform.from_spec(eval_spec)` from real images"
        )
    return pixels


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


def _torch_export(model: nn.Module, example: torch.Tensor, path: Path, output_names: list[str]) -> None:
    # Dynamo exporter (the default since torch 2.9); external_data=False keeps the weights inside the
    # single file the contract promises, and an example batch >= 2 keeps the batch axis symbolic.
    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=[INPUT_NAME],
        output_names=output_names,
        opset_version=ONNX_OPSET,
        dynamo=True,
        external_data=False,
        dynamic_shapes=({0: "batch"},),
        verbose=False,
    )


def _check_graph(
    proto: onnx.ModelProto, num_classes: int, spec: EvalSpec, output_names: list[str], input_dtype: str
) -> None:
    onnx.checker.check_model(proto, full_check=True)
    inputs = [i for i in proto.graph.input if i.name not in {init.name for init in proto.graph.initializer}]
    if [i.name for i in inputs] != [INPUT_NAME] or [o.name for o in proto.graph.output] != output_names:
        raise ExportParityError(
            f"exported graph has inputs {[i.name for i in inputs]} and outputs "
            f"{[o.name for o in proto.graph.output]}; expected [{INPUT_NAME!r}] and {output_names}"
        )
    element_type = inputs[0].type.tensor_type.elem_type
    if element_type != _ONNX_INPUT_TYPES[input_dtype]:
        raise ExportParityError(
            f"exported graph's input is {onnx.TensorProto.DataType.Name(element_type)}, expected "
            f"{input_dtype}"
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


def _check_embedding_output(proto: onnx.ModelProto, size: int) -> None:
    """The embedding output is [batch, size] with the batch axis symbolic, as the metadata will say."""
    output = next(o for o in proto.graph.output if o.name == EMBEDDING_NAME)
    dims = output.type.tensor_type.shape.dim
    if len(dims) != 2 or not dims[0].dim_param or dims[1].dim_value != size:
        shape = [d.dim_param or d.dim_value for d in dims]
        raise ExportParityError(
            f"exported graph's {EMBEDDING_NAME!r} output has shape {shape}; expected [batch, {size}] "
            "with a symbolic batch axis"
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


def _run_onnx(path: Path, images: np.ndarray, output_names: list[str]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [np.asarray(output) for output in session.run(output_names, {INPUT_NAME: images})]


def _maps_parity(reference: np.ndarray, features: np.ndarray, weights: np.ndarray, what: str) -> float:
    """Relative difference of every class's activation maps between PyTorch's (`reference`) and those
    `class_activation_maps` makes of ONNX Runtime's feature map and the head's weights (the file's
    initializer `explain_weights`, found equal to them); raises beyond `MAPS_TOLERANCE`."""
    classes = np.arange(len(weights))
    candidate = np.stack([class_activation_maps(row, weights, classes) for row in features])
    scale = max(float(np.abs(reference).max()), 1e-12)
    diff = float(np.abs(reference - candidate).max()) / scale
    if not diff <= MAPS_TOLERANCE:
        raise ExportParityError(
            f"{what}: ONNX Runtime's class activation maps differ from PyTorch's by {diff:.3g} of their "
            f"largest value (tolerance {MAPS_TOLERANCE:g}); the model was not exported"
        )
    return diff


def _embedding_parity(reference: np.ndarray, candidate: np.ndarray, what: str) -> float:
    """Relative difference between PyTorch's embeddings (`reference`) and ONNX Runtime's; raises
    beyond `EMBEDDING_TOLERANCE`."""
    if candidate.shape != reference.shape:
        raise ExportParityError(
            f"{what}: ONNX Runtime's embedding has shape {list(candidate.shape)}, PyTorch's "
            f"{list(reference.shape)}; the model was not exported"
        )
    scale = max(float(np.abs(reference).max()), 1e-12)
    diff = float(np.abs(reference - candidate).max()) / scale
    if not diff <= EMBEDDING_TOLERANCE:
        raise ExportParityError(
            f"{what}: ONNX Runtime's embedding differs from PyTorch's by {diff:.3g} of its largest value "
            f"(tolerance {EMBEDDING_TOLERANCE:g}); the model was not exported"
        )
    return diff


@dataclass(frozen=True)
class _References:
    """PyTorch's answers on the parity images; each output the graph has is checked against one."""

    logits: np.ndarray
    maps: np.ndarray | None
    """Every class's activation maps [N, classes, h, w]; None when the model has no feature map."""
    embedding: np.ndarray | None
    """The embedding [N, C]; None when the model is not a `Classifier` with the shared head."""

    @property
    def output_names(self) -> list[str]:
        if self.embedding is None:
            return [OUTPUT_NAME]
        return ExportedOutputs.output_names(features=self.maps is not None)

    def exported(self, model: nn.Module, spec: EvalSpec, input_dtype: str) -> nn.Module:
        """The module to export: `model` itself, or the wrapper that returns every output, behind the
        input normalization for a uint8 input."""
        if self.embedding is not None:
            model = ExportedOutputs(_as_classifier(model), features=self.maps is not None).eval()
        return UInt8Input(model, spec).eval() if input_dtype == UINT8 else model

    def check(self, outputs: list[np.ndarray], weights: np.ndarray | None, rows: int) -> float:
        """Check ONNX Runtime's `outputs` for the first `rows` images against PyTorch's; return the
        logits' max abs softmax difference, or raise `ExportParityError`."""
        what = f"batch of {rows}"
        fetched = dict(zip(self.output_names, outputs, strict=True))
        diff = _parity(self.logits[:rows], fetched[OUTPUT_NAME], what)
        if self.maps is not None and weights is not None:
            _maps_parity(self.maps[:rows], fetched[FEATURES_NAME], weights, what)
        if self.embedding is not None:
            _embedding_parity(self.embedding[:rows], fetched[EMBEDDING_NAME], what)
        return diff


def build_metadata(
    *,
    labels: Sequence[str],
    eval_spec: EvalSpec,
    backbone: str,
    val_accuracy: float | None,
    parity_max_abs_diff: float,
    extra_metadata: Mapping[str, Any] | None,
    explain_weights: str | None = None,
    embedding_size: int | None = None,
    input_dtype: str = FLOAT32,
) -> ModelMetadata:
    """The metadata of a freshly exported FP32 model, stamped with the current UTC time; with
    `explain_weights` (the head's weights initializer) it declares the feature-map output too, with
    `embedding_size` the embedding output (normalized as `EMBEDDING_NORMALIZED` says); `input_dtype`
    says what its input holds."""
    embeds = embedding_size is not None
    return ModelMetadata(
        labels=tuple(labels),
        eval_spec=eval_spec,
        backbone=backbone,
        val_accuracy=val_accuracy,
        parity_max_abs_diff=parity_max_abs_diff,
        explain_output=None if explain_weights is None else FEATURES_NAME,
        explain_weights=explain_weights,
        embedding_output=EMBEDDING_NAME if embeds else None,
        embedding_size=embedding_size,
        embedding_normalized=EMBEDDING_NORMALIZED if embeds else None,
        input_dtype=input_dtype,
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
    input_dtype: str = FLOAT32,
) -> ModelMetadata:
    """Export `model` (moved to CPU, eval mode) to `version_dir/model.onnx`; return its metadata.

    `extra_metadata` adds JSON fields to the metadata; they may not override the contract's own.
    `input_dtype` "uint8": the graph takes the cropped pixels and normalizes them (`UInt8Input`);
    `parity_inputs` must then be the evaluation transform's rows, whose pixels ONNX Runtime is fed.

    `parity_inputs` are real preprocessed images ([N >= 2, 3, H, W], N = the export example batch):
    ONNX Runtime must reproduce PyTorch's softmax within `PARITY_TOLERANCE` with the same top-1, on
    the whole batch and on a batch of one, or `ExportParityError` is raised and nothing is written.
    A `Classifier` whose head pools a feature map gets the feature-map output too, whose class
    activation maps must match PyTorch's within `MAPS_TOLERANCE` on the same batches; every
    `Classifier` gets the embedding output, within `EMBEDDING_TOLERANCE` of PyTorch's.
    """
    _validate_arguments(labels, parity_inputs, eval_spec)
    if input_dtype not in INPUT_DTYPES:
        raise ValueError(f"input_dtype must be one of {INPUT_DTYPES}, got {input_dtype!r}")
    target = version_dir / MODEL_FILENAME
    if target.exists():
        raise FileExistsError(f"{target} already exists; versions are never overwritten")
    model = model.to("cpu").eval()
    images = parity_inputs.detach().to("cpu", torch.float32).contiguous()
    pixels = None
    if input_dtype == UINT8:
        # PyTorch's references are computed on the transform's rows of exactly the pixels ORT is fed.
        pixels = pixels_of(images, eval_spec)
        images = torch.from_numpy(EvalTransform.from_spec(eval_spec).normalize(pixels))
    with torch.no_grad():
        reference = model(images).numpy()
    if reference.shape != (len(images), len(labels)):
        raise ValueError(f"model outputs {list(reference.shape)} but there are {len(labels)} labels")
    references = _References(
        logits=reference,
        maps=_reference_maps(model, images) if explainable(model, images) else None,
        embedding=(
            reference_embedding(_as_classifier(model), images, EMBEDDING_NORMALIZED)
            if embeddable(model)
            else None
        ),
    )

    version_dir.mkdir(parents=True, exist_ok=True)
    try:
        metadata = _export_verified(
            model,
            version_dir,
            _Inputs(images, pixels),
            references,
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
        "exported %s (%d classes, input %s %s, parity max abs softmax diff %.2g)",
        target,
        len(labels),
        metadata.input_dtype,
        list(metadata.input_shape),
        metadata.parity_max_abs_diff,
    )
    return metadata


def _reference_maps(model: nn.Module, images: torch.Tensor) -> np.ndarray:
    """PyTorch's class activation maps [N, classes, h, w] of every class, for the parity check."""
    with torch.no_grad():
        classifier = _as_classifier(model)
        features = classifier.base(images)
        weights = classifier.head.linear.weight
        return torch.einsum("kc,nchw->nkhw", weights, features).numpy()


@dataclass(frozen=True)
class _Inputs:
    """The parity images: the float32 rows PyTorch sees, and for a uint8 export the pixels ORT sees."""

    rows: torch.Tensor
    pixels: np.ndarray | None

    @property
    def input_dtype(self) -> str:
        return FLOAT32 if self.pixels is None else UINT8

    def example(self) -> torch.Tensor:
        """What the exported module is traced with: the graph's own input."""
        return self.rows if self.pixels is None else torch.from_numpy(self.pixels)

    def onnx(self, rows: int | None = None) -> np.ndarray:
        """The first `rows` (None: all) as ONNX Runtime is fed them."""
        fed = self.rows.numpy() if self.pixels is None else self.pixels
        return fed if rows is None else fed[:rows]


def _export_verified(
    model: nn.Module,
    version_dir: Path,
    inputs: _Inputs,
    references: _References,
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
        names = references.output_names
        exported = references.exported(model, eval_spec, inputs.input_dtype)
        _torch_export(exported, inputs.example(), raw_path, names)
        proto = onnx.load(str(raw_path))
        _check_graph(proto, len(labels), eval_spec, names, inputs.input_dtype)
        embedding_size = None if references.embedding is None else int(references.embedding.shape[1])
        if embedding_size is not None:
            _check_embedding_output(proto, embedding_size)
        weights_name, weights = None, None
        if references.maps is not None:
            weights_name, weights = _weights_name(proto, model), head_weights(_as_classifier(model))
        diff = references.check(_run_onnx(raw_path, inputs.onnx(), names), weights, len(inputs.rows))
        metadata = build_metadata(
            labels=labels,
            eval_spec=eval_spec,
            backbone=backbone,
            val_accuracy=val_accuracy,
            parity_max_abs_diff=diff,
            extra_metadata=extra_metadata,
            explain_weights=weights_name,
            embedding_size=embedding_size,
            input_dtype=inputs.input_dtype,
        )
        set_metadata(proto, metadata)
        onnx.checker.check_model(proto, full_check=True)
        onnx.save_model(proto, str(final_path), save_as_external_data=False)
        references.check(_run_onnx(final_path, inputs.onnx(1), names), weights, 1)
        os.replace(final_path, version_dir / MODEL_FILENAME)
    return metadata


def _weights_name(proto: onnx.ModelProto, model: nn.Module) -> str:
    """The initializer holding the head's weights, which the service reads to make the maps."""
    name = find_weights_initializer(proto, head_weights(_as_classifier(model)))
    if name is None:
        raise ExportParityError(
            "the exported graph holds no initializer equal to the head's weights [classes, C], which the "
            "class activation maps need; the exporter transformed them, so the model was not exported"
        )
    return name


def _as_classifier(model: nn.Module) -> Classifier:
    if not isinstance(model, Classifier):  # explainable() and embeddable() only say yes to one
        raise TypeError(f"expected a Classifier, got {type(model).__name__}")
    return model
