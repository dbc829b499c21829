"""The INT8 variant of a published model: static QDQ quantization, checked, published as the next version.

`quantize_model` reads `models/<name>/<version>/model.onnx`, calibrates ONNX Runtime's static quantizer
(`training.qdq`) on real images preprocessed by the model's own eval transform, rebuilt from its
metadata (`training.calibration`), compares FP32 and INT8 on held-out images
(`training.int8_comparison`) and publishes the INT8 file as `models/<name>/<next version>/` only when
the drop stays within the limit. Everything is written into a hidden staging directory first and moved
into place with one rename (`modelcontract.publish_version`), so a refused or failed run leaves nothing.
The report (`quantize.json`) adds the sizes and, unless skipped, FP32 vs INT8 images/s on this CPU.

The feature-map output is dropped (the head's weights exist only quantized). The embedding output is
kept when the INT8 graph still gives it as declared: [N, embedding_size], finite, at unit length when
the metadata says so (the quantizer leaves the final division in float, so it does; `embedding_check`
proves it per file and drops the output, metadata included, if not). INT8 embeddings are what the INT8
head reads, a space of their own like every version's; the report gives their cosine similarity to
FP32's for information, not as a gate: the logits gate already bounds the damage.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from modelcontract import FLOAT32, INPUT_NAME, MODEL_FILENAME, ModelMetadata, l2_normalize, publish_version
from training.calibration import CheckImages, check_images
from training.feature_output import drop_features_output, drop_output
from training.int8_comparison import compare, throughput
from training.modelfile import read_metadata, set_metadata
from training.qdq import quantize_file

logger = logging.getLogger(__name__)

REPORT_FILENAME = "quantize.json"
EMBEDDING_CHECK_IMAGES = 64
"""Evaluation images the INT8 embedding is checked on (the first ones; the check is not a benchmark)."""
UNIT_NORM_TOLERANCE = 1e-3
"""Largest allowed |L2 norm - 1| of an INT8 embedding row the metadata declares normalized."""


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
    metadata: ModelMetadata, settings: QuantizeSettings, images: CheckImages, comparison: dict[str, Any]
) -> ModelMetadata:
    """The FP32 metadata with what changed: precision, calibration and the INT8 accuracy."""
    quantization = {
        "format": "QDQ",
        "activations": "uint8 per-tensor",
        "weights": "per-channel: int8 7-bit (Conv, Gemm), int8 8-bit (depthwise Conv), "
        f"uint8 8-bit (the first {settings.full_range_layers} other Conv/Gemm)",
        "full_range_layers": settings.full_range_layers,
        "tool": f"onnxruntime {ort.__version__} quantize_static",
    }
    extra = {
        **metadata.extra,
        "quantization": quantization,
        "calibration": {"source": images.source, "images": len(images.calibration), "method": "MinMax"},
        "quantized_from": {"version": settings.model.name, "val_accuracy": metadata.val_accuracy},
    }
    accuracy = comparison["int8_accuracy"] / 100.0 if "int8_accuracy" in comparison else metadata.val_accuracy
    # The INT8 graph keeps the head's weights only quantized, so it offers no class activation maps
    # (`quantize_model` drops the feature-map output too).
    return dataclasses.replace(
        metadata,
        precision="int8",
        val_accuracy=accuracy,
        extra=extra,
        explain_output=None,
        explain_weights=None,
    )


def _embeddings(session: ort.InferenceSession, name: str, images: np.ndarray) -> np.ndarray:
    return np.asarray(session.run([name], {INPUT_NAME: images})[0])


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def embedding_check(fp32: Path, int8: Path, metadata: ModelMetadata, images: np.ndarray) -> dict[str, Any]:
    """Whether the INT8 file's embedding output is still what `metadata` declares, on up to
    `EMBEDDING_CHECK_IMAGES` of `images`: {"kept": True, cosine similarity to FP32's} or
    {"kept": False, "reason": ...}."""
    name, size = str(metadata.embedding_output), metadata.embedding_size
    sample = np.ascontiguousarray(images[:EMBEDDING_CHECK_IMAGES], dtype=np.float32)
    session = _session(int8)
    if name not in {output.name for output in session.get_outputs()}:
        return {"kept": False, "reason": f"the INT8 graph has no output {name!r}"}
    rows = _embeddings(session, name, sample)
    if rows.shape != (len(sample), size) or not np.isfinite(rows).all():
        return {"kept": False, "reason": f"INT8 {name!r} rows are {list(rows.shape)} or not finite"}
    worst = float(np.abs(np.linalg.norm(rows.astype(np.float64), axis=1) - 1.0).max())
    if metadata.embedding_normalized and worst > UNIT_NORM_TOLERANCE:
        return {"kept": False, "reason": f"INT8 {name!r} rows are up to {worst:.3g} off unit length"}
    reference = _embeddings(_session(fp32), name, sample)
    cosine = (l2_normalize(rows) * l2_normalize(reference)).sum(axis=1)
    return {
        "kept": True,
        "images": len(sample),
        "mean_cosine_to_fp32": round(float(cosine.mean()), 4),
        "min_cosine_to_fp32": round(float(cosine.min()), 4),
    }


def _without_embedding(proto: onnx.ModelProto, metadata: ModelMetadata) -> ModelMetadata:
    drop_output(proto, str(metadata.embedding_output))
    return dataclasses.replace(
        metadata, embedding_output=None, embedding_size=None, embedding_normalized=None
    )


def quantize_model(settings: QuantizeSettings) -> tuple[Path, dict[str, Any]]:
    """Quantize `settings.model`, check it, publish it as the next version; return it and the report."""
    version_dir = settings.model
    source = version_dir / MODEL_FILENAME
    if not source.is_file():
        raise FileNotFoundError(
            f"{source} does not exist; --model takes a version directory, e.g. models/digits/1"
        )
    metadata = read_metadata(source)
    if metadata.precision != "fp32":
        raise ValueError(f"{source} is already {metadata.precision}; quantize the FP32 version it came from")
    if metadata.input_dtype != FLOAT32:
        # Calibration, the FP32/INT8 comparison and the throughput check all feed normalized float32
        # rows; a uint8 graph would need each of them taught the pixels, for a combination (INT8 weights
        # on a GPU-bound input) that serves no one yet.
        raise ValueError(
            f"{source} takes {metadata.input_dtype} input, which quantize does not handle; export the model "
            "with --input-dtype float32 (the default) and quantize that version"
        )
    started = time.perf_counter()
    images = check_images(
        version_dir, metadata.eval_spec, settings.calibration, settings.calibration_images, settings.seed
    )
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
        drop_features_output(proto)
        published_metadata = int8_metadata(metadata, settings, images, comparison)
        if metadata.has_embedding:
            report["embedding"] = embedding_check(source, target, metadata, images.evaluation)
            if not report["embedding"]["kept"]:
                logger.warning("INT8 offers no embedding: %s", report["embedding"]["reason"])
                published_metadata = _without_embedding(proto, published_metadata)
        set_metadata(proto, published_metadata)
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
