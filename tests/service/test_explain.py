"""`POST /v1/models/{model}:explain`: class activation maps over HTTP, from a real tiny model.

The model is a seeded two-convolution classifier (`tests.explainmodel`) exported by the real
exporter, whose feature map is 8x8 at its 32x32 input; LeNet-5 (`tiny`), which has no feature map,
stands for every model that cannot explain. Expected boxes are computed here from the metadata's
resize and crop by hand, independently of `EvalSpec.crop_box`.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client import CollectorRegistry

from modelcontract import FEATURES_NAME, class_activation_maps
from service.app import create_app
from service.inference.batching import DynamicBatcher
from service.models.runtime import OnnxModel, load_model
from service.protocols import heatmaps
from service.protocols.explain import overlay_pixels
from service.protocols.v2codec import RESPONSE_SLACK_BYTES
from service.transport.access import Role, role_of
from tests.explainmodel import EXPLAIN_MODEL_NAME, FEATURE_SIZE, export_explainable
from tests.liveserver import live_server, wait_ready
from tests.photos import encode, photo
from tests.tinymodel import MODEL_NAME, TINY_SPEC, export_tiny_model, tiny_settings

EXPLAIN = f"/v1/models/{EXPLAIN_MODEL_NAME}:explain"
TOKEN = "inference-0123456789abcdef"


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`seeing` (can explain) and `tiny` (LeNet-5: no feature map), version 1 each."""
    root = tmp_path_factory.mktemp("explain-models")
    export_explainable(root / EXPLAIN_MODEL_NAME / "1")
    export_tiny_model(root)
    return root


@pytest.fixture(scope="module")
def seeing(repository: Path) -> OnnxModel:
    return load_model(repository / EXPLAIN_MODEL_NAME / "1" / "model.onnx", ["CPUExecutionProvider"], 1)


@pytest.fixture
def client(repository: Path) -> Iterator[TestClient]:
    with TestClient(create_app(tiny_settings(repository), CollectorRegistry())) as test_client:
        wait_ready(test_client)
        yield test_client


def png_file(name: str, field: str = "image") -> tuple[str, tuple[str, bytes, str]]:
    return field, (f"{name}.png", encode(photo(name), "PNG"), "image/png")


def expected_box(width: int, height: int) -> list[float]:
    """The crop box by hand: shorter side to resize_size (int() rule), center crop, scale back."""
    shorter = TINY_SPEC.resize_size
    if width <= height:
        resized_w, resized_h = shorter, int(shorter * height / width)
    else:
        resized_w, resized_h = int(shorter * width / height), shorter
    crop_h, crop_w = TINY_SPEC.input_size
    top, left = round((resized_h - crop_h) / 2), round((resized_w - crop_w) / 2)
    sx, sy = width / resized_w, height / resized_h
    return [left * sx, top * sy, (left + crop_w) * sx, (top + crop_h) * sy]


def test_explain_answers_a_heatmap_over_the_crop_and_its_box_in_the_photo(client: TestClient) -> None:
    cat = photo("chelsea")  # 451 x 300: not square, so the crop drops columns, not rows
    assert cat.width != cat.height
    answer = client.post(EXPLAIN, files=[png_file("chelsea")])
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["model"] == {"name": EXPLAIN_MODEL_NAME, "version": 1}
    (entry,) = body["explanations"]
    predicted = client.post(f"/predict?model={EXPLAIN_MODEL_NAME}&top_k=1", files=[png_file("chelsea")])
    assert entry["class"] == predicted.json()["predictions"][0][0]  # the default class is the top-1
    grid = np.asarray(entry["heatmap"])
    assert grid.shape == TINY_SPEC.input_size  # a 32x32 crop is under the 56-cell cap: kept
    assert grid.min() >= 0.0 and grid.max() == pytest.approx(1.0)
    assert entry["box"] == pytest.approx(expected_box(cat.width, cat.height), abs=0.01)
    # The box lies inside the photo and keeps the crop's aspect (square crop -> square box here).
    x0, y0, x1, y1 = entry["box"]
    assert 0 <= x0 < x1 <= cat.width and 0 <= y0 < y1 <= cat.height
    assert (x1 - x0) == pytest.approx(y1 - y0, rel=0.05)
    # The peak is a point of the box, where the heatmap is hot (within half a cell of its hottest cell).
    px, py = entry["peak"]
    assert x0 <= px <= x1 and y0 <= py <= y1
    rows, cols = grid.shape
    assert grid[int((py - y0) / (y1 - y0) * rows), int((px - x0) / (x1 - x0) * cols)] >= 0.5


def test_explain_classes_asked_for_come_image_major_in_the_order_asked(client: TestClient) -> None:
    files = [png_file("chelsea", "a"), png_file("coffee", "b")]
    answer = client.post(f"{EXPLAIN}?class=2&class=0", files=files)
    assert answer.status_code == 200, answer.text
    entries = answer.json()["explanations"]
    assert [(e["image"], e["class"]["index"]) for e in entries] == [(0, 2), (0, 0), (1, 2), (1, 0)]
    comma = client.post(f"{EXPLAIN}?class=2,0", files=files).json()["explanations"]
    assert [e["heatmap"] for e in comma] == [e["heatmap"] for e in entries]
    for bad in ("3", "-1", "x", ",".join(str(i % 3) for i in range(100)), "9" * 4000, "8" * 4000 + ",1"):
        refused = client.post(f"{EXPLAIN}?class={bad}", files=files)
        assert refused.status_code == 422, bad[:20]
        assert "class" in refused.json()["error"] and len(refused.text) < 400  # never echoed whole


def test_explain_heatmap_is_the_class_activation_map_of_the_models_own_outputs(
    client: TestClient, seeing: OnnxModel
) -> None:
    answer = client.post(f"{EXPLAIN}?class=1", files=[png_file("coffee")]).json()
    from service.inference.preprocessing import ImagePreprocessor  # noqa: PLC0415

    row = ImagePreprocessor.from_metadata(seeing.metadata)(encode(photo("coffee"), "PNG"))
    _, extra = seeing.run(row[None], {FEATURES_NAME})
    features = extra[FEATURES_NAME]
    assert features.shape[2:] == (FEATURE_SIZE, FEATURE_SIZE)
    assert seeing.explain_weights is not None
    cam = class_activation_maps(features[0], seeing.explain_weights, np.array([1]))[0]
    expected = heatmaps.resampled(cam, TINY_SPEC.input_size)
    assert np.asarray(answer["explanations"][0]["heatmap"]) == pytest.approx(expected, abs=1e-3)


def test_explain_png_is_the_photo_scaled_to_its_bound_with_the_map_over_the_box(
    client: TestClient, seeing: OnnxModel
) -> None:
    cat = photo("chelsea")
    answer = client.post(f"{EXPLAIN}?format=png", files=[png_file("chelsea")])
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "image/png"
    overlay = Image.open(io.BytesIO(answer.content))
    # At most four pixels per crop pixel: the cat (451x300) is scaled down for the 32x32 model.
    drawn_on, scale = heatmaps.fitted(cat, overlay_pixels(seeing.metadata))
    assert overlay.format == "PNG" and overlay.size == drawn_on.size
    assert overlay.width * overlay.height <= 4 * 32 * 32 and scale < 1
    pixels, original = np.asarray(overlay.convert("RGB"), dtype=int), np.asarray(drawn_on, dtype=int)
    x0, y0, x1, y1 = (round(v * scale) for v in expected_box(cat.width, cat.height))
    assert (pixels[:, : x0 - 1] == original[:, : x0 - 1]).all()  # outside the box: the photo as sent
    assert (pixels[y0:y1, x0:x1] != original[y0:y1, x0:x1]).any()  # inside: the heat map over it
    several = client.post(f"{EXPLAIN}?format=png", files=[png_file("chelsea", "a"), png_file("coffee", "b")])
    assert several.status_code == 422
    assert "one image" in several.json()["error"]


def test_a_model_without_a_feature_map_says_why_it_cannot_explain(client: TestClient) -> None:
    answer = client.post(f"/v1/models/{MODEL_NAME}:explain", files=[png_file("chelsea")])
    assert answer.status_code == 422
    assert "no feature-map output" in answer.json()["error"]
    assert client.post("/v1/models/nosuch:explain", files=[png_file("chelsea")]).status_code == 404
    tensor = client.post(EXPLAIN, json={"inputs": [[0.0]]})
    assert tensor.status_code == 415
    assert "multipart/form-data" in tensor.json()["error"]


def test_explain_is_counted_under_its_own_endpoint_label(client: TestClient) -> None:
    assert client.post(EXPLAIN, files=[png_file("chelsea")]).status_code == 200
    metrics = client.get("/metrics").text
    assert 'endpoint="/v1/models/{model_name}:explain"' in metrics


def test_explain_needs_the_inference_token(repository: Path) -> None:
    path = EXPLAIN
    assert role_of(path) is Role.INFERENCE
    with (
        live_server(tiny_settings(repository, inference_token=TOKEN)) as live,
        httpx.Client(base_url=live.url) as http,
    ):
        assert http.post(path, files=[png_file("chelsea")]).status_code == 401
        allowed = http.post(path, files=[png_file("chelsea")], headers={"Authorization": f"Bearer {TOKEN}"})
        assert allowed.status_code == 200


def test_explain_and_predict_rows_share_one_batch_and_each_gets_its_own_answer(seeing: OnnxModel) -> None:
    """Two requests of two rows each fill a batch of four at once (the delay is far away): one run
    with the feature map, the plain request receiving only its outputs."""
    runs: list[tuple[int, frozenset[str]]] = []

    def infer(batch: np.ndarray, extra: frozenset[str] = frozenset()) -> Any:
        runs.append((len(batch), extra))
        return seeing.run(batch, extra) if extra else seeing.run(batch)

    rng = np.random.default_rng(0)
    plain_rows, explain_rows = (rng.standard_normal((2, 3, 32, 32)).astype(np.float32) for _ in range(2))

    async def scenario() -> tuple[Any, Any]:
        batcher = DynamicBatcher(infer, max_batch_size=4, max_queue_delay_s=60.0, max_queue_size=8)
        await batcher.start()
        deadline = time.monotonic() + 60
        try:
            with batcher.reserve(2) as plain, batcher.reserve(2) as explained:
                return await asyncio.gather(
                    plain.submit(plain_rows, deadline),
                    explained.submit_with(explain_rows, deadline, frozenset({FEATURES_NAME})),
                )
        finally:
            await batcher.close(timeout_s=5)

    plain_out, (explained_out, extra) = asyncio.run(scenario())
    assert runs == [(4, frozenset({FEATURES_NAME}))]
    assert isinstance(plain_out, np.ndarray)
    np.testing.assert_allclose(plain_out, seeing.run(plain_rows), rtol=1e-5, atol=1e-5)
    reference_out, reference = seeing.run(explain_rows, {FEATURES_NAME})
    assert set(extra) == {FEATURES_NAME}
    np.testing.assert_allclose(explained_out, reference_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(extra[FEATURES_NAME], reference[FEATURES_NAME], rtol=1e-5, atol=1e-5)


def test_a_batch_of_plain_requests_does_not_fetch_the_feature_map(seeing: OnnxModel) -> None:
    runs: list[frozenset[str]] = []

    def infer(batch: np.ndarray, extra: frozenset[str] = frozenset()) -> Any:
        runs.append(extra)
        return seeing.run(batch, extra) if extra else seeing.run(batch)

    async def scenario() -> None:
        batcher = DynamicBatcher(infer, max_batch_size=2, max_queue_delay_s=60.0, max_queue_size=4)
        await batcher.start()
        try:
            await batcher.submit(np.zeros((2, 3, 32, 32), np.float32), time.monotonic() + 60)
        finally:
            await batcher.close(timeout_s=5)

    asyncio.run(scenario())
    assert runs == [frozenset()]


def test_a_png_overlay_of_a_large_noisy_photo_stays_within_the_requests_tensor_bytes(
    client: TestClient, seeing: OnnxModel
) -> None:
    # The worst case for PNG: incompressible pixels at the decode bound's scale, sent as a small JPEG.
    noise = Image.fromarray(np.random.default_rng(3).integers(0, 256, (1200, 1600, 3), dtype=np.uint8))
    upload = encode(noise, "JPEG", quality=5)
    answer = client.post(f"{EXPLAIN}?format=png", files=[("image", ("noise.jpg", upload, "image/jpeg"))])
    assert answer.status_code == 200, answer.text
    tensor_bytes = 3 * 32 * 32 * 4
    assert len(answer.content) <= tensor_bytes + RESPONSE_SLACK_BYTES
    overlay = Image.open(io.BytesIO(answer.content))
    assert overlay.width * overlay.height <= 4 * 32 * 32
