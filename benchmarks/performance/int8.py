"""The INT8 variant the benchmark serves, and its in-process rows.

The variant comes from `python -m training quantize`, run as a subprocess on a copy of the FP32
version in a temporary repository: quantizing in place would publish the next version into the user's
`models/`, and `make serve` would then serve INT8 as the latest. The run passes `--min-agreement 0`
and an accuracy limit no model can exceed, so it always gets a variant and records what quantization
cost; whether a model may ship as INT8 is the quantize command's gate, not the benchmark's.
`--int8-model DIR` uses an existing INT8 version instead.

In process, INT8 is measured at the configurations the FP32 grid chose: ONNX Runtime alone at the best
FP32 batch size and thread count (FP32 measured again right beside it, so the pair shares conditions),
and the decode-overlapped pipeline at the FP32 ceiling's configuration.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common.corpus import Photo
from benchmarks.performance.ceiling import (
    CeilingPlan,
    InferenceSession,
    Preprocess,
    measure_ort_only,
    measure_pipeline,
)
from modelcontract import MODEL_FILENAME, complete_versions

log = logging.getLogger(__name__)

QUANTIZE_TIMEOUT_S = 1800.0
"""Bound on the quantize command (about a minute for EfficientNet-Lite0 on 2 cores), seconds."""
REPORT_FILENAME = "quantize.json"
"""What the quantize command writes next to the INT8 model (its interface, not imported: no torch here)."""
SKIPPED_SUFFIXES = (".pt", ".pth")
"""Training checkpoints are not needed to quantize the ONNX file and can be large: not copied."""


class Int8Unavailable(RuntimeError):
    """No INT8 variant to measure; the message says why."""


@dataclass(frozen=True)
class Int8Variant:
    """An INT8 version directory `repository/name/version/` and how it came to be."""

    repository: Path
    name: str
    version: int
    source: str
    """"quantized" (by this run, in a temporary repository) or "given" (`--int8-model`)."""
    report: dict[str, Any] | None
    """The quantize command's `quantize.json` (comparison, calibration, sizes, timings), if present."""
    quantize_s: float | None = None
    """Wall time of the quantize command, seconds."""

    @property
    def path(self) -> Path:
        return self.repository / self.name / str(self.version)

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "name": self.name,
            "version": self.version,
            "path": str(self.path),
            "onnx_mb": round((self.path / MODEL_FILENAME).stat().st_size / 2**20, 1),
            "quantize_s": self.quantize_s,
            "quantize": self.report,
        }


def _read_report(version_dir: Path) -> dict[str, Any] | None:
    path = version_dir / REPORT_FILENAME
    if not path.is_file():
        return None
    report: dict[str, Any] = json.loads(path.read_text())
    return report


def given_variant(version_dir: Path) -> Int8Variant:
    """An existing INT8 version directory (`--int8-model`), e.g. models/efficientnet_lite0_imagenet/2."""
    version_dir = version_dir.resolve()
    if not (version_dir / MODEL_FILENAME).is_file() or not version_dir.name.isdigit():
        raise ValueError(
            f"--int8-model expects a version directory <repository>/<name>/<version>/ holding "
            f"{MODEL_FILENAME}, got {version_dir}"
        )
    return Int8Variant(
        version_dir.parent.parent,
        version_dir.parent.name,
        int(version_dir.name),
        "given",
        _read_report(version_dir),
    )


def quantize_copy(
    fp32_dir: Path,
    name: str,
    repository: Path,
    log_path: Path,
    *,
    cwd: Path,
    timeout_s: float = QUANTIZE_TIMEOUT_S,
) -> Int8Variant:
    """Copy `fp32_dir` to `repository/name/1/`, quantize it there, return the version it published."""
    source = repository.resolve() / name / "1"
    source.mkdir(parents=True)
    for item in fp32_dir.iterdir():
        if item.is_file() and item.suffix not in SKIPPED_SUFFIXES:
            shutil.copy2(item, source / item.name)
    command = [sys.executable, "-m", "training", "quantize", "--model", str(source)]
    command += ["--min-agreement", "0", "--max-accuracy-drop", "100"]
    log.info("int8: %s (log: %s)", " ".join(command[1:]), log_path)
    started = time.perf_counter()
    with log_path.open("wb") as output:
        try:
            completed = subprocess.run(
                command, cwd=cwd, stdout=output, stderr=subprocess.STDOUT, timeout=timeout_s, check=False
            )
        except subprocess.TimeoutExpired:
            raise Int8Unavailable(f"quantization took over {timeout_s:.0f} s (log: {log_path})") from None
    elapsed = round(time.perf_counter() - started, 1)
    if completed.returncode != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
        raise Int8Unavailable(f"quantize exited with {completed.returncode}: {' / '.join(tail)}")
    published = [version for version in complete_versions(source.parent) if version != 1]
    if not published:
        raise Int8Unavailable(f"quantize exited with 0 but published no version in {source.parent}")
    version_dir = source.parent / str(published[-1])
    log.info("int8: quantized in %.0f s: %s", elapsed, (_read_report(version_dir) or {}).get("comparison"))
    return Int8Variant(
        repository.resolve(), name, published[-1], "quantized", _read_report(version_dir), elapsed
    )


ModelLoader = Callable[[Path, int], InferenceSession]
"""(ONNX file, intra-op threads with 0 = the service's setting) → a session built like the service's."""


def measure_in_process(
    load: ModelLoader,
    fp32_file: Path,
    int8_file: Path,
    *,
    input_name: str,
    preprocess: Preprocess,
    photos: Sequence[Photo],
    fp32_in_process: Mapping[str, Any],
    plan: CeilingPlan,
) -> dict[str, Any]:
    """INT8 (and FP32 beside it) ONNX Runtime alone, and the INT8 pipeline at the FP32 ceiling's setup."""
    best = max(fp32_in_process["ort_only"], key=lambda entry: entry["img_per_s"])
    batch, threads = int(best["batch_size"]), int(best["intra_op_threads"])
    inputs = np.stack([preprocess(photo.data) for photo in photos])
    seconds = plan.seconds_per_measurement
    fp32_rate = measure_ort_only(load(fp32_file, threads), input_name, inputs, batch, seconds)
    int8_session = load(int8_file, threads)
    int8_rate = measure_ort_only(int8_session, input_name, inputs, batch, seconds)
    ceiling_threads = int(fp32_in_process["best_intra_op_threads"])
    ceiling = measure_pipeline(
        int8_session if ceiling_threads == threads else load(int8_file, ceiling_threads),
        input_name,
        preprocess,
        photos,
        batch_size=int(fp32_in_process["best_batch_size"]),
        seconds=plan.confirm_seconds,
        decode_threads=int(fp32_in_process["best_decode_threads"]),
    )
    result = {
        "batch_size": batch,
        "intra_op_threads": threads,
        "fp32_ort_alone_img_per_s": round(fp32_rate, 2),
        "int8_ort_alone_img_per_s": round(int8_rate, 2),
        "int8_ceiling_img_per_s": round(ceiling, 2),
        "ceiling_configuration": {
            "batch_size": fp32_in_process["best_batch_size"],
            "intra_op_threads": ceiling_threads,
            "decode_threads": fp32_in_process["best_decode_threads"],
        },
    }
    log.info("int8 in process: %s", result)
    return result
