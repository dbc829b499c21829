"""The contract metadata inside an ONNX file, read and written with the `onnx` package.

The service reads the same metadata through ONNX Runtime (`service.models.runtime`); both hand the
`metadata_props` to `ModelMetadata.from_props`, which owns the format.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from modelcontract import ModelMetadata


def read_metadata(model_path: Path) -> ModelMetadata:
    """The checked metadata of an ONNX file, without loading its weights; `MetadataError` if unusable."""
    proto = onnx.load(str(model_path), load_external_data=False)
    return ModelMetadata.from_props({p.key: p.value for p in proto.metadata_props}, str(model_path))


def set_metadata(proto: onnx.ModelProto, metadata: ModelMetadata) -> None:
    """Replace the metadata of `proto` (in memory) by `metadata`."""
    onnx.helper.set_model_props(proto, metadata.to_props())
