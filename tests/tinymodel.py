"""The tiny real model the service and deployment tests serve, and the settings they serve it with.

An untrained, seeded LeNet-5 (32x32 RGB input) exported by the real training exporter, with real
scikit-image photos as parity inputs, so every test runs ONNX Runtime on a contract-conforming file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from skimage import data as skimage_data

from modelcontract import EvalSpec
from service.settings import Settings
from training.backbones import create_model
from training.export import export_onnx
from training.transforms import eval_transform

TINY_SPEC = EvalSpec(
    input_size=(32, 32),
    resize_size=36,
    interpolation="bilinear",
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
)
PARITY_PHOTOS = ("chelsea", "coffee", "astronaut")
MODEL_NAME = "tiny"
TINY_LABELS = ("cat", "coffee", "astronaut")
DEFAULT_MAX_UPLOAD_BYTES: int = Settings.model_fields["max_upload_bytes"].default
"""The service's own upload limit, for tests that need its worst case rather than `tiny_settings`' 2 MiB."""


def export_tiny(version_dir: Path, labels: Sequence[str], seed: int = 0) -> Path:
    """Export a seeded LeNet-5 with `len(labels)` classes to `version_dir/model.onnx`."""
    torch.manual_seed(seed)
    model = create_model("lenet5", num_classes=len(labels), pretrained=False)
    transform = eval_transform(TINY_SPEC)
    photos = [
        Image.fromarray(np.asarray(getattr(skimage_data, name)(), dtype=np.uint8)) for name in PARITY_PHOTOS
    ]
    parity_inputs = torch.stack([transform(photo.convert("RGB")) for photo in photos])
    export_onnx(
        model,
        version_dir,
        labels=labels,
        eval_spec=TINY_SPEC,
        backbone="lenet5",
        parity_inputs=parity_inputs,
    )
    return version_dir / "model.onnx"


def export_tiny_model(repository: Path) -> Path:
    """Export the tiny model with `TINY_LABELS` as `repository/tiny/1/model.onnx` and return that path."""
    return export_tiny(repository / MODEL_NAME / "1", TINY_LABELS)


def zero_inputs(rows: int) -> list[list[list[list[float]]]]:
    """A preprocessed batch of `rows` all-zero images of the tiny model's shape, as JSON-ready lists."""
    height, width = TINY_SPEC.input_size
    return np.zeros((rows, 3, height, width), dtype=np.float32).tolist()


def tiny_settings(repository: Path, **overrides: Any) -> Settings:
    """Settings for tiny models in `repository` on CPU: small batches and limits; `overrides` win."""
    fields: dict[str, Any] = {
        "model_repository": repository,
        "providers": ["cpu"],
        "max_batch_size": 4,
        "max_queue_size": 16,
        "max_queue_delay_ms": 2.0,
        "intra_op_threads": 1,
        "max_upload_bytes": 2 * 1024 * 1024,
        # In-process apps serve no gRPC unless a test asks: 8001 is one port for the whole machine.
        "grpc_port": 0,
    }
    return Settings(**{**fields, **overrides})
