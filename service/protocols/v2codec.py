"""KServe Open Inference Protocol (V2) request/response bodies, with Triton's binary tensor extension.

A body is a JSON header optionally followed by raw little-endian tensors; the header's length comes
in `Inference-Header-Content-Length` (0 = the whole body is the single input, batch 1). Inputs with
`parameters.binary_data_size` take their bytes from after the header, in order. Outputs are binary
when asked (`binary_data` per output, `binary_data_output` per request), else JSON `data`. An output
may ask for Triton's `classification: k` (BYTES tensor of "value:index:label" strings, top k).
Pure functions: no HTTP, no model.

Request cost model (B body bytes after decoding, at most CONVSERVE_MAX_UPLOAD_BYTES):
- Binary data is a view of the body (0 copies). JSON `data` is read by `service.transport.tensorjson` only
  after the declared `shape` passed two checks: at most CONVSERVE_MAX_QUEUE_SIZE rows' worth of
  values (`TensorSpec.max_rows` x the model's row; 413 beyond), and `data` holds exactly that many
  (counted from its separators and brackets; flat, or nested exactly as `shape`; 422 otherwise).
  Then it is parsed straight into float32: peak B + the tensor + a few MiB, time linear in B.
- The rest of the header is at most 64 KiB of JSON (`service.transport.jsonparse`), so `outputs` or
  `parameters` cannot be blown up into millions of objects; `id` is at most `MAX_ID_CHARS`.

Response budget: each output name at most once (400 for a repeat) and a classification of at most
the class count K, so for R rows the answer is at most `response_bound(...)` = 256 + the escaped id +
per output 192 + R x K x (4 binary | 24 JSON) bytes, or R x min(k, K) x (56 + digits of K + the
longest escaped label) for a classification, plus the model's name and version. A request is
refused (422, before inference) if that exceeds its own tensor bytes (R x C x H x W x 4) +
`RESPONSE_SLACK_BYTES`, so no request makes the server write much more than it sent; for models
with thousands of classes and tiny inputs that means asking for binary output or fewer classes.
"""

from __future__ import annotations

import functools
import json
import math
import re
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.errors import BadRequestError, InvalidInputError, PayloadTooLargeError
from service.textsafety import brief
from service.transport.jsonparse import BoundedJson, loads_bounded
from service.transport.tensorjson import nested_numbers

HEADER_LENGTH = "Inference-Header-Content-Length"
_BYTE_COUNT = re.compile(r"[0-9]{1,15}")
# A V2 timeout is microseconds; a day is far beyond any server deadline and keeps floats exact.
_MAX_TIMEOUT_US = 86_400 * 10**6
MAX_ID_CHARS = 1024
"""Longest request `id` accepted; it is echoed in the response (a UUID is 36 characters)."""
RESPONSE_SLACK_BYTES = 64 * 1024
"""What an answer may take beyond its request's tensor bytes (see the module docstring)."""
# Upper bounds, in bytes, of the parts of an encoded response (see `response_bound`).
_ENVELOPE_BYTES = 256  # {"model_name":"","model_version":"","outputs":[],"id":""}
_ENTRY_BYTES = 192  # one output without its name and values: datatype, shape, binary_data_size
_FLOAT_JSON_BYTES = 24  # json.dumps of a float32 value as a double ("-1.1754943508222875e-38") and ","
_CLASS_VALUE_BYTES = 48  # f"{value:f}" of a float32: up to 39 digits, a sign, a point and 6 decimals


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
    labels: tuple[str, ...]
    """One per class, in output order."""
    max_rows: int
    """Most rows one request may carry (CONVSERVE_MAX_QUEUE_SIZE)."""


def parse_infer_request(body: bytes, header_length: str | None, spec: TensorSpec) -> InferRequest:
    """Parse a V2 infer body; a `ServiceError` (400, 413, 422) says what is wrong."""
    if header_length is not None and header_length.strip() == "0":
        return _raw_request(body, spec)
    document, binary = _split(body, header_length)
    header = document.value
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise BadRequestError(f'"inputs" must list exactly one tensor, {spec.input_name!r}')
    # Every cheap check before the tensor is read: a request that would be refused anyway (a repeated
    # output, a long id, a bad parameter) never pays for parsing its data.
    parameters = _parameters(header, "the request")
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequestError(f'"id" must be a string, got {brief(request_id)}')
    if request_id is not None and len(request_id) > MAX_ID_CHARS:
        raise BadRequestError(
            f'"id" has {len(request_id)} characters; it is echoed in the response, so send at most '
            f"{MAX_ID_CHARS}"
        )
    outputs = _requested_outputs(header, _flag(parameters, "binary_data_output"), spec)
    timeout_s = _timeout_s(parameters)
    tensor, used = _input_tensor(inputs[0], binary, spec)
    if used != len(binary):
        raise BadRequestError(f"{len(binary) - used} bytes of binary data follow the tensors unused")
    request = InferRequest(id=request_id, tensor=tensor, outputs=outputs, timeout_s=timeout_s)
    document.check_all_read(inputs[0].get("data"))
    _check_response_budget(request, spec)
    return request


def _raw_request(body: bytes, spec: TensorSpec) -> InferRequest:
    shape = (1, *spec.input_shape)
    if len(body) != math.prod(shape) * 4:
        raise InvalidInputError(
            f"a raw binary request (header length 0) must be one FP32 tensor {list(shape)}, "
            f"{math.prod(shape) * 4} bytes; got {len(body)} bytes"
        )
    tensor = np.frombuffer(body, dtype="<f4").reshape(shape)
    return InferRequest(None, tensor, (RequestedOutput(spec.output_name, binary=True),), None)


def _split(body: bytes, header_length: str | None) -> tuple[BoundedJson, memoryview]:
    """The JSON header, and the binary data after it (a view: the body is not copied)."""
    if header_length is None:
        length = len(body)
    elif _BYTE_COUNT.fullmatch(header_length.strip()) and int(header_length) <= len(body):
        length = int(header_length)
    else:
        raise BadRequestError(
            f"{HEADER_LENGTH}: {brief(header_length)} must be a byte count no larger than the "
            f"body ({len(body)} bytes)"
        )
    document = loads_bounded(body, "the inference header", end=length)
    if not isinstance(document.value, dict):
        raise BadRequestError("the inference header must be a JSON object")
    return document, memoryview(body)[length:]


def _parameters(obj: dict[str, Any], where: str) -> dict[str, Any]:
    parameters = obj.get("parameters", {})
    if not isinstance(parameters, dict):
        raise BadRequestError(f'"parameters" of {where} must be a JSON object')
    return parameters


def _input_tensor(entry: dict[str, Any], binary: memoryview, spec: TensorSpec) -> tuple[np.ndarray, int]:
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
    return _json_data(entry["data"], shape, spec), 0


def _json_data(data: Any, shape: list[int], spec: TensorSpec) -> np.ndarray:
    """JSON `data` as float32 of `shape`: the declared size is checked against the budget, then against
    the values' count, before any value is parsed."""
    count, row = math.prod(shape), math.prod(spec.input_shape)
    if count > spec.max_rows * row:
        raise PayloadTooLargeError(
            f"shape {shape} of {spec.input_name!r} declares {count} values; this model takes at most "
            f"{spec.max_rows} rows of {row} ({spec.max_rows * row} values) in one request "
            "(CONVSERVE_MAX_QUEUE_SIZE); split it"
        )
    what = f'"data" of {spec.input_name!r}'
    lists = sum(math.prod(shape[:level]) for level in range(len(shape))) if count else 1
    numbers = nested_numbers(data, what, max_lists=max(1, lists))
    if numbers.shape not in (tuple(shape), (count,)):
        if len(numbers.shape) == 1:
            raise InvalidInputError(f"{what} has {numbers.shape[0]} values but shape {shape} needs {count}")
        raise InvalidInputError(
            f"{what} is nested as {list(numbers.shape)}, not as its shape {shape}; send it flat or "
            "nested exactly as the shape"
        )
    return numbers.read().reshape(shape)


def _requested_outputs(
    header: dict[str, Any], binary_default: bool, spec: TensorSpec
) -> tuple[RequestedOutput, ...]:
    entries = header.get("outputs")
    if entries is None:
        return (RequestedOutput(spec.output_name, binary_default),)
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise BadRequestError('"outputs" must be a list of objects')
    outputs: list[RequestedOutput] = []
    for entry in entries:
        if entry.get("name") != spec.output_name:
            raise BadRequestError(
                f"unknown output {brief(entry.get('name'))}; this model has one output {spec.output_name!r}"
            )
        if outputs:  # only one name exists: a second entry repeats it, and would repeat the answer
            raise BadRequestError(f"output {spec.output_name!r} is requested twice; ask for each output once")
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


@functools.lru_cache(maxsize=16)
def escaped_label_bytes(labels: tuple[str, ...]) -> int:
    """The longest label, JSON-escaped with its quotes (never shorter than its UTF-8 bytes)."""
    return max((len(json.dumps(label)) for label in labels), default=2)


def response_bound(request: InferRequest, spec: TensorSpec) -> int:
    """Most bytes `encode_infer_response` writes for `request`, the model's name and version aside."""
    rows = request.tensor.shape[0] if request.tensor.ndim else 1
    classes = len(spec.labels)
    total = _ENVELOPE_BYTES + len(json.dumps(request.id or ""))
    for output in request.outputs:
        total += _ENTRY_BYTES + len(json.dumps(output.name))
        if output.class_count:
            per_value = 4 + _CLASS_VALUE_BYTES + 2 + len(str(classes)) + escaped_label_bytes(spec.labels)
            total += rows * min(output.class_count, classes) * per_value
        else:
            total += rows * classes * (4 if output.binary else _FLOAT_JSON_BYTES)
    return total


def _check_response_budget(request: InferRequest, spec: TensorSpec) -> None:
    tensor = request.tensor
    if tensor.shape[1:] != spec.input_shape:
        return  # not a tensor this model takes: the predictor refuses it, saying why
    allowed = tensor.size * 4 + RESPONSE_SLACK_BYTES
    bound = response_bound(request, spec)
    if bound > allowed:
        raise InvalidInputError(
            f"the requested outputs could take {bound} bytes, more than the {allowed} this request may "
            f"get back (its tensor's {tensor.size * 4} bytes + {RESPONSE_SLACK_BYTES}); ask for binary_data "
            "output or a smaller classification"
        )


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
