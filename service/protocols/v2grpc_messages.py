"""The gRPC API's messages to and from what every V2 transport shares (`service.protocols.v2codec`,
`service.protocols.v2model`): protobuf in, the codec's `InferRequest` out, and back.

Pure functions: no server, no model. Every decision about what a request may ask (input names,
datatypes, shapes, sizes, outputs, the response budget) is the codec's; this module only finds the
bytes in the message. An input's data comes either as `raw_input_contents` (one entry per input, in
order: little-endian FP32 (UINT8 bytes for a model with uint8 input), or length-prefixed BYTES
elements) or as typed `contents` (`fp32_contents`, `uint_contents` for UINT8, `bytes_contents`), never
both. The whole message is at most
CONVSERVE_MAX_UPLOAD_BYTES (gRPC refuses larger ones before they reach the service), which bounds
the values, parameters and elements it can hold.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from google.protobuf import json_format

from service.errors import BadRequestError, InvalidInputError
from service.inference.predictor import Inputs, uint8_pixels
from service.protocols.v2codec import (
    IMAGE_INPUT,
    InferRequest,
    OutputTensor,
    TensorSpec,
    check_input,
    check_request_id,
    client_timeout_s,
    finish_request,
    image_elements,
    input_tensor,
    requested_output,
    split_bytes_elements,
)
from service.protocols.v2proto import grpc_service_pb2 as pb
from service.versionpolicy import VersionPolicy

# Typed contents each input kind reads; any other typed field set is a client's mistake.
_CONTENTS_FIELD = {"FP32": "fp32_contents", "UINT8": "uint_contents", "BYTES": "bytes_contents"}


def parameter_values(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """A protobuf `map<string, InferParameter>` as plain values (None for a parameter with none set)."""
    return {
        key: getattr(value, choice) if (choice := value.WhichOneof("parameter_choice")) else None
        for key, value in parameters.items()
    }


def infer_request(
    message: pb.ModelInferRequest, spec: TensorSpec, deadline_s: float | None
) -> tuple[Inputs, InferRequest]:
    """The model inputs and the codec's request for `message`; `ServiceError` (400, 413, 422) if unusable.

    `deadline_s` is what remains of the client's gRPC deadline; with Triton's `timeout` parameter,
    the shorter one applies.
    """
    request_id = check_request_id(message.id or None)
    parameters = parameter_values(message.parameters)
    if len(message.inputs) != 1:
        raise BadRequestError(
            f"{len(message.inputs)} inputs sent; send exactly one: {spec.input_name!r} "
            f"({spec.input_datatype}) or {IMAGE_INPUT!r} (BYTES, encoded images)"
        )
    outputs: list[Any] = []
    for entry in message.outputs:
        outputs.append(requested_output(entry.name, parameter_values(entry.parameters), True, spec, outputs))
    timeouts = [t for t in (client_timeout_s(parameters.get("timeout")), deadline_s) if t is not None]
    entry = message.inputs[0]
    shape = list(entry.shape)
    kind = check_input(entry.name, entry.datatype, shape, spec)
    raw = _raw_contents(message, entry)
    if kind == "tensor":
        tensor = input_tensor(raw, shape, spec) if raw is not None else _typed_tensor(entry, shape, spec)
        inputs = Inputs(tensor=tensor, timeout_s=min(timeouts, default=None))
    else:
        elements = (
            split_bytes_elements(raw, math.prod(shape))
            if raw is not None
            else list(_typed(entry, "BYTES").bytes_contents)
        )
        inputs = Inputs(images=image_elements(elements, shape), timeout_s=min(timeouts, default=None))
    request = finish_request(request_id, inputs, outputs, True, spec)
    return request.inputs, request


def _raw_contents(
    message: pb.ModelInferRequest, entry: pb.ModelInferRequest.InferInputTensor
) -> bytes | None:
    """The input's raw contents, or None when it comes as typed contents."""
    count = len(message.raw_input_contents)
    if count == 0:
        return None
    if count != len(message.inputs):
        raise BadRequestError(
            f"{count} raw_input_contents for {len(message.inputs)} input(s); send one per input, in order"
        )
    if entry.HasField("contents"):
        raise BadRequestError(
            f"input {entry.name!r} has both raw_input_contents and typed contents; send one of them"
        )
    return message.raw_input_contents[0]


def _typed(entry: pb.ModelInferRequest.InferInputTensor, datatype: str) -> pb.InferTensorContents:
    """The input's typed contents, holding only the field its datatype reads."""
    wanted = _CONTENTS_FIELD[datatype]
    if not entry.HasField("contents"):
        raise BadRequestError(
            f"input {entry.name!r} has no data; send it as raw_input_contents (one per input, in order) "
            f"or as contents.{wanted}"
        )
    others = [field.name for field, _ in entry.contents.ListFields() if field.name != wanted]
    if others:
        raise InvalidInputError(
            f"input {entry.name!r} ({entry.datatype}) takes its values in contents.{wanted}, not in "
            f"{', '.join(others)}"
        )
    return entry.contents


def _typed_tensor(
    entry: pb.ModelInferRequest.InferInputTensor, shape: list[int], spec: TensorSpec
) -> np.ndarray:
    """The model's own input from its typed contents: `fp32_contents`, or for UINT8 `uint_contents`
    (protobuf has no 8-bit field: each pixel is a uint32, checked to be at most 255)."""
    field_name = _CONTENTS_FIELD[spec.input_datatype]
    values = getattr(_typed(entry, spec.input_datatype), field_name)
    count = math.prod(shape)
    if len(values) != count:
        raise InvalidInputError(
            f"input {entry.name!r} of shape {shape} needs {count} values in contents.{field_name}, "
            f"got {len(values)}"
        )
    if spec.input_datatype == "UINT8":
        read = np.fromiter(values, dtype=np.uint32, count=count).reshape(shape)
        return uint8_pixels(read, f"contents.{field_name} of {entry.name!r}")
    return np.fromiter(values, dtype=np.float32, count=count).reshape(shape)


def infer_response(
    model_name: str, model_version: str, request: InferRequest, outputs: list[OutputTensor]
) -> pb.ModelInferResponse:
    """The answer: each requested output's tensor, its data in `raw_output_contents`."""
    response = pb.ModelInferResponse(model_name=model_name, model_version=model_version, id=request.id or "")
    for tensor in outputs:
        response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        response.raw_output_contents.append(tensor.raw)
    return response


def model_metadata(document: Mapping[str, Any]) -> pb.ModelMetadataResponse:
    """The V2 metadata document as gRPC's message (which has no `parameters`)."""
    return json_format.ParseDict(document, pb.ModelMetadataResponse(), ignore_unknown_fields=True)


def model_config(document: Mapping[str, Any]) -> pb.ModelConfigResponse:
    """The model configuration document as Triton's `ModelConfig` (its `version_policy` as a message)."""
    fields = {**document, "version_policy": _version_policy(str(document["version_policy"]))}
    config = json_format.ParseDict(fields, pb.ModelConfig(), ignore_unknown_fields=True)
    return pb.ModelConfigResponse(config=config)


def _version_policy(text: str) -> dict[str, Any]:
    policy = VersionPolicy.parse(text)
    if policy.specific:
        return {"specific": {"versions": list(policy.specific)}}
    if policy.latest is None:
        return {"all": {}}
    return {"latest": {"num_versions": policy.latest}}


def repository_index(entries: list[dict[str, Any]], ready_only: bool) -> pb.RepositoryIndexResponse:
    """The repository index (`service.protocols.repository.index_entries`); READY versions only if asked."""
    response = pb.RepositoryIndexResponse()
    for entry in entries:
        if not ready_only or entry["state"] == "READY":
            name, version, state = entry["name"], entry["version"], entry["state"]
            response.models.add(name=name, version=version, state=state, reason=entry["reason"] or "")
    return response
