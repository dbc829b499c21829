"""Static QDQ quantization of an ONNX file with ONNX Runtime's quantizer, tuned for x86 CPUs without VNNI."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from modelcontract import INPUT_NAME

_BATCH = 32
"""Images per calibration batch."""


class _Batches(CalibrationDataReader):
    """Feeds the quantizer's calibration run with fixed-size batches of preprocessed images."""

    def __init__(self, images: np.ndarray) -> None:
        self._batches: Iterator[np.ndarray] = iter(np.array_split(images, max(1, len(images) // _BATCH)))

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)}


def depthwise_weights(model: onnx.ModelProto) -> list[str]:
    """Weight initializers of the depthwise convolutions (one input channel per group)."""
    weights = {init.name: init for init in model.graph.initializer}
    names = []
    for node in model.graph.node:
        group = next((attr.i for attr in node.attribute if attr.name == "group"), 1)
        weight = weights.get(node.input[1]) if node.op_type == "Conv" else None
        if weight is not None and group > 1 and weight.dims[1] == 1:
            names.append(weight.name)
    return names


def _output_channel_axis(node: onnx.NodeProto) -> int:
    """The weight axis of the output channels: 0 for Conv and for Gemm with transB=1 (PyTorch's)."""
    trans_b = next((attr.i for attr in node.attribute if attr.name == "transB"), 0)
    return 1 if node.op_type == "Gemm" and not trans_b else 0


def weight_overrides(model: onnx.ModelProto, full_range_layers: int) -> dict[str, list[dict[str, Any]]]:
    """ORT `TensorQuantOverrides` for the weights that are not int8 in 7 bits (see `quantize_file`)."""
    depthwise = set(depthwise_weights(model))
    weights = {init.name for init in model.graph.initializer}
    layers = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm") and n.input[1] in weights]
    full = [n for n in layers if n.input[1] not in depthwise][:full_range_layers]
    overrides: dict[str, list[dict[str, Any]]] = {
        name: [{"axis": 0, "quant_type": QuantType.QInt8, "reduce_range": False}] for name in depthwise
    }
    for node in full:
        overrides[node.input[1]] = [
            {"axis": _output_channel_axis(node), "quant_type": QuantType.QUInt8, "reduce_range": False}
        ]
    return overrides


def quantize_file(
    source: Path, target: Path, calibration: np.ndarray, work: Path, full_range_layers: int = 4
) -> None:
    """Static QDQ quantization: uint8 activations (MinMax), per-channel weights in three kinds.

    The kinds suit ONNX Runtime's x86 kernels without VNNI (AVX2, this project's CPU). Measured on
    EfficientNet-Lite0 (ImageNet): mean KL divergence of the INT8 softmax from FP32's on the 56
    sample-photo views, and in-process images/s at batch 8 relative to FP32.
    - Most Conv/Gemm weights are int8 in 7 bits (U8S8, `reduce_range`). The U8S8 GEMM, the fastest
      (1.6-1.85x FP32), adds pairs of u8 x s8 products in int16 (VPMADDUBSW): full 8-bit weights
      saturate it (top-1 agreement 70 %), 7 bits cannot, but cost precision (KL 0.10).
    - The first `full_range_layers` Conv/Gemm layers that are not depthwise get uint8 weights in
      full 8 bits (U8U8: widened to int16 before multiplying, no saturation, but slower). The stem
      and the first projections are where 7 bits hurt most (KL 0.10 -> 0.032 with the first 4, at
      1.6-1.75x FP32); U8U8 everywhere gives KL 0.024 but only 1.25-1.35x FP32.
    - Depthwise Conv weights are int8 in full 8 bits: MLAS's u8s8 depthwise kernel accumulates in
      int32 and does not saturate (its uint8-weight depthwise kernel is 6x slower than FP32).
    On CPUs with VNNI (VPDPBUSD adds u8 x s8 products in int32) full-range U8S8 does not saturate
    and would be both the fastest and the most precise choice for every layer.
    """
    prepared = work / "prepared.onnx"
    # ORT's recommended pre-processing: shape inference and graph fusions (Conv+BN etc.) before
    # calibration, so ranges are collected on the graph that will actually be quantized.
    quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    quantize_static(
        str(prepared),
        str(target),
        _Batches(calibration),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        reduce_range=True,
        calibrate_method=CalibrationMethod.MinMax,
        extra_options={
            "TensorQuantOverrides": weight_overrides(onnx.load(str(prepared)), full_range_layers),
            # A dead channel (weights ~0 after BatchNorm folding) gets a weight scale so small that its
            # bias overflows int32 and is clipped (EfficientNet-Lite0's stem: 7.07 -> 0); ORT only
            # corrects that for symmetric int8 weights. A range >= 1e-3 keeps every bias within 0.002.
            "MinimumRealRange": 1e-3,
        },
    )
