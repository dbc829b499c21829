"""Bucketing py-spy stacks into where the server's CPU goes."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from pathlib import Path

import onnxruntime as ort
import pytest

from benchmarks.performance.profiling import BUCKETS, NATIVE_ORT, ORT_CALLING, bucket_of, summarize
from modelcontract.transform import EvalTransform
from service.inference.batching import DynamicBatcher
from service.inference.predictor import Predictor
from service.inference.preprocessing import ImagePreprocessor
from service.models.runtime import OnnxModel
from service.transport import middleware, multipart

# Shapes of real py-spy raw lines from the service (root first, `function (file:line)` frames).
DECODE = (
    "_bootstrap (threading.py:1002);run (concurrent/futures/thread.py:58);"
    "_preprocess_one (service/inference/predictor.py:101);decode (service/inference/preprocessing.py:103);"
    "load (PIL/ImageFile.py:425)"
)
ORT = (
    "_bootstrap (threading.py:1002);run (concurrent/futures/thread.py:58);"
    "_infer_batch (service/inference/batching.py:300);run (service/models/runtime.py:120);"
    "run (onnxruntime/capi/onnxruntime_inference_collection.py:287)"
)
MULTIPART = (
    "run (asyncio/runners.py:118);run_asgi (uvicorn/protocols/http/httptools_impl.py:422);"
    "parse (starlette/formparsers.py:250);write (python_multipart/multipart.py:1100)"
)
EVENT_LOOP = "run (asyncio/runners.py:118);_run_once (asyncio/base_events.py:1900)"


@pytest.mark.parametrize(
    ("stack", "bucket"),
    [
        (DECODE, "image decode + preprocess"),
        (ORT, "onnxruntime session.run (calling thread)"),
        (MULTIPART, "multipart parsing"),
        (EVENT_LOOP, "asyncio event loop"),
        ("main (somewhere/else.py:1)", "other Python"),
    ],
)
def test_stacks_land_in_the_bucket_of_their_most_specific_frame(stack: str, bucket: str) -> None:
    assert bucket_of(stack) == bucket


def test_each_threads_kernel_cpu_time_is_split_by_its_own_samples() -> None:
    raw = (
        f"thread (11): convserve-decode_0;{DECODE} 300\n"
        f"thread (11): convserve-decode_0;{MULTIPART} 100\n"
        f"thread (12): convserve-infer_0;{ORT} 500\n"
    )
    # Thread 11 used 4 s (3/4 decode, 1/4 multipart), thread 12 used 5 s, and thread 13, which py-spy
    # never saw (a native ONNX Runtime pool thread), 3 s. 500 images.
    summary = summarize(raw, thread_cpu_s={11: 4.0, 12: 5.0, 13: 3.0}, images=500)
    buckets = summary["buckets"]
    assert buckets["image decode + preprocess"]["cpu_ms_per_image"] == 6.0
    assert buckets["multipart parsing"]["cpu_ms_per_image"] == 2.0
    assert buckets["onnxruntime session.run (calling thread)"]["cpu_ms_per_image"] == 10.0
    assert buckets[NATIVE_ORT]["cpu_ms_per_image"] == 6.0
    assert summary["cpu_s"] == 12.0
    assert sum(b["share"] for b in buckets.values()) == pytest.approx(1.0, abs=0.01)


def test_a_worker_threads_hand_off_and_wait_samples_count_as_its_work() -> None:
    hand_off = (
        "_bootstrap (threading.py:1002);run (concurrent/futures/thread.py:58);"
        "set_result (asyncio/futures.py:200);_call_set_state (asyncio/futures.py:390)"
    )
    waiting = "_bootstrap (threading.py:1002);_worker (concurrent/futures/thread.py:90)"
    raw = (
        f"thread (11): convserve-decode_0;{DECODE} 300\n"
        f"thread (11): convserve-decode_0;{hand_off} 80\n"
        f"thread (11): convserve-decode_0;{waiting} 20\n"
        f"thread (14): MainThread;{EVENT_LOOP} 50\n"
        f"thread (14): MainThread;{MULTIPART} 50\n"
    )
    # The decode thread's 3 s are all decode; the event loop thread keeps its own split.
    buckets = summarize(raw, thread_cpu_s={11: 3.0, 14: 2.0}, images=1000)["buckets"]
    assert buckets["image decode + preprocess"]["cpu_ms_per_image"] == 3.0
    assert buckets["asyncio event loop"]["cpu_ms_per_image"] == 1.0
    assert buckets["multipart parsing"]["cpu_ms_per_image"] == 1.0
    assert "other Python" not in buckets


def _frame(function: Callable[..., object]) -> str:
    """`name (path:line)` of a function as py-spy shows it: the file relative to its sys.path entry."""
    code = function.__code__
    file = Path(code.co_filename).resolve()
    entries = sorted({Path(entry).resolve() for entry in sys.path if entry}, key=lambda p: -len(p.parts))
    short = next(file.relative_to(entry) for entry in entries if file.is_relative_to(entry))
    return f"{code.co_name} ({short.as_posix()}:{code.co_firstlineno})"


def _stack(*functions: Callable[..., object]) -> str:
    return ";".join(["thread (1): worker", *(_frame(function) for function in functions)])


@pytest.mark.parametrize(
    ("functions", "bucket"),
    [
        ((DynamicBatcher._infer_batch, OnnxModel.run, ort.InferenceSession.run), ORT_CALLING),
        ((ImagePreprocessor.__call__, ImagePreprocessor._decode), "image decode + preprocess"),
        ((EvalTransform.__call__,), "image decode + preprocess"),
        ((multipart._Collector.on_header_value,), "multipart parsing"),
        ((Predictor.ranked,), "JSON + response"),
        ((DynamicBatcher._take_batch,), "batching"),
        ((middleware.RequestContextMiddleware.__call__,), "HTTP server (uvicorn/starlette/fastapi)"),
        ((asyncio.BaseEventLoop.run_forever,), "asyncio event loop"),
    ],
)
def test_the_services_own_functions_land_in_their_buckets(
    functions: tuple[Callable[..., object], ...], bucket: str
) -> None:
    # Stacks made of the installed code's real files and names: when a module moves, this still holds
    # (the buckets follow the module); when one is renamed away, importing the profiler fails instead.
    assert bucket_of(_stack(*functions)) == bucket


def test_every_bucket_area_is_a_file_or_folder_that_exists() -> None:
    roots = [Path(entry).resolve() for entry in sys.path if entry]
    for name, areas in BUCKETS:
        for area in areas:
            assert any((root / area.path).exists() for root in roots), (name, area)
