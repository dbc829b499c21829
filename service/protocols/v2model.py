"""What V2 says about a served model version: its metadata, its configuration and its tensor spec.

Plain dicts and dataclasses, the same for every transport: REST returns the dicts as JSON, gRPC
copies them into its messages. Every model takes two inputs, its own tensor (FP32, or UINT8 pixels for
a model exported with uint8 input, which normalizes them in its graph) and
`IMAGE_INPUT` (encoded image files), and has an FP32 output of class scores; a model with an embedding
also has its FP32 `embedding` output [N, D] (unit-length rows), answered when a request names it.
"""

from __future__ import annotations

from typing import Any

from service import __version__
from service.models.registry import LoadedModel
from service.protocols.v2codec import IMAGE_INPUT, V2_DATATYPES, TensorSpec
from service.state import ServiceState

PLATFORM = "onnxruntime_onnx"
EXTENSIONS = ("binary_tensor_data", "classification", "model_repository")


def server_document() -> dict[str, Any]:
    """The V2 server metadata: name, version and the protocol extensions served."""
    return {"name": "convserve", "version": __version__, "extensions": list(EXTENSIONS)}


def tensor_spec(state: ServiceState, loaded: LoadedModel) -> TensorSpec:
    """What `loaded` takes and returns, with this server's per-request row limit."""
    meta = loaded.model.metadata
    return TensorSpec(
        input_name=loaded.model.input_name,
        input_shape=meta.input_shape,
        output_name=loaded.model.output_name,
        labels=meta.labels,
        max_rows=state.settings.max_queue_size,
        extra_outputs=_embedding(loaded),
        input_datatype=_input_datatype(loaded),
    )


def _input_datatype(loaded: LoadedModel) -> str:
    """The V2 datatype of the model's own input (FP32 or UINT8), from its metadata."""
    return V2_DATATYPES[loaded.model.metadata.input_dtype]


def _embedding(loaded: LoadedModel) -> tuple[tuple[str, int], ...]:
    """The embedding output as (name, width), when the model has one."""
    meta = loaded.model.metadata
    if meta.embedding_output is None or meta.embedding_size is None:
        return ()
    return ((meta.embedding_output, meta.embedding_size),)


def _outputs(loaded: LoadedModel) -> list[tuple[str, int]]:
    """Every output a request may ask for, as (name, values per row): the class scores first."""
    return [(loaded.model.output_name, loaded.model.metadata.num_classes), *_embedding(loaded)]


def metadata_document(state: ServiceState, loaded: LoadedModel) -> dict[str, Any]:
    """The V2 model metadata: versions served, inputs and outputs with their shapes, and parameters."""
    meta = loaded.model.metadata
    return {
        "name": loaded.name,
        "versions": [str(v) for v in state.registry.versions(loaded.name)],
        "platform": PLATFORM,
        "inputs": [
            {
                "name": loaded.model.input_name,
                "datatype": _input_datatype(loaded),
                "shape": [-1, *meta.input_shape],
            },
            {"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [-1]},
        ],
        "outputs": [
            {"name": name, "datatype": "FP32", "shape": [-1, width]} for name, width in _outputs(loaded)
        ],
        "parameters": {
            "version": loaded.version,
            "execution_provider": loaded.model.active_provider,
            "max_batch_size": loaded.model.batch_limit(state.settings.max_batch_size),
            "backbone": meta.backbone,
            "val_accuracy": meta.val_accuracy,
            "created": meta.created,
        },
    }


def config_document(state: ServiceState, loaded: LoadedModel) -> dict[str, Any]:
    """A minimal Triton model configuration, enough for perf_analyzer and `tritonclient`'s config calls.

    Triton's dims leave out the batch dimension; the image input is one string per batch entry.
    """
    meta, settings = loaded.model.metadata, state.settings
    return {
        "name": loaded.name,
        "platform": PLATFORM,
        # What one batch holds (a graph with a fixed batch axis caps it); requests may carry more rows.
        "max_batch_size": loaded.model.batch_limit(settings.max_batch_size),
        "version_policy": str(settings.policy),
        "input": [
            {
                "name": loaded.model.input_name,
                "data_type": f"TYPE_{_input_datatype(loaded)}",
                "dims": list(meta.input_shape),
            },
            {"name": IMAGE_INPUT, "data_type": "TYPE_STRING", "dims": [1]},
        ],
        "output": [
            {"name": name, "data_type": "TYPE_FP32", "dims": [width]} for name, width in _outputs(loaded)
        ],
        "dynamic_batching": {"max_queue_delay_microseconds": int(settings.max_queue_delay_ms * 1000)},
    }
