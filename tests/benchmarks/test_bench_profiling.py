"""Bucketing py-spy stacks into where the server's CPU goes."""

from __future__ import annotations

import pytest

from benchmarks.profiling import NATIVE_ORT, bucket_of, summarize

# Shapes of real py-spy raw lines from the service (root first, `function (file:line)` frames).
DECODE = (
    "_bootstrap (threading.py:1002);run (concurrent/futures/thread.py:58);"
    "_preprocess_one (service/predictor.py:101);decode (service/preprocessing.py:103);"
    "load (PIL/ImageFile.py:425)"
)
ORT = (
    "_bootstrap (threading.py:1002);run (concurrent/futures/thread.py:58);"
    "_infer_batch (service/batching.py:300);run (service/runtime.py:120);"
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


def test_summary_gives_cpu_ms_per_image_and_attributes_the_rest_to_native_ort_threads() -> None:
    raw = f"{DECODE} 300\n{ORT} 500\n{MULTIPART} 200\n"
    # 1000 samples at 100 Hz = 10 s of Python-thread CPU; the process used 16 s in total.
    summary = summarize(raw, rate_hz=100, images=500, process_cpu_s=16.0)
    buckets = summary["buckets"]
    assert buckets["image decode + preprocess"]["cpu_ms_per_image"] == 6.0
    assert buckets["onnxruntime session.run (calling thread)"]["cpu_ms_per_image"] == 10.0
    assert buckets["multipart parsing"]["cpu_ms_per_image"] == 4.0
    assert buckets[NATIVE_ORT]["cpu_ms_per_image"] == 12.0
    assert summary["cpu_s"] == 16.0
    assert sum(b["share"] for b in buckets.values()) == pytest.approx(1.0, abs=0.01)
