"""Fixtures for the training tests: real photos, a tiny eval spec, a seeded LeNet-5."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from modelcontract import EvalSpec
from tests.training.images import PHOTO_NAMES, TINY_LABELS, photo, preprocess
from training.backbones import create_model


@pytest.fixture(scope="session")
def photos() -> list[Image.Image]:
    return [photo(name) for name in PHOTO_NAMES]


@pytest.fixture(scope="session")
def tiny_spec() -> EvalSpec:
    return EvalSpec(
        input_size=(32, 32), resize_size=36, interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3
    )


@pytest.fixture(scope="session")
def tiny_batch(photos: list[Image.Image], tiny_spec: EvalSpec) -> torch.Tensor:
    return preprocess(photos, tiny_spec)


@pytest.fixture
def lenet() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("lenet5", num_classes=len(TINY_LABELS), pretrained=False)
