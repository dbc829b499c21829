"""The model contract between training and serving, in one torch-free place both import.

- `layout`: the repository on disk, `<root>/<name>/<version>/model.onnx`, and how versions are
  numbered and published;
- `graph`: the ONNX graph's input and output names, `softmax`, how logits become probabilities,
  `class_activation_maps`, how a feature map and the head's weights show where a class was seen, and
  `l2_normalize`, how embeddings get unit length;
- `transform`: the evaluation transform, described (`EvalSpec`) and implemented (`EvalTransform`);
- `metadata`: `ModelMetadata`, what a model file says about itself, with its JSON form and checks.
Only numpy and Pillow are needed. The names below are the package's public API.
"""

from modelcontract.graph import (
    EMBEDDING_NAME,
    FEATURES_NAME,
    INPUT_NAME,
    ONNX_OPSET,
    OUTPUT_NAME,
    class_activation_maps,
    l2_normalize,
    softmax,
)
from modelcontract.layout import MODEL_FILENAME, complete_versions, publish_version, version_numbers
from modelcontract.metadata import METADATA_KEY, SCHEMA_VERSION, MetadataError, ModelMetadata
from modelcontract.transform import FLOAT32, INPUT_DTYPES, INTERPOLATIONS, UINT8, EvalSpec, EvalTransform

__all__ = [
    "EMBEDDING_NAME",
    "FEATURES_NAME",
    "FLOAT32",
    "INPUT_DTYPES",
    "INPUT_NAME",
    "INTERPOLATIONS",
    "METADATA_KEY",
    "MODEL_FILENAME",
    "ONNX_OPSET",
    "OUTPUT_NAME",
    "SCHEMA_VERSION",
    "UINT8",
    "EvalSpec",
    "EvalTransform",
    "MetadataError",
    "ModelMetadata",
    "class_activation_maps",
    "complete_versions",
    "l2_normalize",
    "publish_version",
    "softmax",
    "version_numbers",
]
