"""Encoded images over V2 REST: the `image` BYTES input, decoded and preprocessed as `/predict` does."""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from service.errors import BadRequestError, InvalidInputError, PayloadTooLargeError
from service.protocols.v2codec import (
    IMAGE_INPUT,
    TensorSpec,
    check_input,
    image_elements,
    serialize_bytes,
    split_bytes_elements,
)
from tests.liveserver import LiveServer, live_server
from tests.photos import encode, jpeg, photo
from tests.tinymodel import MODEL_NAME, tiny_settings

SPEC = TensorSpec("input", (3, 2, 2), "logits", ("a", "b", "c"), max_rows=4)
PHOTOS = ("chelsea", "coffee", "astronaut")


@pytest.fixture(scope="module")
def server(model_repository: Path) -> Iterator[LiveServer]:
    with live_server(tiny_settings(model_repository, max_batch_size=4, max_queue_size=8)) as live:
        yield live


def files() -> list[bytes]:
    return [jpeg("chelsea"), encode(photo("coffee"), "PNG"), jpeg("astronaut", quality=60)]


def image_input(payloads: list[bytes], binary: bool = True) -> triton.InferInput:
    infer_input = triton.InferInput(IMAGE_INPUT, [len(payloads)], "BYTES")
    infer_input.set_data_from_numpy(np.array(payloads, dtype=np.object_), binary_data=binary)
    return infer_input


def predict_scores(server: LiveServer, payloads: list[bytes]) -> list[list[dict[str, object]]]:
    uploads = [("file", (f"{i}.img", data, "application/octet-stream")) for i, data in enumerate(payloads)]
    response = httpx.post(f"{server.url}/predict?top_k=3", files=uploads)
    assert response.status_code == 200, response.text
    return response.json()["predictions"]


# ---- the codec ---------------------------------------------------------------------------------------


def test_bytes_elements_round_trip_and_keep_their_order() -> None:
    elements = [b"first", b"", b"\x00\xff" * 3]
    assert [bytes(e) for e in split_bytes_elements(serialize_bytes(elements), 3)] == elements


@pytest.mark.parametrize(
    ("raw", "count", "message"),
    [
        (b"\x05\x00\x00\x00abc", 1, "declares 5 bytes but only 3 follow"),
        (b"\x01\x00\x00\x00a", 2, "ends after 1 of its 2 elements"),
        (b"\x01\x00\x00\x00ab", 1, "1 bytes follow the 1 elements"),
        (b"\x01\x00", 1, "ends after 0 of its 1 elements"),
        (struct.pack("<I", 2**32 - 1) + b"x", 1, "declares 4294967295 bytes"),
    ],
)
def test_malformed_bytes_tensors_are_refused_with_a_message(raw: bytes, count: int, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        split_bytes_elements(raw, count)


def test_image_input_shape_datatype_and_count_are_checked_before_any_data() -> None:
    assert check_input(IMAGE_INPUT, "BYTES", [2], SPEC) == "image"
    assert check_input(IMAGE_INPUT, "BYTES", [2, 1], SPEC) == "image"
    assert check_input("input", "FP32", [1, 3, 2, 2], SPEC) == "tensor"
    with pytest.raises(InvalidInputError, match="must be BYTES"):
        check_input(IMAGE_INPUT, "FP32", [2], SPEC)
    with pytest.raises(InvalidInputError, match=r"shape \[N\] or \[N, 1\]"):
        check_input(IMAGE_INPUT, "BYTES", [2, 3, 4], SPEC)
    with pytest.raises(InvalidInputError, match="N >= 1"):
        check_input(IMAGE_INPUT, "BYTES", [0], SPEC)
    with pytest.raises(PayloadTooLargeError, match="at most 4"):
        check_input(IMAGE_INPUT, "BYTES", [5], SPEC)
    with pytest.raises(BadRequestError, match="unknown input"):
        check_input("pixels", "BYTES", [1], SPEC)


def test_image_elements_are_named_by_position_and_never_empty() -> None:
    images = image_elements([b"one", memoryview(b"two")], [2])
    assert [(i.name, i.data) for i in images] == [("image[0]", b"one"), ("image[1]", b"two")]
    with pytest.raises(InvalidInputError, match="element 1 of 'image' is empty"):
        image_elements([b"one", b""], [2])
    with pytest.raises(InvalidInputError, match="has 1 elements but shape"):
        image_elements([b"one"], [2])


# ---- a real server, a real client ----------------------------------------------------------------------


def test_tritonclient_sends_jpeg_and_png_bytes_and_gets_predicts_ranking(
    server: LiveServer, triton_client: Callable[[LiveServer], triton.InferenceServerClient]
) -> None:
    payloads = files()
    expected = predict_scores(server, payloads)
    client = triton_client(server)
    metadata = client.get_model_metadata(MODEL_NAME)
    assert {"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [-1]} in metadata["inputs"]

    logits = client.infer(MODEL_NAME, [image_input(payloads)]).as_numpy("logits")
    assert logits.shape == (3, 3)
    assert list(logits.argmax(axis=1)) == [ranked[0]["index"] for ranked in expected]

    outputs = [triton.InferRequestedOutput("logits", binary_data=True, class_count=2)]
    classified = client.infer(MODEL_NAME, [image_input(payloads)], outputs=outputs).as_numpy("logits")
    assert classified.shape == (3, 2)
    for row, ranked in zip(classified, expected, strict=True):
        indices = [int(entry.decode().split(":")[1]) for entry in row]
        assert indices == [item["index"] for item in ranked[:2]]


def test_base64_strings_in_json_are_the_same_images(
    server: LiveServer, triton_client: Callable[[LiveServer], triton.InferenceServerClient]
) -> None:
    small = [jpeg("chelsea", quality=20), jpeg("coffee", quality=20)]
    client = triton_client(server)
    binary = client.infer(MODEL_NAME, [image_input(small)]).as_numpy("logits")
    encoded = [base64.b64encode(data) for data in small]
    as_json = client.infer(MODEL_NAME, [image_input(encoded, binary=False)]).as_numpy("logits")
    np.testing.assert_allclose(as_json, binary, atol=1e-6)

    body = {"inputs": [{"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [1], "data": ["not base64!"]}]}
    response = httpx.post(f"{server.url}/v2/models/{MODEL_NAME}/infer", json=body)
    assert response.status_code == 422 and "not base64" in response.json()["error"]


@pytest.mark.parametrize(
    ("payloads", "shape", "status", "message"),
    [
        ([b"this is not an image"], [1], 422, "image[0]"),
        ([jpeg("coffee")[:300]], [1], 422, "image[0]"),
        ([jpeg("coffee")] * 9, [9], 413, "at most 8"),
        ([jpeg("coffee")], [2], 422, "ends after 1 of its 2 elements"),
    ],
    ids=["not-an-image", "truncated-jpeg", "too-many", "count-vs-shape"],
)
def test_bad_images_get_the_predict_routes_4xx_and_the_server_stays_ready(
    server: LiveServer, payloads: list[bytes], shape: list[int], status: int, message: str
) -> None:
    raw = serialize_bytes(payloads)
    parameters = {"binary_data_size": len(raw)}
    entry = {"name": "image", "datatype": "BYTES", "shape": shape, "parameters": parameters}
    header = json.dumps({"inputs": [entry]}).encode()
    response = httpx.post(
        f"{server.url}/v2/models/{MODEL_NAME}/infer",
        content=header + raw,
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200


def test_image_input_sent_as_fp32_is_refused_by_tritonclient_with_the_servers_message(
    server: LiveServer, triton_client: Callable[[LiveServer], triton.InferenceServerClient]
) -> None:
    wrong = triton.InferInput(IMAGE_INPUT, [1, 3, 32, 32], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(InferenceServerException, match="'image' must be BYTES"):
        triton_client(server).infer(MODEL_NAME, [wrong])
