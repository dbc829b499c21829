"""The exported graph's second output: the last feature map, from which class activation maps are made.

Every backbone trained here ends in `ClassifierHead`: global average pool -> dropout -> linear on
the base's last feature map, so the map of class c is sum_k w[c, k] * F_k (no gradients needed). The
graph exports the feature map `F` beside the logits, and the service multiplies it by the head's
weights (an initializer of the same graph) for the classes a client asks about.

Why the feature map and not the maps of every class computed in the graph: ONNX Runtime runs every
node of the graph whatever outputs are requested, so an in-graph 1x1 convolution over 1000 classes
(~63 M multiply-adds per EfficientNet-Lite0 image) is paid by every `/predict`, measured ~9 %
slower at batch 1; the feature map is computed anyway (the pool reads it), so exporting it costs
nothing until it is requested (docs/explain.md has the measurement).
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from modelcontract import FEATURES_NAME
from training.classifier import Classifier, ClassifierHead


class WithFeatures(nn.Module):
    """A `Classifier` whose forward returns (logits, last feature map), for export."""

    def __init__(self, model: Classifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.base(images)
        return self.model.head(features), features


def explainable(model: nn.Module, example: torch.Tensor) -> bool:
    """Whether `model` is a `Classifier` whose head pools a feature map (LeNet-5's base gives a vector)."""
    if not isinstance(model, Classifier) or not isinstance(model.head, ClassifierHead):
        return False
    with torch.no_grad():
        return bool(model.base(example[:1]).dim() == 4)


def head_weights(model: Classifier) -> np.ndarray:
    """The head's linear weights [num_classes, C] as float32."""
    return model.head.linear.weight.detach().to("cpu", torch.float32).numpy()


def find_weights_initializer(proto: onnx.ModelProto, weights: np.ndarray) -> str | None:
    """The name of the graph initializer equal to `weights` [num_classes, C], or None.

    Found by value, not by name: the exporter names initializers after module paths, which a
    wrapper or a new exporter version changes; the weights themselves do not.
    """
    for initializer in proto.graph.initializer:
        if tuple(initializer.dims) != weights.shape:
            continue
        if np.array_equal(numpy_helper.to_array(initializer), weights):
            return str(initializer.name)
    return None


def drop_features_output(proto: onnx.ModelProto) -> None:
    """Remove the feature-map output from `proto` (in memory), if it has one.

    For a derived file whose weights no longer sit in one float initializer (an INT8 file stores them
    quantized), the maps could not be made as the contract says, so the file does not offer them.
    """
    kept = [output for output in proto.graph.output if output.name != FEATURES_NAME]
    del proto.graph.output[:]
    proto.graph.output.extend(kept)
