"""The ONNX graph's interface: one float32 image input, one logits output, and how logits are read."""

from __future__ import annotations

import numpy as np

INPUT_NAME = "input"
"""Name of the graph's one input, float32 [batch, 3, H, W] with a symbolic batch axis."""
OUTPUT_NAME = "logits"
"""Name of the graph's one output, float32 [batch, num_classes]."""
ONNX_OPSET = 18
"""Opset training exports with."""


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (numerically stable): the probabilities of [N, classes] logits."""
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return np.asarray(exp / exp.sum(axis=1, keepdims=True))
