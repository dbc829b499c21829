"""The tiny real model the service and deployment tests serve, and a free loopback port.

An untrained, seeded LeNet-5 (32x32 RGB input) exported by the real training exporter, with real
scikit-image photos as parity inputs, so every test runs ONNX Runtime on a contract-conforming file.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage import data as skimage_data

from training.backbones import create_model
from training.export import export_onnx
from training.spec import EvalSpec
from training.transforms import eval_transform

TINY_SPEC = EvalSpec(
    input_size=(32, 32),
    resize_size=36,
    interpolation="bilinear",
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
)
PARITY_PHOTOS = ("chelsea", "coffee", "astronaut")


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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
