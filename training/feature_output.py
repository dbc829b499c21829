"""The exported graph's outputs beside the logits: the last feature map, from which class activation maps
are made, and the embedding, the pooled features the head's linear layer reads.

Every backbone trained here ends in `ClassifierHead`: global average pool -> dropout -> linear on
the base's last feature map, so the map of class c is sum_k w[c, k] * F_k (no gradients needed). The
graph exports the feature map `F` beside the logits, and the service multiplies it by the head's
weights (an initializer of the same graph) for the classes a client asks about.

Why the feature map and not the maps of every class computed in the graph: ONNX Runtime runs every
node of the graph whatever outputs are requested, so an in-graph 1x1 convolution over 1000 classes
(~63 M multiply-adds per EfficientNet-Lite0 image) is paid by every `/predict`, measured ~9 %
slower at batch 1; the feature map is computed anyway (the pool reads it), so exporting it costs
nothing until it is requested (docs/explain.md has the measurement).

The embedding is the head's own input, taken after the pool and before dropout and the linear layer
(for LeNet-5, whose base ends in fully connected layers, the base's vector), so nearest-neighbour
search compares images by what the classifier sees. The graph scales it to unit L2 length
(`EMBEDDING_NORMALIZED`): cosine search then needs no work in the service, and a norm and a division
over C values cost nothing beside the network. The head's logits are computed from the un-normalized
features, as in training.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn
from torch.nn import functional

from modelcontract import EMBEDDING_NAME, FEATURES_NAME, OUTPUT_NAME, l2_normalize
from training.classifier import Classifier, ClassifierHead

EMBEDDING_NORMALIZED = True
"""Whether exports scale the embedding to unit L2 length in the graph (metadata `embedding_normalized`)."""


def pooled(features: torch.Tensor) -> torch.Tensor:
    """What `ClassifierHead` feeds its dropout and linear layer: the global average of a feature map
    [N, C, h, w], or the vector [N, C] itself. The export's logits parity against the model's own
    forward proves the two stay the same."""
    return features.mean(dim=(2, 3)) if features.dim() == 4 else features


class ExportedOutputs(nn.Module):
    """A `Classifier` whose forward returns what the exported graph outputs: the logits, then the last
    feature map when `features`, then the embedding ([N, C], unit length when `normalize`)."""

    def __init__(self, model: Classifier, *, features: bool, normalize: bool = EMBEDDING_NORMALIZED) -> None:
        super().__init__()
        self.model = model
        self.features = features
        self.normalize = normalize

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feature_map = self.model.base(images)
        vector = pooled(feature_map)
        # The head's own steps after its pool, so the graph pools once for the logits and the embedding.
        logits = self.model.head.linear(self.model.head.dropout(vector))
        embedding = functional.normalize(vector, dim=1) if self.normalize else vector
        return (logits, feature_map, embedding) if self.features else (logits, embedding)

    @staticmethod
    def output_names(features: bool) -> list[str]:
        """The graph's output names, in the order of `forward`'s results."""
        return [OUTPUT_NAME, FEATURES_NAME, EMBEDDING_NAME] if features else [OUTPUT_NAME, EMBEDDING_NAME]


def embeddable(model: nn.Module) -> bool:
    """Whether `model` is a `Classifier` with the shared head, whose input is the embedding."""
    return isinstance(model, Classifier) and isinstance(model.head, ClassifierHead)


def reference_embedding(model: Classifier, images: torch.Tensor, normalize: bool) -> np.ndarray:
    """PyTorch's embedding [N, C] of `images`, for the parity check: the pooled base features,
    normalized by the contract's `l2_normalize` (not by the graph's own code) when `normalize`."""
    with torch.no_grad():
        vector = pooled(model.base(images)).numpy()
    return l2_normalize(vector) if normalize else vector


def explainable(model: nn.Module, example: torch.Tensor) -> bool:
    """Whether `model` is a `Classifier` whose head pools a feature map (LeNet-5's base gives a vector)."""
    if not isinstance(model, Classifier) or not embeddable(model):
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
    drop_output(proto, FEATURES_NAME)


def drop_output(proto: onnx.ModelProto, name: str) -> None:
    """Remove the graph output `name` from `proto` (in memory), if it has one; the nodes stay."""
    kept = [output for output in proto.graph.output if output.name != name]
    del proto.graph.output[:]
    proto.graph.output.extend(kept)
