"""Where the server's CPU goes: py-spy samples of a running server, summed into named buckets.

Optional (`python -m benchmarks --profile`, needs `pip install py-spy`): py-spy samples every Python
thread of the server without stopping it; each on-CPU stack is put into the first bucket one of its
frames matches (decode, ORT, multipart parsing, JSON, batching, …). ONNX Runtime's own worker threads
are native, not Python, so py-spy cannot see them: their share is the process CPU (from psutil) minus
what the Python threads used, reported as `onnxruntime worker threads (native)`.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SAMPLE_RATE_HZ = 100

# (bucket, substrings of a frame that put a stack in it), checked in order: specific before generic.
BUCKETS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("onnxruntime session.run (calling thread)", ("onnxruntime_inference_collection.py", "runtime.py")),
    ("image decode + preprocess", ("preprocessing.py", "PIL/")),
    ("multipart parsing", ("python_multipart", "formparsers.py", "datastructures.py")),
    ("JSON + response", ("json/", "encoders.py", "responses.py", "rank (")),
    ("prometheus metrics", ("prometheus_client",)),
    ("batching", ("batching.py",)),
    ("HTTP server (uvicorn/starlette/fastapi)", ("uvicorn/", "starlette/", "fastapi/", "httptools")),
    ("asyncio event loop", ("asyncio/", "uvloop")),
)
OTHER = "other Python"
NATIVE_ORT = "onnxruntime worker threads (native)"


def py_spy_path() -> str | None:
    """The py-spy executable next to this interpreter or on PATH, if installed."""
    import sys

    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.is_file() else shutil.which("py-spy")


class PySpyRecorder:
    """`async with PySpyRecorder(pid, seconds, path):` samples the server while the block runs."""

    def __init__(self, pid: int, duration_s: float, output: Path) -> None:
        executable = py_spy_path()
        if executable is None:
            raise RuntimeError("--profile needs py-spy: install it with `.venv/bin/pip install py-spy`")
        self._command = [
            executable,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(max(1, round(duration_s))),
            "--rate",
            str(SAMPLE_RATE_HZ),
            "--format",
            "raw",
            "--nonblocking",  # never pause the server: the figures being profiled stay honest
            "--output",
            str(output),
        ]
        self.output = output
        self._process: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> PySpyRecorder:
        self._process = await asyncio.create_subprocess_exec(
            *self._command, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._process is None:
            return
        _, stderr = await self._process.communicate()
        if self._process.returncode != 0:
            log.warning(
                "py-spy failed (%s): %s", self._process.returncode, stderr.decode(errors="replace")[-500:]
            )


def bucket_of(stack: str) -> str:
    """The bucket of one collapsed stack (`frame;frame;…`, root first)."""
    for name, patterns in BUCKETS:
        if any(pattern in stack for pattern in patterns):
            return name
    return OTHER


def summarize(raw: str, *, rate_hz: int, images: int, process_cpu_s: float | None) -> dict[str, Any]:
    """CPU milliseconds per image by bucket from py-spy's raw output (`stack count` per line)."""
    samples: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            samples[bucket_of(stack)] += int(count)
    python_cpu_s = sum(samples.values()) / rate_hz
    cpu_s = {name: count / rate_hz for name, count in samples.items()}
    if process_cpu_s is not None and process_cpu_s > python_cpu_s:
        cpu_s[NATIVE_ORT] = process_cpu_s - python_cpu_s
    total = sum(cpu_s.values())
    per_image = {
        name: {
            "cpu_ms_per_image": round(1000 * seconds / images, 2) if images else None,
            "share": round(seconds / total, 3) if total else None,
        }
        for name, seconds in sorted(cpu_s.items(), key=lambda item: -item[1])
    }
    return {"images": images, "cpu_s": round(total, 2), "buckets": per_image}
