"""scikit-learn's 8x8 digits for the unseen-classes measurement: a fine-tune on 0-4, galleries of 5-9.

The digits become images the way `python -m training fit --data demo:digits` makes them (17 grey
levels scaled to 0-255, grey to RGB) and are sent as PNG, the bytes a client would send. Digits 0-4
are split once: the fine-tune's folder, and `SEEN_HELD_OUT` per class it never sees (the queries of
the seen-classes check). Digits 5-9 never reach the fine-tune.
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

SEEN = tuple(range(5))
UNSEEN = tuple(range(5, 10))
SEEN_HELD_OUT = 30
"""Images per seen class kept out of the fine-tune: the seen-classes check's queries."""
SPLIT_SEED = 0
FINE_TUNE_INPUT: dict[str, Any] = {
    "image_size": 96,
    "crop_pct": 1.0,
    "horizontal_flip": False,
    "min_scale": 0.85,
    "seed": 0,
    "device": "cpu",
}
"""What every fine-tune here shares with `fit --data demo:digits`: 96 px, the full frame, no flips, its
zoom range; the rest are fit's defaults (EfficientNet-Lite0 from its ImageNet weights, the top 2 block
groups unfrozen in phase 2)."""
FINE_TUNES: dict[str, dict[str, Any]] = {
    "short": {"frozen_epochs": 2, "unfrozen_epochs": 3},
    "default": {"frozen_epochs": 5, "unfrozen_epochs": 8},
}
"""Two lengths of the same fine-tune: a short one (2 + 3 epochs, under 2 minutes on 2 cores) and
fit's default schedule (5 + 8 epochs, early stopping after 3 without a lower validation loss), to see
whether features of unseen classes degrade as the model learns its own classes better."""


@dataclass(frozen=True)
class Digits:
    pixels: np.ndarray
    """[N, 8, 8] float grey levels 0-16, as scikit-learn gives them."""
    labels: np.ndarray
    """[N] int digit of each image."""
    encoded: list[bytes]
    """PNG bytes of each image."""
    train: np.ndarray
    """Indices of the seen digits the fine-tune trains (and validates) on."""
    held_out: np.ndarray
    """Indices of the seen digits the fine-tune never sees."""
    unseen: np.ndarray
    """Indices of the digits 5-9."""


def digit_image(pixels: np.ndarray) -> Image.Image:
    """One 8x8 digit as an RGB image, 0-16 scaled to 0-255 as `demo:digits` does."""
    return Image.fromarray(np.asarray(pixels * (255.0 / 16.0), dtype=np.uint8), mode="L").convert("RGB")


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def split_seen(labels: np.ndarray, held_out: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the seen digits: (the fine-tune's, `held_out` per seen class kept apart), sorted."""
    rng = np.random.default_rng(seed)
    kept = [rng.permutation(np.flatnonzero(labels == digit))[:held_out] for digit in SEEN]
    apart = np.sort(np.concatenate(kept))
    seen = np.flatnonzero(np.isin(labels, SEEN))
    return np.setdiff1d(seen, apart), apart


def load_digits() -> Digits:
    from sklearn.datasets import load_digits as sklearn_digits  # noqa: PLC0415 (~2 s import)

    data = sklearn_digits()
    pixels = np.asarray(data.images, dtype=np.float32)
    labels = np.asarray(data.target, dtype=np.int64)
    train, held_out = split_seen(labels, SEEN_HELD_OUT, SPLIT_SEED)
    return Digits(
        pixels=pixels,
        labels=labels,
        encoded=[encode_png(digit_image(p)) for p in pixels],
        train=train,
        held_out=held_out,
        unseen=np.flatnonzero(np.isin(labels, UNSEEN)),
    )


def fine_tune(digits: Digits, workdir: Path, schedule: str) -> tuple[Path, dict[str, Any]]:
    """Fit EfficientNet-Lite0 on the seen digits' training images with the `FINE_TUNES[schedule]`
    epochs; the model file and what the run was (its size, time and validation accuracy)."""
    from training.config import RunConfig  # noqa: PLC0415 (torch, only for this step)
    from training.pipeline import fit  # noqa: PLC0415

    folder = workdir / "digits-0-4"
    for index in digits.train:
        target = folder / str(digits.labels[index]) / f"{index:04d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(digits.encoded[index])
    options = {**FINE_TUNE_INPUT, **FINE_TUNES[schedule]}
    started = time.monotonic()
    version = fit(RunConfig(data=str(folder), out=str(workdir / f"fine-tune-{schedule}"), **options))
    seconds = time.monotonic() - started
    log.info("fine-tuned on digits 0-4 (%s) in %.0f s: %s", schedule, seconds, version)
    return version / "model.onnx", {
        "schedule": schedule,
        "backbone": "efficientnet_lite0 from its ImageNet weights",
        "classes": [str(d) for d in SEEN],
        "images": len(digits.train),
        "options": options,
        "seconds": round(seconds, 1),
        "val_accuracy": _val_accuracy(version),
    }


def _val_accuracy(version: Path) -> float | None:
    metrics = version / "metrics.json"
    if not metrics.exists():
        return None
    value = json.loads(metrics.read_text()).get("val_accuracy")
    return None if value is None else round(float(value), 4)
