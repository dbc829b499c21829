"""The INT8 variant of a published model: static QDQ quantization, checked, published as the next version.

`quantize_model` reads `models/<name>/<version>/model.onnx`, calibrates ONNX Runtime's static quantizer on
real images preprocessed by the model's own eval transform (rebuilt from its metadata), compares FP32 and
INT8 on held-out images and publishes the INT8 file as `models/<name>/<next version>/` only when the
drop stays within the limit. Everything is written into a hidden staging directory first and moved into
place with one rename (`modelcontract.publish_version`), so a refused or failed run leaves nothing.

Two ways to check the INT8 model:
- a dataset (an image folder or demo:digits; by default the one in the version's `config.json`):
  calibrate on training images, compare top-1 accuracy on the validation split;
- `PHOTOS` (the ImageNet default model has no validation set here): calibrate on random crops of
  scikit-image's sample photos, compare top-1 *agreement* of FP32 and INT8 on fixed views of them.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from PIL import Image, ImageOps

from modelcontract import METADATA_KEY, MODEL_FILENAME, publish_version
from training.data import ImageDataset, load_dataset
from training.photos import sample_photos
from training.spec import INPUT_NAME, OUTPUT_NAME, EvalSpec
from training.transforms import eval_transform

logger = logging.getLogger(__name__)

PHOTOS = "skimage:photos"
"""`--calibration` value for scikit-image's sample photos (the default without a dataset)."""
PHOTO_NAMES = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "stereo_motorcycle",
)
"""The colour photographs scikit-image ships (no download)."""
REPORT_FILENAME = "quantize.json"
_BATCH = 32


class QuantizationRefused(ValueError):
    """The INT8 model lost too much against FP32; nothing was published."""


@dataclass(frozen=True)
class QuantizeSettings:
    """What `python -m training quantize` was asked to do."""

    model: Path
    """The FP32 version directory, e.g. models/digits/1."""
    calibration: str | None = None
    """Image folder, demo:digits or `PHOTOS`; None = the version's config.json data, else `PHOTOS`."""
    calibration_images: int = 128
    """Images the quantizer observes to choose activation ranges."""
    max_accuracy_drop: float = 1.0
    """Largest allowed FP32 - INT8 top-1 accuracy on the validation split, in percentage points."""
    min_agreement: float = 90.0
    """Smallest allowed share of photo views where FP32 and INT8 agree on top-1, in percent (`PHOTOS`)."""
    seed: int = 0
    """Seed of the calibration sample and the photo crops."""

    def __post_init__(self) -> None:
        if self.calibration_images < 1:
            raise ValueError(f"--calibration-images must be >= 1, got {self.calibration_images}")


@dataclass(frozen=True)
class CheckImages:
    """Preprocessed images: what calibrates the quantizer and what FP32 and INT8 are compared on."""

    source: str
    calibration: np.ndarray
    evaluation: np.ndarray
    labels: np.ndarray | None
    """Class indices of `evaluation`, or None when only agreement can be measured (photos)."""


def read_metadata(model_path: Path) -> dict[str, Any]:
    """The `convserve` metadata JSON of an ONNX file, as a dict."""
    props = {p.key: p.value for p in onnx.load(str(model_path), load_external_data=False).metadata_props}
    if METADATA_KEY not in props:
        raise ValueError(
            f"{model_path} has no {METADATA_KEY!r} metadata; quantize a model exported by training"
        )
    metadata: dict[str, Any] = json.loads(props[METADATA_KEY])
    return metadata


def eval_spec_from_metadata(metadata: dict[str, Any]) -> EvalSpec:
    """The model's own eval transform, rebuilt from the fields `EvalSpec.to_metadata` wrote."""
    _, height, width = metadata["input_shape"]
    return EvalSpec(
        input_size=(height, width),
        resize_size=metadata["resize_size"],
        interpolation=metadata["interpolation"],
        mean=tuple(metadata["mean"]),
        std=tuple(metadata["std"]),
    )


def _photo_views(photo: Image.Image) -> list[Image.Image]:
    """Fixed views of a photo: whole, mirrored, four corner crops and a close centre crop."""
    w, h = photo.size
    cw, ch = int(w * 0.75), int(h * 0.75)
    corners = [(0, 0), (w - cw, 0), (0, h - ch), (w - cw, h - ch)]
    views = [photo, ImageOps.mirror(photo)]
    views += [photo.crop((x, y, x + cw, y + ch)) for x, y in corners]
    views.append(photo.crop((w // 5, h // 5, w - w // 5, h - h // 5)))
    return views


def _random_crop(photo: Image.Image, rng: random.Random) -> Image.Image:
    w, h = photo.size
    scale = rng.uniform(0.5, 1.0)
    cw, ch = int(w * scale), int(h * scale)
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    crop = photo.crop((x, y, x + cw, y + ch))
    return ImageOps.mirror(crop) if rng.random() < 0.5 else crop


def _stack(images: list[Image.Image], spec: EvalSpec) -> np.ndarray:
    transform = eval_transform(spec)
    return torch.stack([transform(image.convert("RGB")) for image in images]).numpy()


def photo_images(spec: EvalSpec, settings: QuantizeSettings) -> CheckImages:
    """Random crops of the sample photos to calibrate; fixed views of them to compare on."""
    photos = sample_photos(PHOTO_NAMES)
    rng = random.Random(settings.seed)
    crops = [_random_crop(rng.choice(photos), rng) for _ in range(settings.calibration_images)]
    views = [view for photo in photos for view in _photo_views(photo)]
    return CheckImages(PHOTOS, _stack(crops, spec), _stack(views, spec), None)


def dataset_images(data: str, spec: EvalSpec, settings: QuantizeSettings, run: dict[str, Any]) -> CheckImages:
    """Training images (a seeded sample) to calibrate; the whole validation split to compare on."""
    dataset = load_dataset(data, run.get("val_split", 0.2), run.get("seed", 0))
    transform = eval_transform(spec)
    train = list(dataset.train)
    random.Random(settings.seed).shuffle(train)
    calibration = ImageDataset(train[: settings.calibration_images], transform, dataset.skipped)
    val = ImageDataset(dataset.val, transform, dataset.skipped)
    return CheckImages(
        data,
        torch.stack([calibration[i][0] for i in range(len(calibration))]).numpy(),
        torch.stack([val[i][0] for i in range(len(val))]).numpy(),
        np.array([label for _, label in dataset.val]),
    )


def check_images(version_dir: Path, spec: EvalSpec, settings: QuantizeSettings) -> CheckImages:
    """The images named by `--calibration`, by default the dataset the version was trained on."""
    config_path = version_dir / "config.json"
    run = json.loads(config_path.read_text()) if config_path.is_file() else {}
    data = settings.calibration or run.get("data") or PHOTOS
    if data == PHOTOS:
        return photo_images(spec, settings)
    if settings.calibration is not None and data != run.get("data"):
        run = {}  # another dataset: its split is not the run's, use the defaults
    return dataset_images(data, spec, settings, run)


class _Batches(CalibrationDataReader):
    """Feeds the quantizer's calibration run with fixed-size batches of preprocessed images."""

    def __init__(self, images: np.ndarray) -> None:
        self._batches: Iterator[np.ndarray] = iter(np.array_split(images, max(1, len(images) // _BATCH)))

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)}


def quantize_file(source: Path, target: Path, calibration: np.ndarray, work: Path) -> None:
    """Static QDQ quantization: uint8 activations (MinMax ranges), int8 per-channel weights in 7 bits.

    U8S8 because ONNX Runtime's x86 kernels without VNNI (AVX2, like this project's CI machine) run
    it fastest: 1.55x FP32 on EfficientNet-Lite0, where S8S8 was no faster. Those kernels add u8 x s8
    products in int16 pairs, which saturates with full-range weights (FP32/INT8 top-1 agreement on
    the sample photos 70 %); `reduce_range` keeps weights in 7 bits so the sums fit (86 %).
    """
    prepared = work / "prepared.onnx"
    # ORT's recommended pre-processing: shape inference and graph fusions (Conv+BN etc.) before
    # calibration, so ranges are collected on the graph that will actually be quantized.
    quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    quantize_static(
        str(prepared),
        str(target),
        _Batches(calibration),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        reduce_range=True,
        calibrate_method=CalibrationMethod.MinMax,
    )


def _logits(path: Path, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate(
        [
            session.run([OUTPUT_NAME], {INPUT_NAME: images[i : i + _BATCH]})[0]
            for i in range(0, len(images), _BATCH)
        ]
    )


def compare(fp32: Path, int8: Path, images: CheckImages) -> dict[str, Any]:
    """Top-1 of both files on the evaluation images: accuracies (%) with labels, else agreement (%)."""
    top_fp32 = _logits(fp32, images.evaluation).argmax(axis=1)
    top_int8 = _logits(int8, images.evaluation).argmax(axis=1)
    result: dict[str, Any] = {
        "images": len(images.evaluation),
        "top1_agreement": round(100.0 * float((top_fp32 == top_int8).mean()), 2),
    }
    if images.labels is not None:
        result["fp32_accuracy"] = round(100.0 * float((top_fp32 == images.labels).mean()), 2)
        result["int8_accuracy"] = round(100.0 * float((top_int8 == images.labels).mean()), 2)
        result["accuracy_drop"] = round(result["fp32_accuracy"] - result["int8_accuracy"], 2)
    return result


def check_gate(comparison: dict[str, Any], settings: QuantizeSettings) -> None:
    """Raise `QuantizationRefused` when INT8 loses more than the settings allow."""
    if "accuracy_drop" in comparison:
        if comparison["accuracy_drop"] > settings.max_accuracy_drop:
            raise QuantizationRefused(
                f"INT8 top-1 accuracy {comparison['int8_accuracy']}% vs FP32 {comparison['fp32_accuracy']}% "
                f"on {comparison['images']} validation images drops {comparison['accuracy_drop']} points, "
                f"more than --max-accuracy-drop {settings.max_accuracy_drop}; nothing was published "
                "(try more --calibration-images, or keep serving FP32)"
            )
    elif comparison["top1_agreement"] < settings.min_agreement:
        raise QuantizationRefused(
            f"INT8 agrees with FP32 on top-1 for {comparison['top1_agreement']}% of {comparison['images']} "
            f"photo views, below --min-agreement {settings.min_agreement}; nothing was published"
        )


def int8_metadata(
    metadata: dict[str, Any], version: str, images: CheckImages, comparison: dict[str, Any]
) -> dict[str, Any]:
    """The FP32 metadata with what changed: precision, calibration and the INT8 accuracy."""
    result = dict(metadata)
    result["precision"] = "int8"
    result["quantization"] = {
        "format": "QDQ",
        "activations": "uint8 per-tensor",
        "weights": "int8 per-channel, 7-bit range",
        "tool": f"onnxruntime {ort.__version__} quantize_static",
    }
    result["calibration"] = {"source": images.source, "images": len(images.calibration), "method": "MinMax"}
    result["quantized_from"] = {"version": version, "val_accuracy": metadata.get("val_accuracy")}
    if "int8_accuracy" in comparison:
        result["val_accuracy"] = comparison["int8_accuracy"] / 100.0
    return result


def quantize_model(settings: QuantizeSettings) -> tuple[Path, dict[str, Any]]:
    """Quantize `settings.model`, check it, publish it as the next version; return it and the report."""
    version_dir = settings.model
    source = version_dir / MODEL_FILENAME
    if not source.is_file():
        raise FileNotFoundError(
            f"{source} does not exist; --model takes a version directory, e.g. models/digits/1"
        )
    metadata = read_metadata(source)
    if metadata.get("precision", "fp32") != "fp32":
        raise ValueError(
            f"{source} is already {metadata['precision']}; quantize the FP32 version it came from"
        )
    started = time.perf_counter()
    images = check_images(version_dir, eval_spec_from_metadata(metadata), settings)
    prepared_at = time.perf_counter()
    staging = Path(tempfile.mkdtemp(prefix=".quantize-", dir=version_dir.parent))
    try:
        target = staging / MODEL_FILENAME
        with tempfile.TemporaryDirectory(prefix="work-", dir=staging) as work:
            quantize_file(source, target, images.calibration, Path(work))
        quantized_at = time.perf_counter()
        comparison = compare(source, target, images)
        compared_at = time.perf_counter()
        sizes = {"fp32": source.stat().st_size, "int8": target.stat().st_size}
        report: dict[str, Any] = {
            "source": str(source),
            "calibration": {"source": images.source, "images": len(images.calibration)},
            "comparison": comparison,
            "limits": {
                "max_accuracy_drop": settings.max_accuracy_drop,
                "min_agreement": settings.min_agreement,
            },
            "bytes": sizes,
            "seconds": {
                "load_images": round(prepared_at - started, 2),
                "quantize": round(quantized_at - prepared_at, 2),
                "compare": round(compared_at - quantized_at, 2),
            },
        }
        logger.info("FP32 vs INT8: %s", json.dumps(comparison))
        check_gate(comparison, settings)
        proto = onnx.load(str(target))
        onnx.helper.set_model_props(
            proto, {METADATA_KEY: json.dumps(int8_metadata(metadata, version_dir.name, images, comparison))}
        )
        onnx.save_model(proto, str(target), save_as_external_data=False)
        sizes["int8"] = target.stat().st_size
        (staging / REPORT_FILENAME).write_text(json.dumps(report, indent=2) + "\n")
        staging.chmod(0o755)  # mkdtemp makes it 0700; a version is as readable as any other
        published = publish_version(staging, version_dir.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    report["published"] = str(published)
    return published, report
