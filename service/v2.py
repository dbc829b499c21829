"""KServe Open Inference Protocol (V2) request/response bodies, with Triton's binary tensor extension.

A body is a JSON header optionally followed by raw little-endian tensors; the header's length comes
in `Inference-Header-Content-Length` (0 = the whole body is the single input, batch 1). Inputs with
`parameters.binary_data_size` take their bytes from after the header, in order. Outputs are binary
when asked (`binary_data` per output, `binary_data_output` per request), else JSON `data`. An output
may ask for Triton's `classification: k` (BYTES tensor of "value:index:label" strings, top k).
Pure functions: no HTTP, no model.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.errors import BadRequestError, InvalidInputError

HEADER_LENGTH = "Inference-Header-Content-Length"


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool
    class_count: int = 0


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    tensor: np.ndarray
    outputs: tuple[RequestedOutput, ...]
    timeout_s: float | None
    """The client's own deadline (Triton's `timeout` parameter, sent in microseconds), if any."""


@dataclass(frozen=True)
class TensorSpec:
    """What the served model takes and returns."""

    input_name: str
    input_shape: tuple[int, int, int]
    output_name: str


def parse_infer_request(body: bytes, header_length: str | None, spec: TensorSpec) -> InferRequest:
    """Parse a V2 infer body; `BadRequestError`/`InvalidInputError` say what is wrong."""
    if header_length is not None and header_length.strip() == "0":
        return _raw_request(body, spec)
    header, binary = _split(body, header_length)
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise BadRequestError(f'"inputs" must list exactly one tensor, {spec.input_name!r}')
    tensor, used = _input_tensor(inputs[0], binary, spec)
    if used != len(binary):
        raise BadRequestError(f"{len(binary) - used} bytes of binary data follow the tensors unused")
    parameters = _parameters(header, "the request")
    request_id = header.get("id")
    return InferRequest(
        id=str(request_id) if request_id is not None else None,
        tensor=tensor,
        outputs=_requested_outputs(header, bool(parameters.get("binary_data_output", False)), spec),
        timeout_s=_timeout_s(parameters),
    )


def _raw_request(body: bytes, spec: TensorSpec) -> InferRequest:
    shape = (1, *spec.input_shape)
    if len(body) != math.prod(shape) * 4:
        raise InvalidInputError(
            f"a raw binary request (header length 0) must be one FP32 tensor {list(shape)}, "
            f"{math.prod(shape) * 4} bytes; got {len(body)} bytes"
        )
    tensor = np.frombuffer(body, dtype="<f4").reshape(shape)
    return InferRequest(None, tensor, (RequestedOutput(spec.output_name, binary=True),), None)


def _split(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    if header_length is None:
        length = len(body)
    elif header_length.strip().isdigit() and int(header_length) <= len(body):
        length = int(header_length)
    else:
        raise BadRequestError(
            f"{HEADER_LENGTH}: {header_length!r} must be a byte count no larger than the body "
            f"({len(body)} bytes)"
        )
    try:
        header = json.loads(body[:length])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequestError(f"the inference header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise BadRequestError("the inference header must be a JSON object")
    return header, body[length:]


def _parameters(obj: dict[str, Any], where: str) -> dict[str, Any]:
    parameters = obj.get("parameters", {})
    if not isinstance(parameters, dict):
        raise BadRequestError(f'"parameters" of {where} must be a JSON object')
    return parameters


def _input_tensor(entry: dict[str, Any], binary: bytes, spec: TensorSpec) -> tuple[np.ndarray, int]:
    """The input as float32 and the number of binary bytes it used."""
    if entry.get("name") != spec.input_name:
        raise BadRequestError(
            f"unknown input {entry.get('name')!r}; this model has one input {spec.input_name!r}"
        )
    expected = f"[N, {', '.join(map(str, spec.input_shape))}]"
    if entry.get("datatype") != "FP32":
        raise InvalidInputError(
            f"input {spec.input_name!r} must be FP32 {expected}, got {entry.get('datatype')!r}"
        )
    shape = entry.get("shape")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise BadRequestError(
            f'"shape" of {spec.input_name!r} must be a list of non-negative integers, got {shape!r}'
        )
    count = math.prod(shape)
    size = _parameters(entry, f"input {spec.input_name!r}").get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size != count * 4 or size > len(binary):
            raise InvalidInputError(
                f"binary_data_size {size!r} of {spec.input_name!r} must equal 4 x prod(shape {shape}) = "
                f"{count * 4} bytes, and that many bytes must follow the header ({len(binary)} do)"
            )
        return np.frombuffer(binary[:size], dtype="<f4").reshape(shape), size
    if "data" not in entry:
        raise BadRequestError(f'input {spec.input_name!r} has neither "data" nor parameters.binary_data_size')
    try:
        values = np.asarray(entry["data"], dtype=np.float32)
    except (ValueError, TypeError) as exc:
        raise InvalidInputError(f'"data" of {spec.input_name!r} must be numbers ({exc})') from exc
    if values.size != count:
        raise InvalidInputError(
            f'"data" of {spec.input_name!r} has {values.size} values but shape {shape} needs {count}'
        )
    return values.reshape(shape), 0


def _requested_outputs(
    header: dict[str, Any], binary_default: bool, spec: TensorSpec
) -> tuple[RequestedOutput, ...]:
    entries = header.get("outputs")
    if entries is None:
        return (RequestedOutput(spec.output_name, binary_default),)
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise BadRequestError('"outputs" must be a list of objects')
    outputs = []
    for entry in entries:
        if entry.get("name") != spec.output_name:
            raise BadRequestError(
                f"unknown output {entry.get('name')!r}; this model has one output {spec.output_name!r}"
            )
        parameters = _parameters(entry, f"output {spec.output_name!r}")
        class_count = parameters.get("classification", 0)
        if not isinstance(class_count, int) or class_count < 0:
            raise BadRequestError(f"classification must be a non-negative integer, got {class_count!r}")
        outputs.append(
            RequestedOutput(
                spec.output_name, bool(parameters.get("binary_data", binary_default)), class_count
            )
        )
    return tuple(outputs)


def _timeout_s(parameters: dict[str, Any]) -> float | None:
    timeout = parameters.get("timeout")
    if timeout is None:
        return None
    if not isinstance(timeout, int | float) or timeout <= 0:
        raise BadRequestError(
            f"the timeout parameter must be a positive number of microseconds, got {timeout!r}"
        )
    return float(timeout) / 1e6


def classification_strings(logits: np.ndarray, class_count: int, labels: tuple[str, ...]) -> list[list[str]]:
    """Triton's classification output: top `class_count` per row as "value:index:label" (value = logit)."""
    count = min(class_count, logits.shape[1])
    order = np.argsort(-logits, axis=1, kind="stable")[:, :count]
    return [
        [f"{row[i]:f}:{i}:{labels[i]}" for i in indices] for row, indices in zip(logits, order, strict=True)
    ]


def _bytes_tensor(strings: list[list[str]]) -> bytes:
    parts = []
    for value in (s.encode() for row in strings for s in row):
        parts += [struct.pack("<I", len(value)), value]
    return b"".join(parts)


def encode_infer_response(
    *,
    model_name: str,
    model_version: str,
    request: InferRequest,
    logits: np.ndarray,
    labels: tuple[str, ...],
) -> tuple[bytes, dict[str, str]]:
    """The response body and the headers it needs (header length when binary parts follow)."""
    entries, blobs = [], []
    for output in request.outputs:
        if output.class_count:
            strings = classification_strings(logits, output.class_count, labels)
            entry: dict[str, Any] = {
                "name": output.name,
                "datatype": "BYTES",
                "shape": [len(strings), len(strings[0])],
            }
            raw, data = _bytes_tensor(strings), [s for row in strings for s in row]
        else:
            values = np.ascontiguousarray(logits, dtype="<f4")
            entry = {"name": output.name, "datatype": "FP32", "shape": list(values.shape)}
            raw, data = values.tobytes(), values.ravel().tolist()
        if output.binary:
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = data
        entries.append(entry)
    response: dict[str, Any] = {"model_name": model_name, "model_version": model_version, "outputs": entries}
    if request.id is not None:
        response["id"] = request.id
    header = json.dumps(response, separators=(",", ":")).encode()
    if not blobs:
        return header, {"Content-Type": "application/json"}
    return header + b"".join(blobs), {
        HEADER_LENGTH: str(len(header)),
        "Content-Type": "application/octet-stream",
    }
