"""What loaded model versions cost in memory, the budget they share, and which one to unload first.

A version's cost is measured when it loads: how much the process's resident memory grew while its
session was created, and never less than its file, whose weights the session holds. Loads run one at
a time (the registry's reconciliation lock); freed heap is handed back to the OS before and after
(else the file's parse buffers, freed but kept by the allocator, would count: 0 to 20 MB of noise on
an 8 MB model, against 0.1 MB with it), and ONNX Runtime's one-time set-up (~8 MB) is done once
beforehand, so the first version does not pay for it.

The costs of loaded versions add up against MEMORY_BUDGET_MB. The process itself sits outside the
budget: Python, ONNX Runtime's libraries, request buffers, and the one CPU arena every session takes
its activations from (`service.models.runtime.share_cpu_arena`), sized by the largest batches running
at once; so peak RSS is the budget plus that base. A cost stays known after its version is unloaded,
so loading it again reserves what it really took.
"""

from __future__ import annotations

import ctypes
import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from service.models.runtime import session_options

T = TypeVar("T")

Key = tuple[str, int]
"""A model version: (name, version)."""

MIB = 1024 * 1024


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


@functools.cache
def _mallinfo2() -> Callable[[], _MallInfo2] | None:
    try:
        function = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):  # not glibc, or glibc before 2.33
        return None
    function.restype = _MallInfo2
    return function


def allocated_bytes() -> int:
    """Bytes the process's allocations hold now (glibc's heap in use plus its mmap'd blocks), or its
    resident set size where glibc cannot say."""
    mallinfo2 = _mallinfo2()
    if mallinfo2 is None:
        return resident_bytes()
    info = mallinfo2()
    return int(info.uordblks + info.hblkhd)


def resident_bytes() -> int:
    """This process's resident set size in bytes (0 where /proc is not available)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def file_bytes(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def measured(load: Callable[[], T], path: Path) -> tuple[T, int]:
    """`load()` and the resident memory it kept, at least `path`'s size; blocking (run it in a thread)."""
    settle_runtime()
    before = allocated_bytes()
    result = load()
    return result, max(allocated_bytes() - before, file_bytes(path))


@functools.cache
def settle_runtime() -> None:
    """Create and run one trivial session, so ONNX Runtime's one-time set-up is not any model's cost."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "settle",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    session = ort.InferenceSession(
        model.SerializeToString(), session_options(1), providers=["CPUExecutionProvider"]
    )
    session.run(None, {"x": np.zeros((2, 4), dtype=np.float32)})


@dataclass
class MemoryBudget:
    """The costs of loaded versions against an optional limit, and when each was last used."""

    limit_bytes: int | None
    """MEMORY_BUDGET_MB in bytes; None = no limit (everything the version policy selects loads)."""
    costs: dict[Key, int] = field(default_factory=dict)
    """Measured cost of every version loaded so far (loaded now or not)."""
    loaded: set[Key] = field(default_factory=set)
    last_used: dict[Key, float] = field(default_factory=dict)

    def need(self, key: Key, path: Path) -> int:
        """Bytes to reserve before loading `key`: its measured cost if it loaded before, else its file."""
        return self.costs.get(key) or file_bytes(path)

    def used(self) -> int:
        return sum(self.costs.get(key, 0) for key in self.loaded)

    def fits(self, need: int) -> bool:
        return self.limit_bytes is None or self.used() + need <= self.limit_bytes

    def exceeds_limit(self, cost: int) -> bool:
        """Whether `cost` alone is more than the whole budget: such a version can never be loaded."""
        return self.limit_bytes is not None and cost > self.limit_bytes

    def admit(self, key: Key, cost: int) -> None:
        self.costs[key] = cost
        self.loaded.add(key)
        self.last_used.setdefault(key, time.monotonic())

    def release(self, key: Key) -> None:
        self.loaded.discard(key)

    def touch(self, key: Key) -> None:
        self.last_used[key] = time.monotonic()

    def least_recently_used(self, idle: Callable[[Key], bool], keep: Key | None = None) -> Key | None:
        """The loaded version used longest ago among those `idle` says may go (never `keep`)."""
        candidates = [key for key in self.loaded if key != keep and idle(key)]
        return min(candidates, key=lambda key: self.last_used.get(key, 0.0), default=None)

    def describe(self) -> dict[str, int | None]:
        """The budget in MiB, for `/readyz`: limit (None = unlimited) and what loaded versions use."""
        return {
            "budget_mb": None if self.limit_bytes is None else self.limit_bytes // MIB,
            "used_mb": round(self.used() / MIB),
        }
