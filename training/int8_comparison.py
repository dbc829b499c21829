"""FP32 vs INT8 on the same images: top-1 agreement, accuracy, divergence, and images/s on this CPU."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from modelcontract import INPUT_NAME, OUTPUT_NAME, softmax
from training.calibration import CheckImages

CONFIDENT_PROBABILITY = 0.3
"""FP32 top-1 softmax probability from which an image counts in `confident_top1_agreement`."""
THROUGHPUT_BATCHES = (1, 8)
THROUGHPUT_THREADS = 2
"""ONNX Runtime intra-op threads of the throughput check: this project's 2-core CPU target."""
THROUGHPUT_ROUNDS = 3
_BATCH = 32
"""Images per inference batch of the comparison."""


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
    p_fp32 = softmax(_logits(fp32, images.evaluation))
    p_int8 = softmax(_logits(int8, images.evaluation))
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
