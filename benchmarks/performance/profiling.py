"""Where the server's CPU goes: py-spy samples of a running server, summed into named buckets.

Taken by every `python -m benchmarks` run unless `--no-profile` (py-spy is in the dev extra; without
it the run says so and skips the profile). py-spy samples every Python thread of the server without
stopping it; each stack is put into the first bucket one of its frames belongs to (decode, ORT,
multipart parsing, JSON, batching, …). The kernel's per-thread CPU times are then split by those
samples, so the result is CPU time, not sample counts. ONNX Runtime's own pool threads are native,
invisible to py-spy, and get their own bucket.

A frame belongs to a bucket by its file, and the files of a bucket are those of imported modules and
packages (`service.inference.preprocessing`, the `service.transport` package, `onnxruntime`, …), not
names typed here: a module that moves is found where it went, and one that is renamed or removed
fails the import with its name instead of silently emptying its bucket.
"""

from __future__ import annotations

import asyncio
import importlib
import json as json_package
import logging
import re
import shutil
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import fastapi
import fastapi.encoders
import onnxruntime
import PIL
import prometheus_client
import python_multipart
import starlette
import starlette.datastructures
import starlette.formparsers
import starlette.responses
import uvicorn

import modelcontract.transform
import service.inference.batching
import service.inference.decodecost
import service.inference.preprocessing
import service.models.runtime
import service.protocols
import service.transport
import service.transport.multipart
from service.inference.predictor import Predictor

log = logging.getLogger(__name__)

SAMPLE_RATE_HZ = 100

ORT_CALLING = "onnxruntime session.run (calling thread)"
DECODE = "image decode + preprocess"
MULTIPART = "multipart parsing"
JSON = "JSON + response"
PROMETHEUS = "prometheus metrics"
BATCHING = "batching"
HTTP_SERVER = "HTTP server (uvicorn/starlette/fastapi)"
EVENT_LOOP = "asyncio event loop"
OTHER = "other Python"
NATIVE_ORT = "native threads (ONNX Runtime intra-op pool)"
BUCKET_NAMES = (ORT_CALLING, DECODE, MULTIPART, JSON, PROMETHEUS, BATCHING, HTTP_SERVER, EVENT_LOOP)
"""The buckets frames are matched against, in order: specific before generic."""
HTTP_PATH = (*(name for name in BUCKET_NAMES if name not in (ORT_CALLING, DECODE)), OTHER)
"""The buckets that make up "HTTP + framework + JSON": everything but ONNX Runtime and decode."""
_THREAD = re.compile(r"^thread \((\d+)\)")
_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>.+):\d+\)$")
_WORK = frozenset({ORT_CALLING, DECODE})
_HAND_OFF = frozenset({EVENT_LOOP, OTHER})


@dataclass(frozen=True)
class CodeArea:
    """Frames whose file is a module's file or lies in a package's folder (and, when `function` is
    set, whose function has that name): the frames of one piece of code, wherever it is installed."""

    path: str
    """The module's file or package's folder relative to its `sys.path` entry, as py-spy shows it:
    `service/inference/preprocessing.py`, `service/transport/`, `onnxruntime/`."""
    function: str | None = None

    def holds(self, function: str, file: str) -> bool:
        if self.function is not None and function != self.function:
            return False
        padded = "/" + file  # py-spy shows paths relative to their sys.path entry, or absolute
        return ("/" + self.path) in padded if self.path.endswith("/") else padded.endswith("/" + self.path)


def area_of(code: ModuleType | Callable[..., Any]) -> CodeArea:
    """The area of a module (its file), a package (its folder) or a function (its name in its file).

    Raises if the object's file is not where its dotted name says, e.g. a module loaded from a zip
    or a name re-exported elsewhere: such a bucket would silently match nothing."""
    if isinstance(code, ModuleType):
        module, function = code, None
    else:
        module, function = sys.modules[code.__module__], code.__code__.co_name
    dotted = module.__name__.replace(".", "/")
    is_package = hasattr(module, "__path__")
    path = f"{dotted}/" if is_package else f"{dotted}.py"
    file = Path(module.__file__ or "").as_posix()
    expected = f"/{dotted}/__init__.py" if is_package else f"/{path}"
    if not file.endswith(expected):
        raise RuntimeError(f"{module.__name__} is loaded from {file!r}, not from …{expected}; fix its bucket")
    return CodeArea(path, function)


def _optional(name: str) -> list[ModuleType]:
    """A module the server may run without (httptools, uvloop): no bucket entry if it is absent here."""
    try:
        return [importlib.import_module(name)]
    except ImportError:
        return []


def _bucket_areas() -> tuple[tuple[str, tuple[CodeArea, ...]], ...]:
    """(bucket, the code areas that put a stack in it), in `BUCKET_NAMES` order."""
    modules: dict[str, Sequence[ModuleType | Callable[..., Any]]] = {
        ORT_CALLING: [onnxruntime, service.models.runtime],
        DECODE: [
            service.inference.preprocessing,
            service.inference.decodecost,
            modelcontract.transform,
            PIL,
        ],
        MULTIPART: [
            python_multipart,
            service.transport.multipart,
            starlette.formparsers,
            starlette.datastructures,
        ],
        # The top-k dicts are built per request from the batch's probabilities: response work.
        JSON: [json_package, fastapi.encoders, starlette.responses, Predictor.ranked],
        PROMETHEUS: [prometheus_client],
        BATCHING: [service.inference.batching],
        HTTP_SERVER: [
            uvicorn,
            starlette,
            fastapi,
            *_optional("httptools"),
            service.transport,
            service.protocols,
        ],
        EVENT_LOOP: [asyncio, *_optional("uvloop")],
    }
    return tuple((name, tuple(area_of(code) for code in modules[name])) for name in BUCKET_NAMES)


BUCKETS = _bucket_areas()
"""Computed at import, from the modules themselves: a module that is gone fails here, by name."""


def _frames(stack: str) -> list[tuple[str, str]]:
    """`fn (file:line);fn (file:line);…` → [(function, file), …]; a thread's name frame has no file."""
    frames = []
    for frame in stack.split(";"):
        match = _FRAME.match(frame)
        if match is not None:
            frames.append((match["function"], match["file"]))
    return frames


def bucket_of(stack: str) -> str:
    """The bucket of one collapsed stack (`frame;frame;…`, root first)."""
    frames = _frames(stack)
    for name, areas in BUCKETS:
        if any(area.holds(function, file) for area in areas for function, file in frames):
            return name
    return OTHER


def py_spy_path() -> str | None:
    """The py-spy executable next to this interpreter or on PATH, if installed."""
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
