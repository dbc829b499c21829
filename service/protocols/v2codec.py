"""KServe Open Inference Protocol (V2) requests and answers, for every transport.

The pieces every transport calls (`check_input`, `input_tensor`, `split_bytes_elements`,
`image_elements`, `requested_output`, `client_timeout_s`, `finish_request`, `output_tensors`) decide
what a request may ask and what its answer holds; REST (`parse_infer_request`,
`encode_infer_response`, below) and gRPC (`service.protocols.v2grpc`) only move bytes in and out.
A model takes either its own tensor input (FP32; UINT8 pixels for a model exported with uint8 input,
which normalizes them in its graph) or `IMAGE_INPUT`, encoded image files as BYTES (Triton's
serialization: a 4-byte little-endian length before each element; base64 strings in JSON), which the
predictor admits by count, then decodes and preprocesses exactly as `/predict` does.

A REST body is a JSON header optionally followed by raw little-endian tensors; the header's length comes
in `Inference-Header-Content-Length` (0 = the whole body is the single input, batch 1). Inputs with
`parameters.binary_data_size` take their bytes from after the header, in order. Outputs are binary
when asked (`binary_data` per output, `binary_data_output` per request), else JSON `data`. The class
scores output may ask for Triton's `classification: k` (BYTES tensor of "value:index:label" strings,
top k). A model with an embedding has a second output, `embedding` (FP32 [N, D], unit-length rows),
answered only when a request names it in `outputs`: without `outputs` a request gets the class scores
alone. The V2 protocol says "all outputs" then, but this keeps every existing client's answer (and
its size) exactly as it was, and the embedding is listed in the model's metadata for clients that
want it. Pure functions: no HTTP, no model.

Request cost model (B body bytes after decoding, at most CONVSERVE_MAX_UPLOAD_BYTES):
- Binary data is a view of the body (0 copies). JSON `data` is read by `service.transport.tensorjson` only
  after the declared `shape` passed two checks: at most CONVSERVE_MAX_QUEUE_SIZE rows' worth of
  values (`TensorSpec.max_rows` x the model's row; 413 beyond), and `data` holds exactly that many
  (counted from its separators and brackets; flat, or nested exactly as `shape`; 422 otherwise).
  Then it is parsed straight into float32: peak B + the tensor + a few MiB, time linear in B (for a
  UINT8 input, then checked to be whole numbers in 0..255 and narrowed to uint8).
- The rest of the header is at most 64 KiB of JSON (`service.transport.jsonparse`), so `outputs` or
  `parameters` cannot be blown up into millions of objects; `id` is at most `MAX_ID_CHARS`.

Response budget: each output name at most once (400 for a repeat) and a classification of at most
the class count K, so for R rows the answer is at most `response_bound(...)` = 256 + the escaped id +
per output 192 + R x W x (4 binary | 24 JSON) bytes (W: the output's width, K classes or D embedding
values), or R x min(k, K) x (56 + digits of K + the longest escaped label) for a classification, plus
the model's name and version. A request is refused (422, before inference) if that exceeds the tensor
bytes it makes the server compute (R x C x H x W x the input's item size: 4 for FP32, 1 for UINT8; an
image being one row) +
`RESPONSE_SLACK_BYTES`, so no request makes the server write much more than it sent; for models
with thousands of classes and tiny inputs that means asking for binary output or fewer classes.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import math
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np

from modelcontract import EMBEDDING_NAME
from service.errors import BadRequestError, InvalidInputError, PayloadTooLargeError
from service.inference.predictor import Inputs, ModelOutputs, NamedImage, uint8_pixels
from service.textsafety import brief
from service.transport.jsonparse import BoundedJson, loads_bounded
from service.transport.tensorjson import nested_numbers

HEADER_LENGTH = "Inference-Header-Content-Length"
IMAGE_INPUT = "image"
"""The BYTES input every model takes beside its own FP32 one: encoded image files, one per element,
decoded and preprocessed by the server exactly as `/predict` does."""
InputKind = Literal["tensor", "image"]
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
FLOAT_JSON_BYTES = 24
"""Most bytes JSON writes for one float32 value (as a double: "-1.1754943508222875e-38") and its comma."""
_CLASS_VALUE_BYTES = 48  # f"{value:f}" of a float32: up to 39 digits, a sign, a point and 6 decimals


V2_DATATYPES = {"float32": "FP32", "uint8": "UINT8"}
"""The V2 datatype of a model's own input, by its metadata's `input_dtype`."""
_NUMPY_TYPES: dict[str, np.dtype[Any]] = {"FP32": np.dtype("<f4"), "UINT8": np.dtype("u1")}


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
    """One V2 inference request, whichever transport brought it: what to compute and what to answer."""

    id: str | None
    inputs: Inputs
    """A float32 tensor (the model's own input) or encoded images (the `image` input), and the client's
    own deadline (Triton's `timeout` parameter, sent in microseconds), if any."""
    outputs: tuple[RequestedOutput, ...]

    @property
    def rows(self) -> int:
        tensor = self.inputs.tensor
        if tensor is None:
            return len(self.inputs.images)
        return tensor.shape[0] if tensor.ndim else 1


@dataclass(frozen=True)
class TensorSpec:
    """What the served model takes and returns."""

    input_name: str
    input_shape: tuple[int, int, int]
    output_name: str
    labels: tuple[str, ...]
    """One per class, in output order."""
    max_rows: int
    """Most rows (tensor rows or images) one request may carry (CONVSERVE_MAX_QUEUE_SIZE)."""
    extra_outputs: tuple[tuple[str, int], ...] = ()
    """The FP32 outputs [N, width] a request may ask for by name besides the class scores, as
    (name, width): the embedding, when the model has one."""
    input_datatype: str = "FP32"
    """The V2 datatype of the model's own input: FP32, or UINT8 for a model that normalizes in its graph."""

    @property
    def row_values(self) -> int:
        return math.prod(self.input_shape)

    @property
    def input_dtype(self) -> np.dtype[Any]:
        """The numpy dtype (little-endian) the model's own input is read as."""
        return _NUMPY_TYPES[self.input_datatype]

    def output_width(self, name: str) -> int:
        """Values per row of output `name`: the class count for the class scores."""
        return dict(self.extra_outputs).get(name, len(self.labels))

    @property
    def output_names(self) -> list[str]:
        return [self.output_name, *(name for name, _ in self.extra_outputs)]


@dataclass(frozen=True)
class OutputTensor:
    """One output of an answer, ready for any transport: `raw` is what binary data and gRPC's
    `raw_output_contents` carry (little-endian FP32, or length-prefixed BYTES), `data` the JSON values."""

    name: str
    datatype: str
    shape: list[int]
    raw: bytes
    data: list[Any]


# ---- the pieces every transport calls, in request order -------------------------------------------


def check_input(name: Any, datatype: Any, shape: Any, spec: TensorSpec) -> InputKind:
    """Which input `name` is, once its datatype and declared shape are acceptable; before any data is read.

    The model's own input takes FP32 [N, C, H, W]; `IMAGE_INPUT` takes BYTES [N] (or [N, 1]): one encoded
    image per element, at most `spec.max_rows` of them (413 beyond).
    """
    if name == spec.input_name:
        kind: InputKind = "tensor"
    elif name == IMAGE_INPUT:
        kind = "image"
    else:
        raise BadRequestError(
            f"unknown input {brief(name)}; this model takes {spec.input_name!r} ({spec.input_datatype} "
            f"{_tensor_shape_text(spec)}) or {IMAGE_INPUT!r} (BYTES [N], one encoded image per element)"
        )
    expected = spec.input_datatype if kind == "tensor" else "BYTES"
    if datatype != expected:
        what = _tensor_shape_text(spec) if kind == "tensor" else "[N], one encoded image per element"
        raise InvalidInputError(f"input {name!r} must be {expected} {what}, got datatype {brief(datatype)}")
    if not (
        isinstance(shape, list | tuple) and len(shape) <= 8 and all(_is_whole(d) and d >= 0 for d in shape)
    ):
        raise BadRequestError(
            f'"shape" of {name!r} must be a list of non-negative integers, got {brief(shape)}'
        )
    if kind == "image":
        dims = [int(d) for d in shape]
        if not (len(dims) == 1 or (len(dims) == 2 and dims[1] == 1)) or dims[0] < 1:
            raise InvalidInputError(
                f"input {IMAGE_INPUT!r} must have shape [N] or [N, 1] with N >= 1 images, got {dims}"
            )
        if dims[0] > spec.max_rows:
            raise PayloadTooLargeError(
                f"{dims[0]} images in one request; at most {spec.max_rows} are accepted "
                "(CONVSERVE_MAX_QUEUE_SIZE); split the request"
            )
    return kind


def input_tensor(raw: bytes | memoryview, shape: Sequence[int], spec: TensorSpec) -> np.ndarray:
    """The tensor in `raw` (exactly prod(shape) values of the model's input datatype: little-endian
    FP32, or UINT8 bytes), without a copy."""
    count, size = math.prod(shape), spec.input_dtype.itemsize
    if len(raw) != count * size:
        raise InvalidInputError(
            f"input {spec.input_name!r} of shape {list(shape)} needs {size} x {count} = {count * size} bytes "
            f"of {spec.input_datatype} data, got {len(raw)}"
        )
    return np.frombuffer(raw, dtype=spec.input_dtype).reshape(tuple(shape))


def split_bytes_elements(raw: bytes | memoryview, count: int) -> list[memoryview]:
    """The `count` elements of a BYTES tensor: each a 4-byte little-endian length, then the bytes."""
    view, elements, offset = memoryview(raw), [], 0
    for index in range(count):
        if offset + 4 > len(view):
            raise InvalidInputError(
                f"the BYTES data of {IMAGE_INPUT!r} ends after {index} of its {count} elements; each element "
                "is a 4-byte little-endian length followed by that many bytes"
            )
        (length,) = struct.unpack_from("<I", view, offset)
        offset += 4
        if length > len(view) - offset:
            raise InvalidInputError(
                f"element {index} of {IMAGE_INPUT!r} declares {length} bytes but only "
                f"{len(view) - offset} follow"
            )
        elements.append(view[offset : offset + length])
        offset += length
    if offset != len(view):
        raise InvalidInputError(
            f"{len(view) - offset} bytes follow the {count} elements of {IMAGE_INPUT!r}; the shape says "
            f"{count}"
        )
    return elements


def image_elements(elements: Sequence[bytes | memoryview], shape: Sequence[int]) -> tuple[NamedImage, ...]:
    """One `NamedImage` per element of the `image` input, named by position for error messages."""
    count = math.prod(shape)
    if len(elements) != count:
        raise InvalidInputError(f"input {IMAGE_INPUT!r} has {len(elements)} elements but shape {list(shape)}")
    images = []
    for index, element in enumerate(elements):
        if not len(element):
            raise InvalidInputError(
                f"element {index} of {IMAGE_INPUT!r} is empty; send the encoded image file"
            )
        images.append(NamedImage(f"{IMAGE_INPUT}[{index}]", bytes(element)))
    return tuple(images)


def requested_output(
    name: Any,
    parameters: Mapping[str, Any],
    binary_default: bool,
    spec: TensorSpec,
    earlier: Sequence[RequestedOutput],
) -> RequestedOutput:
    """One entry of the request's `outputs`: one of the model's outputs, at most once; the class scores
    optionally classified."""
    names = spec.output_names
    if name not in names:
        hint = ""
        if name == EMBEDDING_NAME:
            hint = "; models exported by `python -m training export` have an embedding: re-export this one"
        raise BadRequestError(f"unknown output {brief(name)}; this model has outputs {names}{hint}")
    if any(output.name == name for output in earlier):  # a repeat would repeat the answer
        raise BadRequestError(f"output {name!r} is requested twice; ask for each output once")
    class_count = parameters.get("classification", 0)
    if not _is_whole(class_count) or class_count < 0:
        raise BadRequestError(f"classification must be a non-negative integer, got {brief(class_count)}")
    if class_count and name != spec.output_name:
        raise BadRequestError(
            f"classification ranks classes, so it applies to {spec.output_name!r} only, not to {name!r}"
        )
    binary = _flag(parameters, "binary_data", binary_default)
    return RequestedOutput(name, binary, int(min(class_count, 2**31)))


def client_timeout_s(timeout: Any) -> float | None:
    """Triton's `timeout` parameter (microseconds) in seconds; None when absent."""
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


def check_request_id(request_id: Any) -> str | None:
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequestError(f'"id" must be a string, got {brief(request_id)}')
    if request_id is not None and len(request_id) > MAX_ID_CHARS:
        raise BadRequestError(
            f'"id" has {len(request_id)} characters; it is echoed in the response, so send at most '
            f"{MAX_ID_CHARS}"
        )
    return request_id


def finish_request(
    request_id: str | None,
    inputs: Inputs,
    outputs: Sequence[RequestedOutput],
    binary_default: bool,
    spec: TensorSpec,
) -> InferRequest:
    """The request, its outputs defaulted to the class scores; refused if its answer could be much
    larger than what it makes the server compute (see the module docstring). Its inputs name the
    outputs the model must fetch besides the class scores."""
    chosen = tuple(outputs) or (RequestedOutput(spec.output_name, binary_default),)
    extra = frozenset(output.name for output in chosen if output.name != spec.output_name)
    request = InferRequest(id=request_id, inputs=replace(inputs, outputs=extra), outputs=chosen)
    _check_response_budget(request, spec)
    return request


# ---- REST: a JSON header, optionally followed by binary data --------------------------------------


def parse_infer_request(body: bytes, header_length: str | None, spec: TensorSpec) -> InferRequest:
    """Parse a V2 infer body; a `ServiceError` (400, 413, 422) says what is wrong."""
    if header_length is not None and header_length.strip() == "0":
        return _raw_request(body, spec)
    document, binary = _split(body, header_length)
    header = document.value
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise BadRequestError(
            f'"inputs" must list exactly one tensor, {spec.input_name!r} ({spec.input_datatype}) or '
            f"{IMAGE_INPUT!r} (BYTES)"
        )
    entry = inputs[0]
    # Every cheap check before the tensor is read: a request that would be refused anyway (a repeated
    # output, a long id, a bad parameter) never pays for parsing its data.
    parameters = _parameters(header, "the request")
    request_id = check_request_id(header.get("id"))
    binary_default = _flag(parameters, "binary_data_output")
    outputs = _requested_outputs(header, binary_default, spec)
    timeout_s = client_timeout_s(parameters.get("timeout"))
    kind = check_input(entry.get("name"), entry.get("datatype"), entry.get("shape"), spec)
    shape = [int(d) for d in entry["shape"]]
    data, used = _input_data(entry, kind, shape, binary, spec)
    if used != len(binary):
        raise BadRequestError(f"{len(binary) - used} bytes of binary data follow the tensors unused")
    if kind == "tensor":
        model_inputs = Inputs(tensor=data, timeout_s=timeout_s)
    else:
        model_inputs = Inputs(images=data, timeout_s=timeout_s)
    document.check_all_read(entry.get("data"))
    return finish_request(request_id, model_inputs, outputs, binary_default, spec)


def _raw_request(body: bytes, spec: TensorSpec) -> InferRequest:
    shape = (1, *spec.input_shape)
    size = math.prod(shape) * spec.input_dtype.itemsize
    if len(body) != size:
        raise InvalidInputError(
            f"a raw binary request (header length 0) must be one {spec.input_datatype} tensor {list(shape)}, "
            f"{size} bytes; got {len(body)} bytes"
        )
    tensor = np.frombuffer(body, dtype=spec.input_dtype).reshape(shape)
    return InferRequest(None, Inputs(tensor=tensor), (RequestedOutput(spec.output_name, binary=True),))


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


def _input_data(
    entry: dict[str, Any], kind: InputKind, shape: list[int], binary: memoryview, spec: TensorSpec
) -> tuple[Any, int]:
    """The input's tensor or images, and the number of binary bytes it used."""
    name = entry["name"]
    size = _parameters(entry, f"input {name!r}").get("binary_data_size")
    if size is not None:
        if not _is_whole(size) or not 0 <= size <= len(binary):
            raise InvalidInputError(
                f"binary_data_size {brief(size)} of {name!r} must be a byte count, and that many bytes must "
                f"follow the header ({len(binary)} do)"
            )
        raw = binary[: int(size)]
        if kind == "tensor":
            return input_tensor(raw, shape, spec), int(size)
        return image_elements(split_bytes_elements(raw, math.prod(shape)), shape), int(size)
    if "data" not in entry:
        raise BadRequestError(f'input {name!r} has neither "data" nor parameters.binary_data_size')
    if kind == "tensor":
        return _json_data(entry["data"], shape, spec), 0
    return image_elements(_base64_elements(entry["data"], shape), shape), 0


def _base64_elements(data: Any, shape: list[int]) -> list[bytes]:
    """JSON `data` of the image input: base64 strings (JSON cannot carry raw bytes), flat or nested [N, 1].

    They count against the 64 KiB JSON header, so only small images fit; larger ones go as binary data.
    """
    flat = data
    nested = len(shape) == 2 and isinstance(data, list)
    if nested and all(isinstance(row, list) and len(row) == 1 for row in data):
        flat = [row[0] for row in data]
    if not isinstance(flat, list) or not all(isinstance(item, str) for item in flat):
        raise InvalidInputError(
            f'"data" of {IMAGE_INPUT!r} must be a list of base64 strings, one per image; or send the files '
            "as binary data (parameters.binary_data_size)"
        )
    try:
        return [base64.b64decode(item, validate=True) for item in flat]
    except (binascii.Error, ValueError):
        raise InvalidInputError(
            f'"data" of {IMAGE_INPUT!r} holds a string that is not base64; encode each image file with base64'
        ) from None


def _json_data(data: Any, shape: list[int], spec: TensorSpec) -> np.ndarray:
    """JSON `data` as the model's input dtype of `shape`: the declared size is checked against the budget,
    then against the values' count, before any value is parsed (as float32, then narrowed for UINT8)."""
    count, row = math.prod(shape), spec.row_values
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
    values = numbers.read().reshape(shape)
    return uint8_pixels(values, what) if spec.input_datatype == "UINT8" else values


def _requested_outputs(
    header: dict[str, Any], binary_default: bool, spec: TensorSpec
) -> tuple[RequestedOutput, ...]:
    entries = header.get("outputs")
    if entries is None:
        return ()
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise BadRequestError('"outputs" must be a list of objects')
    outputs: list[RequestedOutput] = []
    for entry in entries:
        parameters = _parameters(entry, f"output {brief(entry.get('name'))}")
        outputs.append(requested_output(entry.get("name"), parameters, binary_default, spec, outputs))
    return tuple(outputs)


def _flag(parameters: Mapping[str, Any], name: str, default: bool = False) -> bool:
    value = parameters.get(name, default)
    if not isinstance(value, bool):
        raise BadRequestError(f"the {name} parameter must be true or false, got {brief(value)}")
    return value


def _tensor_shape_text(spec: TensorSpec) -> str:
    return f"[N, {', '.join(map(str, spec.input_shape))}]"


@functools.lru_cache(maxsize=16)
def escaped_label_bytes(labels: tuple[str, ...]) -> int:
    """The longest label, JSON-escaped with its quotes (never shorter than its UTF-8 bytes)."""
    return max((len(json.dumps(label)) for label in labels), default=2)


def response_bound(request: InferRequest, spec: TensorSpec) -> int:
    """Most bytes `encode_infer_response` writes for `request`, the model's name and version aside."""
    rows = request.rows
    classes = len(spec.labels)
    total = _ENVELOPE_BYTES + len(json.dumps(request.id or ""))
    for output in request.outputs:
        total += _ENTRY_BYTES + len(json.dumps(output.name))
        if output.class_count:
            per_value = 4 + _CLASS_VALUE_BYTES + 2 + len(str(classes)) + escaped_label_bytes(spec.labels)
            total += rows * min(output.class_count, classes) * per_value
        else:
            total += rows * spec.output_width(output.name) * (4 if output.binary else FLOAT_JSON_BYTES)
    return total


def _check_response_budget(request: InferRequest, spec: TensorSpec) -> None:
    tensor = request.inputs.tensor
    if tensor is not None and tensor.shape[1:] != spec.input_shape:
        return  # not a tensor this model takes: the predictor refuses it, saying why
    check_answer_bound(
        response_bound(request, spec),
        request.rows,  # an image becomes one row of the model's tensor
        spec.row_values,
        asked="the requested outputs",
        fix="ask for binary_data output or a smaller classification",
        item_size=spec.input_dtype.itemsize,
    )


def check_answer_bound(
    bound: int, rows: int, row_values: int, *, asked: str, fix: str, item_size: int = 4
) -> None:
    """422 (before inference) when an answer of up to `bound` bytes would pass what its request may get
    back: the tensor bytes it makes the server compute (`rows` x `row_values` values of `item_size`
    bytes: 4 for float32, 1 for a uint8 input) + `RESPONSE_SLACK_BYTES`. Every route that answers per
    row applies this one rule."""
    computed = rows * row_values * item_size
    if bound > computed + RESPONSE_SLACK_BYTES:
        raise InvalidInputError(
            f"{asked} could take {bound} bytes, more than the request's {computed} tensor bytes + "
            f"{RESPONSE_SLACK_BYTES}; {fix}"
        )


def classification_strings(logits: np.ndarray, class_count: int, labels: tuple[str, ...]) -> list[list[str]]:
    """Triton's classification output: top `class_count` per row as "value:index:label" (value = logit)."""
    count = min(class_count, logits.shape[1])
    order = np.argsort(-logits, axis=1, kind="stable")[:, :count]
    return [
        [f"{row[i]:f}:{i}:{labels[i]}" for i in indices] for row, indices in zip(logits, order, strict=True)
    ]


def serialize_bytes(elements: Sequence[bytes]) -> bytes:
    """A BYTES tensor's raw form: each element as a 4-byte little-endian length, then its bytes."""
    parts = []
    for value in elements:
        parts += [struct.pack("<I", len(value)), value]
    return b"".join(parts)


def output_tensors(
    request: InferRequest, outputs: ModelOutputs, labels: tuple[str, ...]
) -> list[OutputTensor]:
    """The outputs `request` asked for, from what the model computed: the class scores (or their
    classification) and the named outputs by name."""
    tensors = []
    for output in request.outputs:
        if output.class_count:
            strings = classification_strings(outputs.logits, output.class_count, labels)
            flat = [s for row in strings for s in row]
            shape = [len(strings), len(strings[0])]
            tensors.append(
                OutputTensor(output.name, "BYTES", shape, serialize_bytes([s.encode() for s in flat]), flat)
            )
        else:
            rows = outputs.extra[output.name] if output.name in request.inputs.outputs else outputs.logits
            values = np.ascontiguousarray(rows, dtype="<f4")
            data = values.ravel().tolist()
            tensors.append(OutputTensor(output.name, "FP32", list(values.shape), values.tobytes(), data))
    return tensors


def encode_infer_response(
    *, model_name: str, model_version: str, request: InferRequest, outputs: Sequence[OutputTensor]
) -> tuple[bytes, dict[str, str]]:
    """The REST response body and the headers it needs (header length when binary parts follow)."""
    entries, blobs = [], []
    for output, tensor in zip(request.outputs, outputs, strict=True):
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}
        if output.binary:
            entry["parameters"] = {"binary_data_size": len(tensor.raw)}
            blobs.append(tensor.raw)
        else:
            entry["data"] = tensor.data
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
