"""The ONNX graph's interface: one float32 image input, a logits output (and optionally the feature map
class activation maps are made of, and an image embedding), how logits are read, how class activation
maps are made and how embeddings are normalized."""

from __future__ import annotations

import numpy as np

INPUT_NAME = "input"
"""Name of the graph's one input, float32 [batch, 3, H, W] with a symbolic batch axis."""
OUTPUT_NAME = "logits"
"""Name of the graph's logits output, float32 [batch, num_classes]."""
FEATURES_NAME = "features"
"""Name training gives the optional second output: the last feature map, float32 [batch, C, h, w],
the one the head averages and weighs (metadata `explain_output` declares it)."""
EMBEDDING_NAME = "embedding"
"""Name training gives the image-embedding output: float32 [batch, C], the pooled features the head's
linear layer reads (metadata `embedding_output` declares it, with its size and whether it is normalized)."""
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


L2_EPSILON = 1e-12
"""Smallest norm `l2_normalize` divides by, PyTorch's `F.normalize` default: a zero row stays zero."""


def l2_normalize(rows: np.ndarray) -> np.ndarray:
    """Rows [N, D] scaled to unit Euclidean length, in float32: the form cosine search needs, where
    the dot product of two rows is their cosine similarity. Each row is divided by max(norm,
    `L2_EPSILON`), as training's in-graph normalization does, so the two agree."""
    rows = np.asarray(rows, dtype=np.float32)
    norms = np.linalg.norm(rows, axis=-1, keepdims=True)
    return np.asarray(rows / np.maximum(norms, L2_EPSILON), dtype=np.float32)
