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
import re
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.errors import BadRequestError, InvalidInputError
from service.jsonparse import json_numbers, loads_json
from service.textsafety import brief

HEADER_LENGTH = "Inference-Header-Content-Length"
_BYTE_COUNT = re.compile(r"[0-9]{1,15}")
# A V2 timeout is microseconds; a day is far beyond any server deadline and keeps floats exact.
_MAX_TIMEOUT_US = 86_400 * 10**6


def _is_int(value: Any) -> bool:
    """A JSON integer (`true` is a bool in Python, and bools are ints there)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_whole(value: Any) -> bool:
    """A JSON number with no fractional part (`parse_int=float` turns every JSON integer into a float)."""
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value) and value == int(value)


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
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequestError(f'"id" must be a string, got {brief(request_id)}')
    return InferRequest(
        id=request_id,
        tensor=tensor,
        outputs=_requested_outputs(header, _flag(parameters, "binary_data_output"), spec),
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
    elif _BYTE_COUNT.fullmatch(header_length.strip()) and int(header_length) <= len(body):
        length = int(header_length)
    else:
        raise BadRequestError(
            f"{HEADER_LENGTH}: {brief(header_length)} must be a byte count no larger than the "
            f"body ({len(body)} bytes)"
        )
    header = loads_json(body[:length], "the inference header")
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
            f"unknown input {brief(entry.get('name'))}; this model has one input {spec.input_name!r}"
        )
    expected = f"[N, {', '.join(map(str, spec.input_shape))}]"
    if entry.get("datatype") != "FP32":
        raise InvalidInputError(
            f"input {spec.input_name!r} must be FP32 {expected}, got {brief(entry.get('datatype'))}"
        )
    raw_shape = entry.get("shape")
    if not (
        isinstance(raw_shape, list)
        and len(raw_shape) <= 8
        and all(_is_whole(d) and d >= 0 for d in raw_shape)
    ):
        raise BadRequestError(
            f'"shape" of {spec.input_name!r} must be a list of non-negative integers, got {brief(raw_shape)}'
        )
    shape = [int(d) for d in raw_shape]
    count = math.prod(shape)
    size = _parameters(entry, f"input {spec.input_name!r}").get("binary_data_size")
    if size is not None:
        if not _is_whole(size) or size != count * 4 or size > len(binary):
            raise InvalidInputError(
                f"binary_data_size {brief(size)} of {spec.input_name!r} must equal 4 x prod(shape "
                f"{shape}) = {count * 4} bytes, and that many bytes must follow the header ({len(binary)} do)"
            )
        return np.frombuffer(binary[: int(size)], dtype="<f4").reshape(shape), int(size)
    if "data" not in entry:
        raise BadRequestError(f'input {spec.input_name!r} has neither "data" nor parameters.binary_data_size')
    values = json_numbers(entry["data"], f'"data" of {spec.input_name!r}')
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
                f"unknown output {brief(entry.get('name'))}; this model has one output {spec.output_name!r}"
            )
        parameters = _parameters(entry, f"output {spec.output_name!r}")
        class_count = parameters.get("classification", 0)
        if not _is_whole(class_count) or class_count < 0:
            raise BadRequestError(f"classification must be a non-negative integer, got {brief(class_count)}")
        binary = _flag(parameters, "binary_data", binary_default)
        outputs.append(RequestedOutput(spec.output_name, binary, int(min(class_count, 2**31))))
    return tuple(outputs)


def _flag(parameters: dict[str, Any], name: str, default: bool = False) -> bool:
    value = parameters.get(name, default)
    if not isinstance(value, bool):
        raise BadRequestError(f"the {name} parameter must be true or false, got {brief(value)}")
    return value


def _timeout_s(parameters: dict[str, Any]) -> float | None:
    timeout = parameters.get("timeout")
    if timeout is None:
        return None
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not 0 < timeout <= _MAX_TIMEOUT_US
    ):
        raise BadRequestError(
            f"the timeout parameter must be a positive number of microseconds up to {_MAX_TIMEOUT_US}, "
            f"got {brief(timeout)}"
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
