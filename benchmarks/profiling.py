"""Where the server's CPU goes: py-spy samples of a running server, summed into named buckets.

Taken by every `python -m benchmarks` run unless `--no-profile` (py-spy is in the dev extra; without
it the run says so and skips the profile). py-spy samples every Python thread of the server without
stopping it; each stack is put into the first bucket one of its frames matches (decode, ORT,
multipart parsing, JSON, batching, …). The kernel's per-thread CPU times are then split by those
samples, so the result is CPU time, not sample counts. ONNX Runtime's own pool threads are native,
invisible to py-spy, and get their own bucket.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
from collections import Counter, defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SAMPLE_RATE_HZ = 100

ORT_CALLING = "onnxruntime session.run (calling thread)"
DECODE = "image decode + preprocess"
# (bucket, substrings of a frame that put a stack in it), checked in order: specific before generic.
BUCKETS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (ORT_CALLING, ("onnxruntime_inference_collection.py", "runtime.py")),
    (DECODE, ("preprocessing.py", "PIL/")),
    (
        "multipart parsing",
        ("python_multipart", "service/transport/multipart.py", "formparsers.py", "datastructures.py"),
    ),
    ("JSON + response", ("json/", "encoders.py", "responses.py", "_ranked (")),
    ("prometheus metrics", ("prometheus_client",)),
    ("batching", ("batching.py",)),
    ("HTTP server (uvicorn/starlette/fastapi)", ("uvicorn/", "starlette/", "fastapi/", "httptools")),
    ("asyncio event loop", ("asyncio/", "uvloop")),
)
OTHER = "other Python"
NATIVE_ORT = "native threads (ONNX Runtime intra-op pool)"
HTTP_PATH = (*(name for name, _ in BUCKETS if name not in (ORT_CALLING, DECODE)), OTHER)
"""The buckets that make up "HTTP + framework + JSON": everything but ONNX Runtime and decode."""
_THREAD = re.compile(r"^thread \((\d+)\)")
_WORK = frozenset({ORT_CALLING, DECODE})
_HAND_OFF = frozenset({"asyncio event loop", OTHER})


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
            raise RuntimeError(
                "the profile needs py-spy: install it with `.venv/bin/pip install py-spy` "
                "(or skip it with --no-profile)"
            )
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
            "--threads",  # OS thread ids, to split each thread's kernel-measured CPU time
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


def _samples_by_thread(raw: str) -> dict[int, Counter[str]]:
    """py-spy `--threads` raw lines (`thread (TID): Name;frame;… count`) → samples per bucket per tid."""
    by_thread: dict[int, Counter[str]] = {}
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        match = _THREAD.match(stack)
        if match is None or not count.isdigit():
            continue
        by_thread.setdefault(int(match.group(1)), Counter())[bucket_of(stack)] += int(count)
    return by_thread


def summarize(raw: str, *, thread_cpu_s: Mapping[int, float], images: int) -> dict[str, Any]:
    """CPU milliseconds per image by bucket.

    Each Python thread's measured CPU time (`thread_cpu_s`, by OS thread id, from the kernel) is split
    over buckets in proportion to that thread's py-spy samples. py-spy counts a thread that is
    runnable but waiting for a core as active, so raw sample counts overstate busy threads on a
    crowded machine; the kernel's CPU time does not. Threads py-spy never saw are native (ONNX
    Runtime's intra-op pool) and form their own bucket.

    In a worker thread (one with decode or session.run samples), samples in the event-loop and
    "other" buckets are its hand-off and wait: handing a result back to the loop
    (`call_soon_threadsafe` inside `Future.set_result`), waiting for the next job or for the GIL.
    They are left out of that thread's split, so its CPU goes to the work it exists for; counted as
    they were, they put ~1 ms of each image's decode into the HTTP figure.
    """
    samples = _samples_by_thread(raw)
    cpu_s: dict[str, float] = defaultdict(float)
    for tid, seconds in thread_cpu_s.items():
        counts = samples.get(tid)
        if not counts:
            cpu_s[NATIVE_ORT if seconds > 0 else OTHER] += seconds
            continue
        if counts.keys() & _WORK:
            counts = Counter({name: n for name, n in counts.items() if name not in _HAND_OFF}) or counts
        total = sum(counts.values())
        for name, count in counts.items():
            cpu_s[name] += seconds * count / total
    total_s = sum(cpu_s.values())
    buckets = {
        name: {
            "cpu_ms_per_image": round(1000 * seconds / images, 2) if images else None,
            "share": round(seconds / total_s, 3) if total_s else None,
        }
        for name, seconds in sorted(cpu_s.items(), key=lambda item: -item[1])
        if seconds > 0
    }
    return {"images": images, "cpu_s": round(total_s, 2), "buckets": buckets}
