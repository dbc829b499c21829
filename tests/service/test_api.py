"""The HTTP API on the real app (lifespan, batcher, ONNX Runtime) through FastAPI's TestClient."""

from __future__ import annotations

import gzip
import io
import json
import logging
import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client import CollectorRegistry

from modelcontract import softmax
from service.app import create_app
from service.inference.preprocessing import ImagePreprocessor
from service.models.runtime import OnnxModel
from service.settings import Settings
from tests.photos import encode, jpeg, photo
from tests.service.test_preprocessing import png_declaring
from tests.tinymodel import TINY_LABELS

Files = list[tuple[str, tuple[str, bytes, str]]]


def image_files(*items: tuple[str, bytes]) -> Files:
    return [("image", (name, data, "application/octet-stream")) for name, data in items]


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def sample_tensor(rows: int = 2) -> np.ndarray:
    return np.random.default_rng(7).standard_normal((rows, 3, 32, 32)).astype(np.float32)


def test_predict_multipart_images_returns_ranked_labels_in_upload_order(
    client: TestClient, tiny_model: OnnxModel
) -> None:
    uploads = [
        ("cat.jpg", jpeg("chelsea")),
        ("coffee.png", encode(photo("coffee"), "PNG")),
        ("astronaut.webp", encode(photo("astronaut"), "WEBP")),
    ]
    response = client.post("/predict?top_k=2", files=image_files(*uploads))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == {"name": "tiny", "version": 1}
    preprocess = ImagePreprocessor.from_metadata(tiny_model.metadata)
    expected = softmax(tiny_model.run(np.stack([preprocess(data) for _, data in uploads])))
    assert len(body["predictions"]) == 3
    for ranked, probabilities in zip(body["predictions"], expected, strict=True):
        assert len(ranked) == 2
        assert [p["index"] for p in ranked] == list(np.argsort(-probabilities)[:2])
        assert all(p["label"] == TINY_LABELS[p["index"]] for p in ranked)
        assert ranked[0]["score"] == pytest.approx(probabilities.max(), abs=1e-6)


def test_top_k_defaults_to_five_or_every_class_when_fewer(client: TestClient) -> None:
    response = client.post("/predict", files=image_files(("cat.jpg", jpeg("chelsea"))))
    assert response.status_code == 200
    assert len(response.json()["predictions"][0]) == len(TINY_LABELS)


@pytest.mark.parametrize("encoding", ["json", "npy"])
def test_predict_accepts_preprocessed_tensors(
    client: TestClient, tiny_model: OnnxModel, encoding: str
) -> None:
    tensor = sample_tensor(3)
    if encoding == "json":
        response = client.post("/predict?top_k=1", json={"inputs": tensor.tolist()})
    else:
        response = client.post(
            "/predict?top_k=1", content=npy(tensor), headers={"content-type": "application/x-npy"}
        )
    assert response.status_code == 200, response.text
    top1 = [ranked[0]["index"] for ranked in response.json()["predictions"]]
    assert top1 == list(tiny_model.run(tensor).argmax(axis=1))


def multipart_over_limit() -> dict[str, Any]:
    return {"files": image_files(("big.bin", b"\xff" * (3 * 1024 * 1024)))}  # limit is 2 MiB here


def multipart_without_files() -> dict[str, Any]:
    body = b'--xyz\r\nContent-Disposition: form-data; name="comment"\r\n\r\nforgot the file\r\n--xyz--\r\n'
    return {"content": body, "headers": {"content-type": "multipart/form-data; boundary=xyz"}}


BAD_REQUESTS: dict[str, tuple[Callable[[], dict[str, Any]], str, int, str]] = {
    "not-an-image": (
        lambda: {"files": image_files(("notes.txt", b"just some text"))},
        "",
        422,
        "not a readable",
    ),
    "zero-bytes": (lambda: {"files": image_files(("empty.jpg", b""))}, "", 422, "empty"),
    "truncated": (lambda: {"files": image_files(("cut.jpg", jpeg("chelsea")[:3000]))}, "", 422, "truncated"),
    "bomb": (lambda: {"files": image_files(("bomb.png", png_declaring(9000, 9000)))}, "", 422, "limit"),
    "over-max-upload": (multipart_over_limit, "", 413, "CONVSERVE_MAX_UPLOAD_BYTES"),
    "unsupported-type": (
        lambda: {"content": b"hello", "headers": {"content-type": "text/plain"}},
        "",
        415,
        "multipart/form-data",
    ),
    "no-files": (multipart_without_files, "", 400, "no files"),
    "top-k-zero": (lambda: {"files": image_files(("cat.jpg", jpeg("chelsea")))}, "?top_k=0", 422, "top_k"),
    "top-k-too-big": (lambda: {"files": image_files(("cat.jpg", jpeg("chelsea")))}, "?top_k=4", 422, "top_k"),
    "top-k-not-int": (
        lambda: {"files": image_files(("cat.jpg", jpeg("chelsea")))},
        "?top_k=abc",
        422,
        "top_k",
    ),
    "too-many-images": (
        lambda: {"files": image_files(*[(f"{i}.jpg", b"x") for i in range(17)])},
        "",
        413,
        "more than 16 images",
    ),
    "tensor-rank": (lambda: {"json": {"inputs": sample_tensor(1)[0].tolist()}}, "", 422, r"\[N, 3, 32, 32\]"),
    "tensor-shape": (
        lambda: {"json": {"inputs": np.zeros((1, 3, 16, 16)).tolist()}},
        "",
        422,
        r"got \[1, 3, 16, 16\]",
    ),
    "tensor-ragged": (lambda: {"json": {"inputs": [[[[1.0, 2.0], [3.0]]]]}}, "", 422, "rectangular"),
    "tensor-inf": (
        lambda: {
            "content": json.dumps({"inputs": np.full((1, 3, 32, 32), 1e39).tolist()}).encode(),
            "headers": {"content-type": "application/json"},
        },
        "",
        422,
        "NaN or Inf",
    ),
    "tensor-nan": (
        lambda: {
            "content": npy(np.full((1, 3, 32, 32), np.nan, np.float32)),
            "headers": {"content-type": "application/x-npy"},
        },
        "",
        422,
        "NaN or Inf",
    ),
    "tensor-dtype": (
        lambda: {"content": npy(np.zeros((1, 3, 32, 32))), "headers": {"content-type": "application/x-npy"}},
        "",
        422,
        "float32",
    ),
    "npy-garbage": (
        lambda: {"content": b"\x93NUMPY garbage", "headers": {"content-type": "application/x-npy"}},
        "",
        422,
        ".npy",
    ),
    "json-malformed": (
        lambda: {"content": b"{inputs:", "headers": {"content-type": "application/json"}},
        "",
        400,
        "not valid JSON",
    ),
    "json-without-inputs": (lambda: {"json": {"instances": []}}, "", 400, '"inputs"'),
    # Issue 8: inputs that used to cost a 500 (or seconds and gigabytes) before any check.
    "json-number-with-400-digits": (
        lambda: json_body(
            json.dumps({"inputs": np.zeros((1, 3, 32, 32)).tolist()}).replace("0.0", "1" * 400, 1)
        ),
        "",
        422,
        "NaN or Inf",
    ),
    "json-number-with-5000-digits": (
        lambda: json_body(b'{"inputs": [[[[' + b"9" * 5000 + b"]]]]}"),
        "",
        422,
        r"\[N, 3, 32, 32\]",
    ),
    "json-nested-100000-deep": (
        lambda: json_body(b'{"inputs": ' + b"[" * 100_000),
        "",
        400,
        "nested too deeply",
    ),
    "json-nan-literal": (lambda: json_body(b'{"inputs": NaN}'), "", 400, "not a number"),
    "npy-header-larger-than-its-data": (
        lambda: {
            "content": npy(np.zeros((1, 3, 32, 32), np.float32)).replace(
                b"(1, 3, 32, 32)", b"(100000, 3, 224, 224)"
            )[:128]
            + b"\0" * 16,
            "headers": {"content-type": "application/x-npy"},
        },
        "",
        422,
        r"declares shape \[100000, 3, 224, 224\]",
    ),
    "npy-of-python-objects": (
        lambda: {"content": npy_objects(), "headers": {"content-type": "application/x-npy"}},
        "",
        422,
        "Python objects",
    ),
    "aspect-ratio-4000x1": (
        lambda: {"files": image_files(("strip.png", encode(Image.new("RGB", (4000, 1)), "PNG")))},
        "",
        422,
        "aspect ratio beyond 20:1",
    ),
    "png-over-the-decode-budget": (
        lambda: {"files": image_files(("big.png", encode(Image.new("L", (2100, 2100)), "PNG")))},
        "",
        422,
        "CONVSERVE_MAX_DECODED_PIXELS",
    ),
    # Content-Encoding: one reader for every body route; mistakes are 415, bombs stop at the limit.
    "multipart-with-content-encoding": (
        lambda: {"files": image_files(("cat.jpg", jpeg("chelsea"))), "headers": {"content-encoding": "gzip"}},
        "",
        415,
        "images are already compressed",
    ),
    "json-with-brotli": (
        lambda: {"content": b"{}", "headers": {"content-type": "application/json", "content-encoding": "br"}},
        "",
        415,
        "'br' is not supported",
    ),
    "gzip-json-inflating-over-the-limit": (
        lambda: {
            "content": gzip.compress(b'{"inputs": [' + b"0," * (2 * 1024 * 1024) + b"0]}"),
            "headers": {"content-type": "application/json", "content-encoding": "gzip"},
        },
        "",
        413,
        "decompresses to more than",
    ),
    "json-inputs-of-empty-lists": (
        lambda: json_body(b'{"inputs": [' + b"[]," * 5000 + b"[]]}"),
        "",
        422,
        "nested lists",
    ),
}


def json_body(content: bytes | str) -> dict[str, Any]:
    return {"content": content, "headers": {"content-type": "application/json"}}


def npy_objects() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return buffer.getvalue()


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_input_gets_4xx_with_an_error_message_and_the_service_stays_ready(
    client: TestClient, case: str
) -> None:
    make_request, query, status, message = BAD_REQUESTS[case]
    response = client.post(f"/predict{query}", **make_request())
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert isinstance(error, str)
    assert re.search(message, error), error
    assert client.get("/readyz").status_code == 200
    assert client.post("/predict", files=image_files(("cat.jpg", jpeg("chelsea")))).status_code == 200
    metrics = client.get("/metrics").text
    assert 'convserve_rejected_total{reason="bad_input"} 1.0' in metrics


def test_metrics_expose_every_contract_name(client: TestClient) -> None:
    client.post("/predict", files=image_files(("cat.jpg", jpeg("chelsea"))))
    text = client.get("/metrics").text
    for name in (
        'convserve_requests_total{endpoint="/predict",model="tiny",protocol="http",status="200",version="1"}',
        'convserve_request_duration_seconds_bucket{endpoint="/predict",le="0.005",model="tiny",protocol="http",'
        'version="1"}',
        'convserve_queue_wait_seconds_bucket{le="0.0005",model="tiny",version="1"}',
        'convserve_inference_duration_seconds_bucket{le="0.0005",model="tiny",version="1"}',
        'convserve_preprocess_duration_seconds_bucket{le="0.0005",model="tiny",version="1"}',
        'convserve_batch_size_bucket{le="1.0",model="tiny",version="1"}',
        'convserve_queue_depth{model="tiny",version="1"} 0.0',
        'convserve_rejected_total{reason="queue_full"}',
        'convserve_rejected_total{reason="timeout"}',
        'convserve_rejected_total{reason="bad_input"}',
        'convserve_model_info{model="tiny",provider="CPUExecutionProvider",state="READY",version="1"} 1.0',
        'convserve_model_loads_total{model="tiny",result="success"} 1.0',
        'convserve_model_load_duration_seconds_count{model="tiny"} 1.0',
        "convserve_predictions_total{label=",
        'convserve_prediction_confidence_bucket{le="0.1",model="tiny",version="1"}',
    ):
        assert name in text, name


def test_health_endpoints_and_request_id(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "alive"}
    ready = client.get("/readyz").json()
    assert ready == {"status": "ready", "models": {"tiny": [1]}}
    response = client.get("/healthz", headers={"X-Request-ID": "trace-42"})
    assert response.headers["x-request-id"] == "trace-42"
    assert len(client.get("/healthz").headers["x-request-id"]) == 16  # generated when absent


def test_not_ready_until_warmed_up(make_settings: Callable[..., Settings]) -> None:
    # 4096 batch sizes take minutes to warm up; the first answers must come before that.
    settings = make_settings(max_batch_size=4096, max_queue_size=4096)
    with TestClient(create_app(settings, CollectorRegistry())) as client:
        assert client.get("/healthz").status_code == 200
        readiness = client.get("/readyz")
        assert (
            readiness.status_code == 503 and "no ready version of tiny (loading)" in readiness.json()["error"]
        )
        assert client.get("/v2/health/ready").status_code == 400
        response = client.post("/predict", files=image_files(("cat.jpg", jpeg("chelsea"))))
        assert response.status_code == 503 and "retry shortly" in response.json()["error"]


def test_v2_metadata_health_and_json_infer(client: TestClient, tiny_model: OnnxModel) -> None:
    assert client.get("/v2").json()["extensions"] == [
        "binary_tensor_data",
        "classification",
        "model_repository",
    ]
    for path in (
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/tiny/ready",
        "/v2/models/tiny/versions/1/ready",
    ):
        response = client.get(path)
        assert (response.status_code, response.content) == (200, b"")
    metadata = client.get("/v2/models/tiny/versions/1").json()
    assert metadata["inputs"] == [
        {"name": "input", "datatype": "FP32", "shape": [-1, 3, 32, 32]},
        {"name": "image", "datatype": "BYTES", "shape": [-1]},
    ]
    assert metadata["parameters"]["execution_provider"] == "CPUExecutionProvider"
    tensor = sample_tensor(2)
    request = {
        "inputs": [{"name": "input", "shape": [2, 3, 32, 32], "datatype": "FP32", "data": tensor.tolist()}]
    }
    response = client.post("/v2/models/tiny/infer", json=request)
    assert response.status_code == 200, response.text
    (output,) = response.json()["outputs"]
    logits = np.asarray(output["data"], np.float32).reshape(output["shape"])
    np.testing.assert_allclose(logits, tiny_model.run(tensor), atol=1e-5)


def v2_input(**overrides: Any) -> dict[str, Any]:
    entry = {"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": [0.0] * 3072}
    return {"inputs": [{**entry, **overrides}]}


def binary_declaring_56_gib() -> dict[str, Any]:
    """A binary-extension header declaring [100000, 3, 224, 224] FP32, followed by 16 bytes."""
    shape = [100_000, 3, 224, 224]
    entry = {
        "name": "input",
        "shape": shape,
        "datatype": "FP32",
        "parameters": {"binary_data_size": 4 * math.prod(shape)},
    }
    header = json.dumps({"inputs": [entry]}).encode()
    return {"content": header + b"\0" * 16, "headers": {"Inference-Header-Content-Length": str(len(header))}}


V2_MISTAKES: dict[str, tuple[Callable[[], dict[str, Any]], int, str]] = {
    "shape-of-booleans": (lambda: {"json": v2_input(shape=[True, 3, 32, 32])}, 400, "non-negative integers"),
    "shape-of-strings": (lambda: {"json": v2_input(shape=["1", 3, 32, 32])}, 400, "non-negative integers"),
    "shape-with-200-dims": (lambda: {"json": v2_input(shape=[1] * 200)}, 400, "a list of 200 items"),
    "timeout-10e400": (
        lambda: {
            "content": json.dumps({**v2_input(), "parameters": {"timeout": 0}}).replace(
                '"timeout": 0', '"timeout": 1' + "0" * 400
            )
        },
        400,
        "timeout parameter",
    ),
    "timeout-boolean": (
        lambda: {"json": {**v2_input(), "parameters": {"timeout": True}}},
        400,
        "timeout parameter",
    ),
    "non-ascii-header-length": (
        lambda: {
            "content": json.dumps(v2_input()).encode(),
            "headers": {"Inference-Header-Content-Length": "²".encode()},
        },
        400,
        "must be a byte count",
    ),
    "binary-size-boolean": (
        lambda: {"json": v2_input(data=None, parameters={"binary_data_size": True})},
        422,
        "binary_data_size",
    ),
    "binary-declared-larger-than-sent": (binary_declaring_56_gib, 422, "must follow the header"),
    "id-not-a-string": (lambda: {"json": {**v2_input(), "id": {"x": 1}}}, 400, '"id" must be a string'),
    "binary-output-flag-not-boolean": (
        lambda: {"json": {**v2_input(), "parameters": {"binary_data_output": "yes"}}},
        400,
        "true or false",
    ),
    "classification-boolean": (
        lambda: {
            "json": {**v2_input(), "outputs": [{"name": "logits", "parameters": {"classification": True}}]}
        },
        400,
        "non-negative integer",
    ),
    "json-nested-100000-deep": (lambda: {"content": b"[" * 100_000}, 400, "nested too deeply"),
    "outputs-repeated": (
        lambda: {"json": {**v2_input(), "outputs": [{"name": "logits"}, {"name": "logits"}]}},
        400,
        "requested twice",
    ),
    "id-over-1024-characters": (lambda: {"json": {**v2_input(), "id": "x" * 1025}}, 400, "at most 1024"),
    "content-encoding-stacked": (
        lambda: {
            "content": gzip.compress(gzip.compress(json.dumps(v2_input()).encode())),
            "headers": {"content-encoding": "gzip, gzip"},
        },
        415,
        "applies 2 codings",
    ),
    "data-longer-than-its-shape": (lambda: {"json": v2_input(data=[0.0] * 30_000)}, 422, "has 30000 values"),
}


@pytest.mark.parametrize("case", V2_MISTAKES)
def test_v2_client_mistakes_get_4xx_with_an_error_message(client: TestClient, case: str) -> None:
    make_request, status, message = V2_MISTAKES[case]
    response = client.post("/v2/models/tiny/infer", **make_request())
    assert response.status_code == status, response.text
    assert re.search(message, response.json()["error"]), response.json()["error"]
    assert client.get("/readyz").status_code == 200


def test_v2_unknown_model_or_version_is_404_with_error(client: TestClient) -> None:
    for path in ("/v2/models/other", "/v2/models/tiny/versions/2", "/v2/models/other/ready"):
        response = client.get(path)
        assert response.status_code == 404 and "error" in response.json(), path
    response = client.post("/v2/models/tiny/versions/9/infer", json={"inputs": []})
    assert response.status_code == 404 and "no version 9" in response.json()["error"]


def test_unknown_path_gets_404_in_the_error_shape(client: TestClient) -> None:
    response = client.get("/nope")
    assert response.status_code == 404 and "error" in response.json()


def test_each_request_logs_one_line_with_its_id_and_error(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="service"):
        client.post(
            "/predict?top_k=0",
            files=image_files(("cat.jpg", jpeg("chelsea"))),
            headers={"X-Request-ID": "r-1"},
        )
    lines = [record.getMessage() for record in caplog.records if "r-1" in record.getMessage()]
    assert len(lines) == 1
    assert "status=422" in lines[0] and "top_k must be between 1 and 3" in lines[0]
