"""The naive baseline server: a real tiny PyTorch model behind its FastAPI app."""

from __future__ import annotations

import io

import numpy as np
import pytest
import skimage.data
from fastapi.testclient import TestClient
from PIL import Image

from benchmarks.common.corpus import encode_jpeg
from benchmarks.peers.naive_server import create_app, eval_transform, load_torch_model
from modelcontract import EvalSpec, ModelMetadata
from modelcontract.transform import EvalTransform
from service.inference.preprocessing import ImagePreprocessor
from training.backbones import create_model

METADATA = ModelMetadata(
    labels=("cat", "coffee", "rocket"),
    eval_spec=EvalSpec(
        input_size=(32, 32), resize_size=36, interpolation="bicubic", mean=(0.5,) * 3, std=(0.25,) * 3
    ),
    backbone="lenet5",
)


def test_naive_server_answers_top_classes_for_a_real_jpeg() -> None:
    model = create_model("lenet5", num_classes=3).eval()
    app = create_app(model, eval_transform(METADATA), list(METADATA.labels))
    jpeg = encode_jpeg(Image.fromarray(skimage.data.chelsea()))
    with TestClient(app) as client:
        response = client.post("/predict", files={"file": ("cat.jpg", jpeg, "image/jpeg")})
    assert response.status_code == 200
    (predictions,) = response.json()["predictions"]
    assert sorted(p["label"] for p in predictions) == ["cat", "coffee", "rocket"]
    scores = [p["score"] for p in predictions]
    assert scores == sorted(scores, reverse=True)
    assert sum(scores) == pytest.approx(1.0, abs=1e-5)


def test_naive_transform_gives_the_service_inputs_on_a_real_photo() -> None:
    # Without draft-mode decoding the service computes torchvision's tensor within rounding: the shared
    # transform resamples only the crop's box, which moves a few pixels by one grey level.
    photo = Image.fromarray(skimage.data.coffee())
    buffer = io.BytesIO()
    photo.save(buffer, format="PNG")
    transform = EvalTransform(
        input_size=(32, 32), resize_size=36, interpolation="bicubic", mean=(0.5,) * 3, std=(0.25,) * 3
    )
    expected = ImagePreprocessor(transform, use_draft=False)(buffer.getvalue())
    actual = eval_transform(METADATA)(photo.convert("RGB")).numpy()
    one_grey_level = 1 / (255 * 0.25)
    np.testing.assert_allclose(actual, expected, atol=one_grey_level + 1e-5)
    assert float((np.abs(actual - expected) > 1e-5).mean()) <= 0.02


def test_naive_server_refuses_models_it_cannot_rebuild_in_pytorch() -> None:
    with pytest.raises(ValueError, match="only the ImageNet efficientnet_lite0"):
        load_torch_model(METADATA)
