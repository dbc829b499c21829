"""V2 / Triton binary-extension bodies, parsed and encoded without a server."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from service.errors import BadRequestError, InvalidInputError, ServiceError
from service.v2 import InferRequest, RequestedOutput, TensorSpec, encode_infer_response, parse_infer_request

SPEC = TensorSpec(input_name="input", input_shape=(3, 2, 2), output_name="logits")
LABELS = ("cat", "coffee", "astronaut")


def tensor(rows: int = 2) -> np.ndarray:
    return np.arange(rows * 12, dtype=np.float32).reshape(rows, 3, 2, 2) / 10


def binary_body(values: np.ndarray, **header_extra: object) -> tuple[bytes, str]:
    raw = values.astype("<f4").tobytes()
    header = {
        "inputs": [
            {
                "name": "input",
                "shape": list(values.shape),
                "datatype": "FP32",
                "parameters": {"binary_data_size": len(raw)},
            }
        ],
        **header_extra,
    }
    encoded = json.dumps(header).encode()
    return encoded + raw, str(len(encoded))


def test_json_data_nested_or_flat_parses_to_the_same_tensor() -> None:
    values = tensor()
    for data in (values.tolist(), values.ravel().tolist()):
        body = json.dumps(
            {
                "id": "r1",
                "inputs": [{"name": "input", "shape": [2, 3, 2, 2], "datatype": "FP32", "data": data}],
            }
        ).encode()
        parsed = parse_infer_request(body, None, SPEC)
        np.testing.assert_array_equal(parsed.tensor, values)
        assert parsed.id == "r1"
        assert parsed.outputs == (RequestedOutput("logits", binary=False),)


def test_binary_tensor_extension_body_parses_with_client_timeout() -> None:
    body, header_length = binary_body(tensor(), parameters={"binary_data_output": True, "timeout": 250_000})
    parsed = parse_infer_request(body, header_length, SPEC)
    np.testing.assert_array_equal(parsed.tensor, tensor())
    assert parsed.outputs == (RequestedOutput("logits", binary=True),)
    assert parsed.timeout_s == pytest.approx(0.25)


def test_raw_binary_request_is_one_image() -> None:
    parsed = parse_infer_request(tensor(1).tobytes(), "0", SPEC)
    np.testing.assert_array_equal(parsed.tensor, tensor(1))


@pytest.mark.parametrize(
    ("mutate", "error", "message"),
    [
        (lambda h: h["inputs"][0].update(name="image"), BadRequestError, "unknown input 'image'"),
        (lambda h: h["inputs"][0].update(datatype="FP64"), InvalidInputError, "must be FP32"),
        (lambda h: h["inputs"][0].update(shape=[2, 3, 2]), InvalidInputError, "must equal 4 x prod"),
        (lambda h: h.update(outputs=[{"name": "probabilities"}]), BadRequestError, "unknown output"),
        (lambda h: h.update(inputs=[]), BadRequestError, "exactly one tensor"),
        (lambda h: h.update(parameters={"timeout": -1}), BadRequestError, "timeout"),
    ],
    ids=["input-name", "datatype", "shape-vs-bytes", "output-name", "no-inputs", "timeout"],
)
def test_malformed_headers_are_refused_with_a_message(
    mutate: Callable[[dict[str, Any]], object], error: type[ServiceError], message: str
) -> None:
    body, _ = binary_body(tensor())
    header_end = body.index(b"}]}") + 3
    header = json.loads(body[:header_end])
    mutate(header)
    encoded = json.dumps(header).encode()
    with pytest.raises(error, match=message):
        parse_infer_request(encoded + body[header_end:], str(len(encoded)), SPEC)


def test_bad_header_length_and_trailing_bytes_are_refused() -> None:
    body, header_length = binary_body(tensor())
    with pytest.raises(BadRequestError, match="Inference-Header-Content-Length"):
        parse_infer_request(body, str(len(body) + 1), SPEC)
    with pytest.raises(BadRequestError, match="unused"):
        parse_infer_request(body + b"\0\0\0\0", header_length, SPEC)
    with pytest.raises(BadRequestError, match="not valid JSON"):
        parse_infer_request(b"{oops", None, SPEC)


def test_json_data_with_wrong_count_is_refused() -> None:
    body = json.dumps(
        {"inputs": [{"name": "input", "shape": [1, 3, 2, 2], "datatype": "FP32", "data": [1.0, 2.0]}]}
    ).encode()
    with pytest.raises(InvalidInputError, match="has 2 values but shape"):
        parse_infer_request(body, None, SPEC)


def request(*outputs: RequestedOutput) -> InferRequest:
    return InferRequest(id="abc", tensor=tensor(2), outputs=outputs, timeout_s=None)


LOGITS = np.array([[0.5, 2.0, -1.0], [3.0, 0.0, 1.0]], dtype=np.float32)


def test_json_response_carries_flat_data() -> None:
    body, headers = encode_infer_response(
        model_name="tiny",
        model_version="1",
        request=request(RequestedOutput("logits", False)),
        logits=LOGITS,
        labels=LABELS,
    )
    assert headers == {"Content-Type": "application/json"}
    response = json.loads(body)
    assert response["id"] == "abc" and response["model_version"] == "1"
    assert response["outputs"] == [
        {
            "name": "logits",
            "datatype": "FP32",
            "shape": [2, 3],
            "data": pytest.approx(LOGITS.ravel().tolist()),
        }
    ]


def test_binary_response_appends_raw_tensors_after_the_header() -> None:
    outputs = (RequestedOutput("logits", True), RequestedOutput("logits", True, class_count=2))
    body, headers = encode_infer_response(
        model_name="tiny", model_version="1", request=request(*outputs), logits=LOGITS, labels=LABELS
    )
    length = int(headers["Inference-Header-Content-Length"])
    header = json.loads(body[:length])
    sizes = [o["parameters"]["binary_data_size"] for o in header["outputs"]]
    raw = body[length:]
    assert len(raw) == sum(sizes)
    np.testing.assert_array_equal(np.frombuffer(raw[: sizes[0]], "<f4").reshape(2, 3), LOGITS)
    strings, offset = [], sizes[0]
    while offset < len(raw):
        (size,) = struct.unpack_from("<I", raw, offset)
        strings.append(raw[offset + 4 : offset + 4 + size].decode())
        offset += 4 + size
    assert strings == ["2.000000:1:coffee", "0.500000:0:cat", "3.000000:0:cat", "1.000000:2:astronaut"]
