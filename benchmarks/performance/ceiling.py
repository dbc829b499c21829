"""The in-process ceiling: the most this machine can do with the served model, with no HTTP at all.

Three measurements on the same JPEG bytes the load generator sends, with the service's own decode and
preprocessing and an ONNX Runtime session built like the service's:

- single image: decode + preprocess + `session.run` on a batch of one, serially — the latency floor a
  request at concurrency 1 can approach;
- ONNX Runtime alone at several batch sizes and thread counts, on already-preprocessed inputs —
  which batch size the machine likes;
- the pipeline: a thread pool decodes and preprocesses while the main thread runs batches, so a core
  is not left idle during decoding (a serial loop understates the machine by ~40 % on two cores). It
  runs over a grid of batch sizes, ORT threads and decode threads; the best configurations are then
  measured again, several times, interleaved.

The ceiling is the best throughput of all those windows, not a typical one: on shared cores a single
window can lose a third of its throughput to a neighbour, and a ceiling taken from one unlucky window
is below what the service then measures. A ceiling must bound the service, so it takes the maximum and
reports the spread of its configuration's windows beside it; `benchmarks.performance.targets` declares
the run invalid when a server still beats it.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from benchmarks.common.corpus import Photo
from benchmarks.common.stats import latency_summary_ms
from modelcontract import OUTPUT_NAME

log = logging.getLogger(__name__)

Preprocess = Callable[[bytes], np.ndarray]
"""JPEG bytes → float32 CHW array, exactly as the service turns an upload into a model input."""


class InferenceSession(Protocol):
    """The slice of `onnxruntime.InferenceSession` used here."""

    def run(self, output_names: Any, input_feed: dict[str, np.ndarray]) -> list[np.ndarray]: ...


@dataclass(frozen=True)
class CeilingPlan:
    """How long and over which batch sizes to measure."""

    batch_sizes: Sequence[int]
    """Candidate batch sizes for ORT-alone and for the pipeline."""
    intra_op_threads: Sequence[int]
    """Candidate ONNX Runtime intra-op thread counts (0 = the service's setting)."""
    decode_threads: Sequence[int]
    """Candidate numbers of threads decoding and preprocessing in the pipeline."""
    single_image_runs: int
    """Serial single-image runs (over the corpus, repeated) for the latency percentiles."""
    seconds_per_measurement: float
    """Wall time of each ORT-alone and each pipeline measurement of the grid."""
    confirm_seconds: float
    """Wall time of each repeated measurement of the grid's best configurations."""
    confirm_configurations: int = 2
    """How many of the grid's best pipeline configurations are measured again (the grid's winner may
    only have had the luckiest window)."""
    confirm_repeats: int = 2
    """How many times each of them is measured again, interleaved, so drift on the shared cores
    reaches every configuration alike."""


LOGITS_ONLY = [OUTPUT_NAME]
"""What every run here fetches, as the service's plain requests do: exported graphs also output the
feature map and the embedding, which cost copies when fetched (~250 KB per image for the feature map)."""


def measure_single_image(
    session: InferenceSession, input_name: str, preprocess: Preprocess, photos: Sequence[Photo], runs: int
) -> dict[str, float | None]:
    """Serial decode + preprocess + batch-1 run; percentiles over `runs` images cycling the corpus."""
    for photo in photos[:2]:  # warm caches and lazy ORT allocations
        session.run(LOGITS_ONLY, {input_name: preprocess(photo.data)[np.newaxis]})
    durations = []
    for photo in itertools.islice(itertools.cycle(photos), runs):
        started = time.perf_counter()
        session.run(LOGITS_ONLY, {input_name: preprocess(photo.data)[np.newaxis]})
        durations.append(time.perf_counter() - started)
    summary = latency_summary_ms(durations)
    return {f"single_image_{key}": value for key, value in summary.items()}


def measure_ort_only(
    session: InferenceSession, input_name: str, inputs: np.ndarray, batch_size: int, seconds: float
) -> float:
    """Images per second of `session.run` alone on batches of `batch_size` preprocessed images."""
    repeats = -(-batch_size // len(inputs))
    batch = np.ascontiguousarray(np.concatenate([inputs] * repeats)[:batch_size])
    session.run(LOGITS_ONLY, {input_name: batch})
    images, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds or images == 0:
        session.run(LOGITS_ONLY, {input_name: batch})
        images += batch_size
    return images / elapsed


def measure_pipeline(
    session: InferenceSession,
    input_name: str,
    preprocess: Preprocess,
    photos: Sequence[Photo],
    *,
    batch_size: int,
    seconds: float,
    decode_threads: int,
) -> float:
    """Images per second with decoding in `decode_threads` threads overlapped with batched inference.

    Up to two batches of decodes are kept in flight ahead of the batch being run, enough to keep the
    inference thread fed without decoding far ahead.
    """
    cycle = itertools.cycle(photos)
    pending: deque[Future[np.ndarray]] = deque()
    with ThreadPoolExecutor(max_workers=decode_threads, thread_name_prefix="decode") as pool:

        def top_up() -> None:
            while len(pending) < 3 * batch_size:
                pending.append(pool.submit(preprocess, next(cycle).data))

        def next_batch() -> np.ndarray:
            top_up()
            rows = [pending.popleft().result() for _ in range(batch_size)]
            top_up()
            return np.stack(rows)

        session.run(LOGITS_ONLY, {input_name: next_batch()})  # warm-up batch, not timed
        images, started = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds or images == 0:
            session.run(LOGITS_ONLY, {input_name: next_batch()})
            images += batch_size
        for future in pending:
            future.cancel()
    return images / elapsed


SessionFactory = Callable[[int], InferenceSession]
"""Intra-op thread count (0 = the service's setting) → a session built exactly as the service builds it."""


def _pipeline_grid(
    session_factory: SessionFactory,
    input_name: str,
    preprocess: Preprocess,
    photos: Sequence[Photo],
    plan: CeilingPlan,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    inputs = np.stack([preprocess(photo.data) for photo in photos])
    ort_only, pipeline = [], []
    for threads in plan.intra_op_threads:
        session = session_factory(threads)
        for size in plan.batch_sizes:
            rate = measure_ort_only(session, input_name, inputs, size, plan.seconds_per_measurement)
            ort_only.append({"intra_op_threads": threads, "batch_size": size, "img_per_s": round(rate, 2)})
            for decoders in plan.decode_threads:
                rate = measure_pipeline(
                    session,
                    input_name,
                    preprocess,
                    photos,
                    batch_size=size,
                    seconds=plan.seconds_per_measurement,
                    decode_threads=decoders,
                )
                pipeline.append(
                    {
                        "intra_op_threads": threads,
                        "decode_threads": decoders,
                        "batch_size": size,
                        "img_per_s": round(rate, 2),
                    }
                )
                log.info("pipeline %s", pipeline[-1])
    return ort_only, pipeline


def _configuration(entry: Mapping[str, Any]) -> tuple[int, int, int]:
    return entry["intra_op_threads"], entry["decode_threads"], entry["batch_size"]


def _confirmations(
    session_factory: SessionFactory,
    input_name: str,
    preprocess: Preprocess,
    photos: Sequence[Photo],
    *,
    plan: CeilingPlan,
    pipeline: Sequence[Mapping[str, Any]],
) -> list[dict[str, Any]]:
    """The grid's best `confirm_configurations`, each measured `confirm_repeats` more times, interleaved."""
    ranked = sorted(pipeline, key=lambda entry: -entry["img_per_s"])[: max(0, plan.confirm_configurations)]
    sessions = {threads: session_factory(threads) for threads in {e["intra_op_threads"] for e in ranked}}
    rows = []
    for repeat in range(plan.confirm_repeats):
        for entry in ranked:
            threads, decoders, size = _configuration(entry)
            rate = measure_pipeline(
                sessions[threads],
                input_name,
                preprocess,
                photos,
                batch_size=size,
                seconds=plan.confirm_seconds,
                decode_threads=decoders,
            )
            rows.append(
                {
                    "intra_op_threads": threads,
                    "decode_threads": decoders,
                    "batch_size": size,
                    "repeat": repeat + 1,
                    "img_per_s": round(rate, 2),
                }
            )
            log.info("ceiling confirmation %s", rows[-1])
    return rows


def ceiling_spread(windows: Sequence[float]) -> dict[str, Any]:
    """How far apart the windows of one configuration were: min, max and (max - min) / max."""
    if not windows:
        return {"windows": 0, "min_img_per_s": None, "max_img_per_s": None, "relative_spread": None}
    low, high = min(windows), max(windows)
    return {
        "windows": len(windows),
        "min_img_per_s": round(low, 2),
        "max_img_per_s": round(high, 2),
        "relative_spread": round((high - low) / high, 3) if high > 0 else None,
    }


def measure_ceiling(
    session_factory: SessionFactory,
    input_name: str,
    preprocess: Preprocess,
    photos: Sequence[Photo],
    plan: CeilingPlan,
) -> dict[str, Any]:
    """All three measurements; `ceiling_img_per_s` is the best pipeline window, grid and repeats alike.

    The single-image latency uses the service's own thread setting (it is what a request at
    concurrency 1 gets); the grid also tries other intra-op thread counts, because on two cores the
    best split between decode threads and ORT threads is not obvious, and the ceiling must be the
    best the machine can do, not the best the service's current setting can do.
    """
    result: dict[str, Any] = measure_single_image(
        session_factory(0), input_name, preprocess, photos, plan.single_image_runs
    )
    ort_only, pipeline = _pipeline_grid(session_factory, input_name, preprocess, photos, plan)
    confirmations = _confirmations(
        session_factory, input_name, preprocess, photos, plan=plan, pipeline=pipeline
    )
    best = max([*pipeline, *confirmations], key=lambda entry: entry["img_per_s"])
    windows = [
        e["img_per_s"] for e in [*pipeline, *confirmations] if _configuration(e) == _configuration(best)
    ]
    spread = ceiling_spread(windows)
    log.info("ceiling: %.1f img/s with %s; its windows: %s", best["img_per_s"], best, spread)
    result.update(
        {
            "ort_only": ort_only,
            "ort_only_best_img_per_s": max(entry["img_per_s"] for entry in ort_only),
            "pipeline": pipeline,
            "confirmations": confirmations,
            "best_batch_size": best["batch_size"],
            "best_intra_op_threads": best["intra_op_threads"],
            "best_decode_threads": best["decode_threads"],
            "grid_best_img_per_s": max(entry["img_per_s"] for entry in pipeline),
            "ceiling_img_per_s": best["img_per_s"],
            "ceiling_spread": spread,
        }
    )
    return result
