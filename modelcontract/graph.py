"""The ONNX graph's interface: one float32 image input, a logits output (and optionally class activation
maps), how logits are read and how class activation maps are made."""

from __future__ import annotations

import numpy as np

INPUT_NAME = "input"
"""Name of the graph's one input, float32 [batch, 3, H, W] with a symbolic batch axis."""
OUTPUT_NAME = "logits"
"""Name of the graph's logits output, float32 [batch, num_classes]."""
FEATURES_NAME = "features"
"""Name training gives the optional second output: the last feature map, float32 [batch, C, h, w],
the one the head averages and weighs (metadata `explain_output` declares it)."""
ONNX_OPSET = 18
"""Opset training exports with."""


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (numerically stable): the probabilities of [N, classes] logits."""
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return np.asarray(exp / exp.sum(axis=1, keepdims=True))


def class_activation_maps(features: np.ndarray, weights: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """The class activation maps [len(classes), h, w] of one image's feature map `features` [C, h, w].

    For a head that averages the feature map and then applies a linear layer with `weights`
    [num_classes, C], the map of class c is sum_k weights[c, k] * features[k]: its mean over the
    positions is the class's logit less the bias, so it shows where the evidence for c lies.
    """
    channels, height, width = features.shape
    flat = features.reshape(channels, height * width)
    return np.asarray(weights[classes] @ flat).reshape(len(classes), height, width)
