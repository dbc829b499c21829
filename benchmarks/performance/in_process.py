"""The in-process rows of a run: the FP32 ceiling and the INT8 rows, measured with no server alive."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from benchmarks.common.corpus import Photo
from benchmarks.performance.ceiling import InferenceSession, measure_ceiling
from benchmarks.performance.int8 import Int8Variant, measure_in_process
from benchmarks.performance.plan import BenchPlan
from benchmarks.performance.subjects import RunConfig, ServedModel
from service.inference.preprocessing import ImagePreprocessor
from service.models.runtime import load_model
from service.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")


def in_worker_thread(function: Callable[[], T]) -> T:
    """Run `function` in a thread of its own and return its result.

    The service's `load_model` lowers the calling thread's priority (nice 10, for its compute
    threads); called from the main thread it would leave the load generator of every later level
    at that priority.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="in-process") as pool:
        return pool.submit(function).result()


def run_in_process(
    config: RunConfig,
    model: ServedModel,
    photos: Sequence[Photo],
    plan: BenchPlan,
    *,
    int8: Int8Variant | None,
    not_measured: dict[str, str],
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The FP32 ceiling, then the INT8 rows at the configurations it chose (None without a variant)."""
    # Sessions are built exactly as the service builds them, from the same settings.
    overrides: dict[str, Any] = {
        key.removeprefix("CONVSERVE_").lower(): value for key, value in config.service_env.items()
    }
    settings = Settings(**overrides)

    def load(path: Path, intra_op_threads: int) -> InferenceSession:
        threads = intra_op_threads or settings.intra_op_threads
        return load_model(path, list(settings.providers), threads).session

    onnx_model = load_model(model.path, list(settings.providers), settings.intra_op_threads)
    preprocess = ImagePreprocessor.from_metadata(onnx_model.metadata)
    log.info("ceiling: in-process pipeline on %s (provider %s)", model.path, onnx_model.active_provider)
    result = measure_ceiling(
        lambda threads: load(model.path, threads), onnx_model.input_name, preprocess, photos, plan.ceiling
    )
    result["provider"] = onnx_model.active_provider
    result["service_intra_op_threads"] = settings.intra_op_threads
    if int8 is None:
        return result, None
    try:
        rows = measure_in_process(
            load,
            model.path,
            int8.path / model.path.name,
            input_name=onnx_model.input_name,
            preprocess=preprocess,
            photos=photos,
            fp32_in_process=result,
            plan=plan.ceiling,
        )
    except Exception as error:  # whatever ONNX Runtime makes of the INT8 file, keep the FP32 figures
        log.exception("int8: the in-process measurement failed")
        not_measured["int8 in process"] = f"{type(error).__name__}: {error}"[:300]
        return result, None
    return result, rows
