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
The report (`quantize.json`) adds the sizes and, unless skipped, FP32 vs INT8 images/s on this CPU.
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
CONFIDENT_PROBABILITY = 0.3
"""FP32 top-1 softmax probability from which an image counts in `confident_top1_agreement`."""
THROUGHPUT_BATCHES = (1, 8)
THROUGHPUT_THREADS = 2
"""ONNX Runtime intra-op threads of the throughput check: this project's 2-core CPU target."""
THROUGHPUT_ROUNDS = 3
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
    full_range_layers: int = 4
    """The first this many Conv/Gemm layers that are not depthwise get full 8-bit weights (slower)."""
    throughput_seconds: float = 1.0
    """Seconds per round of the FP32 vs INT8 throughput check in the report; 0 skips it."""

    def __post_init__(self) -> None:
        if self.calibration_images < 1:
            raise ValueError(f"--calibration-images must be >= 1, got {self.calibration_images}")
        if self.full_range_layers < 0:
            raise ValueError(f"--full-range-layers must be >= 0, got {self.full_range_layers}")
        if self.throughput_seconds < 0:
            raise ValueError(f"--throughput-seconds must be >= 0 (0 skips), got {self.throughput_seconds}")


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
    return np.stack([np.asarray(transform(image.convert("RGB"))) for image in images])


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
        np.stack([np.asarray(calibration[i][0]) for i in range(len(calibration))]),
        np.stack([np.asarray(val[i][0]) for i in range(len(val))]),
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


def depthwise_weights(model: onnx.ModelProto) -> list[str]:
    """Weight initializers of the depthwise convolutions (one input channel per group)."""
    weights = {init.name: init for init in model.graph.initializer}
    names = []
    for node in model.graph.node:
        group = next((attr.i for attr in node.attribute if attr.name == "group"), 1)
        weight = weights.get(node.input[1]) if node.op_type == "Conv" else None
        if weight is not None and group > 1 and weight.dims[1] == 1:
            names.append(weight.name)
    return names


def _output_channel_axis(node: onnx.NodeProto) -> int:
    """The weight axis of the output channels: 0 for Conv and for Gemm with transB=1 (PyTorch's)."""
    trans_b = next((attr.i for attr in node.attribute if attr.name == "transB"), 0)
    return 1 if node.op_type == "Gemm" and not trans_b else 0


def weight_overrides(model: onnx.ModelProto, full_range_layers: int) -> dict[str, list[dict[str, Any]]]:
    """ORT `TensorQuantOverrides` for the weights that are not int8 in 7 bits (see `quantize_file`)."""
    depthwise = set(depthwise_weights(model))
    weights = {init.name for init in model.graph.initializer}
    layers = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm") and n.input[1] in weights]
    full = [n for n in layers if n.input[1] not in depthwise][:full_range_layers]
    overrides: dict[str, list[dict[str, Any]]] = {
        name: [{"axis": 0, "quant_type": QuantType.QInt8, "reduce_range": False}] for name in depthwise
    }
    for node in full:
        overrides[node.input[1]] = [
            {"axis": _output_channel_axis(node), "quant_type": QuantType.QUInt8, "reduce_range": False}
        ]
    return overrides


def quantize_file(
    source: Path, target: Path, calibration: np.ndarray, work: Path, full_range_layers: int = 4
) -> None:
    """Static QDQ quantization: uint8 activations (MinMax), per-channel weights in three kinds.

    The kinds suit ONNX Runtime's x86 kernels without VNNI (AVX2, this project's CPU). Measured on
    EfficientNet-Lite0 (ImageNet): mean KL divergence of the INT8 softmax from FP32's on the 56
    sample-photo views, and in-process images/s at batch 8 relative to FP32.
    - Most Conv/Gemm weights are int8 in 7 bits (U8S8, `reduce_range`). The U8S8 GEMM, the fastest
      (1.6-1.85x FP32), adds pairs of u8 x s8 products in int16 (VPMADDUBSW): full 8-bit weights
      saturate it (top-1 agreement 70 %), 7 bits cannot, but cost precision (KL 0.10).
    - The first `full_range_layers` Conv/Gemm layers that are not depthwise get uint8 weights in
      full 8 bits (U8U8: widened to int16 before multiplying, no saturation, but slower). The stem
      and the first projections are where 7 bits hurt most (KL 0.10 -> 0.032 with the first 4, at
      1.6-1.75x FP32); U8U8 everywhere gives KL 0.024 but only 1.25-1.35x FP32.
    - Depthwise Conv weights are int8 in full 8 bits: MLAS's u8s8 depthwise kernel accumulates in
      int32 and does not saturate (its uint8-weight depthwise kernel is 6x slower than FP32).
    On CPUs with VNNI (VPDPBUSD adds u8 x s8 products in int32) full-range U8S8 does not saturate
    and would be both the fastest and the most precise choice for every layer.
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
        extra_options={
            "TensorQuantOverrides": weight_overrides(onnx.load(str(prepared)), full_range_layers),
            # A dead channel (weights ~0 after BatchNorm folding) gets a weight scale so small that its
            # bias overflows int32 and is clipped (EfficientNet-Lite0's stem: 7.07 -> 0); ORT only
            # corrects that for symmetric int8 weights. A range >= 1e-3 keeps every bias within 0.002.
            "MinimumRealRange": 1e-3,
        },
    )


def _session(path: Path, threads: int | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _logits(path: Path, images: np.ndarray) -> np.ndarray:
    session = _session(path)
    return np.concatenate(
        [
            session.run([OUTPUT_NAME], {INPUT_NAME: images[i : i + _BATCH]})[0]
            for i in range(0, len(images), _BATCH)
        ]
    )


def _softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    result: np.ndarray = exp / exp.sum(axis=1, keepdims=True)
    return result


def _percent(hits: np.ndarray) -> float | None:
    return round(100.0 * float(hits.mean()), 2) if len(hits) else None


def compare(fp32: Path, int8: Path, images: CheckImages) -> dict[str, Any]:
    """FP32 vs INT8 on the evaluation images: top-1 agreement (%), accuracies (%) with labels.

    `top1_agreement` counts every image and is what `--min-agreement` gates. On photos unlike the
    training data FP32 itself is unsure (top-1 probability 0.05-0.2, top-2 nearly tied) and a tiny
    perturbation flips top-1, so the report adds the agreement on the images where FP32's top-1
    probability is at least `CONFIDENT_PROBABILITY`, whether FP32's top-1 is among INT8's top 5,
    and the mean KL divergence of the INT8 softmax from the FP32 one (nats): a continuous measure.
    """
    p_fp32 = _softmax(_logits(fp32, images.evaluation))
    p_int8 = _softmax(_logits(int8, images.evaluation))
    top_fp32, top_int8 = p_fp32.argmax(axis=1), p_int8.argmax(axis=1)
    agree = top_fp32 == top_int8
    confident = p_fp32.max(axis=1) >= CONFIDENT_PROBABILITY
    top5_int8 = np.argsort(-p_int8, axis=1)[:, :5]
    kl = (p_fp32 * (np.log(p_fp32 + 1e-12) - np.log(p_int8 + 1e-12))).sum(axis=1)
    result: dict[str, Any] = {
        "images": len(images.evaluation),
        "top1_agreement": _percent(agree),
        "confident_probability": CONFIDENT_PROBABILITY,
        "confident_images": int(confident.sum()),
        "confident_top1_agreement": _percent(agree[confident]),
        "fp32_top1_in_int8_top5": _percent((top5_int8 == top_fp32[:, None]).any(axis=1)),
        "mean_kl_divergence": round(float(kl.mean()), 4),
    }
    if images.labels is not None:
        result["fp32_accuracy"] = _percent(top_fp32 == images.labels)
        result["int8_accuracy"] = _percent(top_int8 == images.labels)
        result["accuracy_drop"] = round(result["fp32_accuracy"] - result["int8_accuracy"], 2)
    return result


def throughput(fp32: Path, int8: Path, images: np.ndarray, seconds: float) -> dict[str, Any]:
    """In-process ONNX Runtime images/s of both files at batch 1 and 8, on `THROUGHPUT_THREADS`.

    The two files take turns, batch size by batch size, for `THROUGHPUT_ROUNDS` rounds of `seconds`
    each, and the best round counts: on a shared machine other load only ever slows a run down, and
    interleaving exposes both files to the same load.
    """
    sessions = {"fp32": _session(fp32, THROUGHPUT_THREADS), "int8": _session(int8, THROUGHPUT_THREADS)}
    best = {name: dict.fromkeys(THROUGHPUT_BATCHES, 0.0) for name in sessions}
    for _ in range(THROUGHPUT_ROUNDS):
        for size in THROUGHPUT_BATCHES:
            batch = np.ascontiguousarray(np.resize(images, (size, *images.shape[1:])), dtype=np.float32)
            for name, session in sessions.items():
                session.run([OUTPUT_NAME], {INPUT_NAME: batch})  # warm-up: first runs allocate
                count, started, elapsed = 0, time.perf_counter(), 0.0
                while count == 0 or elapsed < seconds:
                    session.run([OUTPUT_NAME], {INPUT_NAME: batch})
                    count += size
                    elapsed = time.perf_counter() - started
                best[name][size] = max(best[name][size], count / elapsed)
    return {
        "images_per_second": {
            name: {str(size): round(rate, 1) for size, rate in rates.items()} for name, rates in best.items()
        },
        "int8_speedup": {
            str(size): round(best["int8"][size] / best["fp32"][size], 2) for size in THROUGHPUT_BATCHES
        },
        "intra_op_threads": THROUGHPUT_THREADS,
        "best_of_rounds": THROUGHPUT_ROUNDS,
        "seconds_per_round": seconds,
    }


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
            f"photo views ({comparison['confident_top1_agreement']}% of the {comparison['confident_images']} "
            f"where FP32's top-1 probability is >= {comparison['confident_probability']}), below "
            f"--min-agreement {settings.min_agreement} (all views); nothing was published"
        )


def int8_metadata(
    metadata: dict[str, Any], settings: QuantizeSettings, images: CheckImages, comparison: dict[str, Any]
) -> dict[str, Any]:
    """The FP32 metadata with what changed: precision, calibration and the INT8 accuracy."""
    result = dict(metadata)
    result["precision"] = "int8"
    result["quantization"] = {
        "format": "QDQ",
        "activations": "uint8 per-tensor",
        "weights": "per-channel: int8 7-bit (Conv, Gemm), int8 8-bit (depthwise Conv), "
        f"uint8 8-bit (the first {settings.full_range_layers} other Conv/Gemm)",
        "full_range_layers": settings.full_range_layers,
        "tool": f"onnxruntime {ort.__version__} quantize_static",
    }
    result["calibration"] = {"source": images.source, "images": len(images.calibration), "method": "MinMax"}
    result["quantized_from"] = {"version": settings.model.name, "val_accuracy": metadata.get("val_accuracy")}
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
            quantize_file(source, target, images.calibration, Path(work), settings.full_range_layers)
        quantized_at = time.perf_counter()
        comparison = compare(source, target, images)
        compared_at = time.perf_counter()
        logger.info("FP32 vs INT8: %s", json.dumps(comparison))
        check_gate(comparison, settings)
        speed = None
        if settings.throughput_seconds > 0:
            speed = throughput(source, target, images.evaluation, settings.throughput_seconds)
            logger.info("FP32 vs INT8 throughput: %s", json.dumps(speed))
        measured_at = time.perf_counter()
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
            "throughput": speed,
            "seconds": {
                "load_images": round(prepared_at - started, 2),
                "quantize": round(quantized_at - prepared_at, 2),
                "compare": round(compared_at - quantized_at, 2),
                "throughput": round(measured_at - compared_at, 2),
            },
        }
        proto = onnx.load(str(target))
        onnx.helper.set_model_props(
            proto, {METADATA_KEY: json.dumps(int8_metadata(metadata, settings, images, comparison))}
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
