"""V2 / Triton binary-extension bodies, parsed and encoded without a server."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from service.errors import BadRequestError, InvalidInputError, PayloadTooLargeError, ServiceError
from service.inference.predictor import Inputs, ModelOutputs
from service.protocols.v2codec import (
    InferRequest,
    RequestedOutput,
    TensorSpec,
    encode_infer_response,
    output_tensors,
    parse_infer_request,
    response_bound,
)

LABELS = ("cat", "coffee", "astronaut")
SPEC = TensorSpec(input_name="input", input_shape=(3, 2, 2), output_name="logits", labels=LABELS, max_rows=8)


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
        np.testing.assert_array_equal(parsed.inputs.tensor, values)
        assert parsed.id == "r1"
        assert parsed.outputs == (RequestedOutput("logits", binary=False),)


def test_binary_tensor_extension_body_parses_with_client_timeout() -> None:
    body, header_length = binary_body(tensor(), parameters={"binary_data_output": True, "timeout": 250_000})
    parsed = parse_infer_request(body, header_length, SPEC)
    np.testing.assert_array_equal(parsed.inputs.tensor, tensor())
    assert parsed.outputs == (RequestedOutput("logits", binary=True),)
    assert parsed.inputs.timeout_s == pytest.approx(0.25)


def test_raw_binary_request_is_one_image() -> None:
    parsed = parse_infer_request(tensor(1).tobytes(), "0", SPEC)
    np.testing.assert_array_equal(parsed.inputs.tensor, tensor(1))


@pytest.mark.parametrize(
    ("mutate", "error", "message"),
    [
        (lambda h: h["inputs"][0].update(name="pixels"), BadRequestError, "unknown input 'pixels'"),
        (lambda h: h["inputs"][0].update(name="image"), InvalidInputError, "'image' must be BYTES"),
        (lambda h: h["inputs"][0].update(datatype="FP64"), InvalidInputError, "must be FP32"),
        (lambda h: h["inputs"][0].update(shape=[2, 3, 2]), InvalidInputError, "needs 4 x 12 = 48 bytes"),
        (lambda h: h.update(outputs=[{"name": "probabilities"}]), BadRequestError, "unknown output"),
        (lambda h: h.update(inputs=[]), BadRequestError, "exactly one tensor"),
        (lambda h: h.update(parameters={"timeout": -1}), BadRequestError, "timeout"),
    ],
    ids=["input-name", "image-as-fp32", "datatype", "shape-vs-bytes", "output-name", "no-inputs", "timeout"],
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
    return InferRequest(id="abc", inputs=Inputs(tensor=tensor(2)), outputs=outputs)


LOGITS = np.array([[0.5, 2.0, -1.0], [3.0, 0.0, 1.0]], dtype=np.float32)


def test_json_response_carries_flat_data() -> None:
    body, headers = encode_infer_response(
        model_name="tiny",
        model_version="1",
        request=(parsed := request(RequestedOutput("logits", False))),
        outputs=output_tensors(parsed, ModelOutputs(LOGITS), LABELS),
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
        model_name="tiny",
        model_version="1",
        request=(parsed := request(*outputs)),
        outputs=output_tensors(parsed, ModelOutputs(LOGITS), LABELS),
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


def json_body(data: Any, shape: list[int], **extra: Any) -> bytes:
    entry = {"name": "input", "shape": shape, "datatype": "FP32", "data": data}
    return json.dumps({"inputs": [entry], **extra}).encode()


def test_large_json_data_parses_flat_or_nested_as_its_shape() -> None:
    values = tensor(8)  # 96 values: over the 4 KiB a numeric array needs to be read without json.loads
    values = values + np.float32(1e-7) * np.arange(values.size, dtype=np.float32).reshape(values.shape)

    def body(data: Any) -> bytes:  # padded with whitespace, as JSON allows, past 4 KiB
        padded = json_body(data, [8, 3, 2, 2]).replace(b", ", b",\n" + b" " * 50)
        assert len(padded) > 4096
        return padded

    for data in (values.tolist(), values.ravel().tolist()):
        np.testing.assert_array_equal(parse_infer_request(body(data), None, SPEC).inputs.tensor, values)
    with pytest.raises(InvalidInputError, match=r"nested as \[8, 12\], not as its shape \[8, 3, 2, 2\]"):
        parse_infer_request(body(values.reshape(8, 12).tolist()), None, SPEC)


def test_json_data_over_the_row_budget_is_refused_before_it_is_read() -> None:
    body = json_body(None, [SPEC.max_rows + 1, 3, 2, 2]).replace(b"null", b"[" + b"0," * 10**6 + b"0]")
    with pytest.raises(PayloadTooLargeError, match="CONVSERVE_MAX_QUEUE_SIZE"):
        parse_infer_request(body, None, SPEC)


def test_repeated_outputs_and_long_ids_are_refused() -> None:
    body = json_body(tensor(1).tolist(), [1, 3, 2, 2], outputs=[{"name": "logits"}, {"name": "logits"}])
    with pytest.raises(BadRequestError, match="requested twice"):
        parse_infer_request(body, None, SPEC)
    with pytest.raises(BadRequestError, match="at most 1024"):
        parse_infer_request(json_body(tensor(1).tolist(), [1, 3, 2, 2], id="x" * 1025), None, SPEC)


def test_numeric_arrays_in_unread_fields_are_refused() -> None:
    body = json_body(tensor(1).tolist(), [1, 3, 2, 2], parameters={"extra": [0.5] * 2000})
    with pytest.raises(BadRequestError, match="does not read"):
        parse_infer_request(body, None, SPEC)


EXTREME_LOGITS = np.array(
    [[3.4028235e38, -3.4028235e38, np.nan], [np.inf, -1.1754943e-38, 1e-45]], np.float32
)


@pytest.mark.parametrize("request_id", [None, "", "\x00" * 1024, "\U0001f600" * 1024])
def test_response_bound_covers_every_encoding_of_extreme_logits(request_id: str | None) -> None:
    options = [
        RequestedOutput("logits", binary, class_count)
        for binary in (False, True)
        for class_count in (0, 1, 3, 2**31)
    ]
    for output in options:
        parsed = InferRequest(id=request_id, inputs=Inputs(tensor=tensor(2)), outputs=(output,))
        body, _ = encode_infer_response(
            model_name="tiny",
            model_version="1",
            request=parsed,
            outputs=output_tensors(parsed, ModelOutputs(EXTREME_LOGITS), LABELS),
        )
        assert len(body) <= response_bound(parsed, SPEC) + len("tiny1"), output


def test_outputs_larger_than_the_request_are_refused_unless_made_smaller() -> None:
    many = TensorSpec(
        "input", (1, 1, 1), "logits", labels=tuple(f"class {i}" for i in range(5000)), max_rows=8
    )
    body = json_body(
        [[[[0.5]]]], [1, 1, 1, 1], outputs=[{"name": "logits", "parameters": {"classification": 5000}}]
    )
    with pytest.raises(InvalidInputError, match="ask for binary_data output or a smaller classification"):
        parse_infer_request(body, None, many)
    small = json_body(
        [[[[0.5]]]], [1, 1, 1, 1], outputs=[{"name": "logits", "parameters": {"classification": 5}}]
    )
    assert parse_infer_request(small, None, many).outputs[0].class_count == 5
    binary = json_body([[[[0.5]]]], [1, 1, 1, 1], parameters={"binary_data_output": True})
    assert parse_infer_request(binary, None, many).outputs[0].binary
