"""What one request costs the server: its status, wall time, CPU seconds and peak memory increase.

Requests are sent one at a time to an otherwise idle server, so the server's CPU time between
"before" and "after" is the request's (plus whatever spinning ONNX Runtime's threads do after a
batch, which the reference photo pays too). CPU time is read per thread from
/proc/<pid>/task/<tid>/schedstat, in nanoseconds: the 10 ms clock ticks of /proc/<pid>/stat are
too coarse for a request that costs 30 ms. Peak memory comes from the kernel: writing "5" to
/proc/<pid>/clear_refs resets VmHWM (the resident high-water mark) to the current RSS, and VmHWM
after the request is the peak it reached, however briefly. Where that reset is not allowed, a
sampler reading RSS every few milliseconds stands in for it.

A watchdog samples RSS throughout and SIGKILLs the server if it passes a cap: an old server may try
to allocate tens of gigabytes for one hostile file, and the machine is shared.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import re
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from benchmarks.common.processes import cpu_seconds
from benchmarks.robustness.hostile_inputs import HostileCase

log = logging.getLogger(__name__)

_HWM = re.compile(r"^VmHWM:\s+(\d+) kB", re.MULTILINE)
SETTLE_S = 0.3
"""Idle time after each answer before CPU is read, so trailing work (ORT spin-wait, logging) counts."""


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_rss_mb(pid: int) -> float | None:
    """RSS of a process tree in MiB, None when the process is gone."""
    total, seen = 0, False
    for process in _tree(pid):
        try:
            total += process.memory_info().rss
            seen = True
        except psutil.NoSuchProcess:
            continue
    return total / 2**20 if seen else None


def thread_cpu_ns(pid: int) -> dict[int, int]:
    """CPU nanoseconds so far of every thread in the tree, by thread id ({} where unavailable)."""
    times: dict[int, int] = {}
    for process in _tree(pid):
        try:
            tasks = list(Path(f"/proc/{process.pid}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                times[int(task.name)] = int((task / "schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
    return times


class CpuClock:
    """CPU seconds a process tree spends between `start()` and `seconds()`."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._threads = thread_cpu_ns(pid)
        self._total = cpu_seconds(pid)

    def seconds(self) -> float:
        threads = thread_cpu_ns(self.pid)
        if self._threads and threads:
            # Threads born meanwhile count in full; a thread that exited meanwhile loses only its
            # last moments (the service's pools live for the whole process).
            return sum(ns - self._threads.get(tid, 0) for tid, ns in threads.items()) / 1e9
        return cpu_seconds(self.pid) - self._total


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM of every process in the tree to its current RSS; False if the kernel refuses."""
    processes = _tree(pid)
    try:
        for process in processes:
            Path(f"/proc/{process.pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return bool(processes)


def peak_rss_mb(pid: int) -> float | None:
    """Sum of VmHWM over the tree in MiB (each process's own peak since its last reset)."""
    total, seen = 0, False
    for process in _tree(pid):
        try:
            match = _HWM.search(Path(f"/proc/{process.pid}/status").read_text())
        except OSError:
            continue
        if match:
            total += int(match.group(1)) * 1024
            seen = True
    return total / 2**20 if seen else None


class MemoryWatch:
    """Samples a server's RSS every `interval_s`; kills it (SIGKILL) past `kill_above_mb`."""

    def __init__(self, pid: int, kill_above_mb: float, interval_s: float = 0.01) -> None:
        self.pid = pid
        self.kill_above_mb = kill_above_mb
        self.interval_s = interval_s
        self.peak_mb = 0.0
        self.killed = False
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> MemoryWatch:
        self._task = asyncio.create_task(self._watch())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _watch(self) -> None:
        while (rss := await asyncio.to_thread(tree_rss_mb, self.pid)) is not None:
            self.peak_mb = max(self.peak_mb, rss)
            if rss > self.kill_above_mb:
                log.warning("server RSS %.0f MB passed the %.0f MB cap: killing it", rss, self.kill_above_mb)
                self.killed = True
                for process in reversed(_tree(self.pid)):
                    with contextlib.suppress(psutil.NoSuchProcess):
                        process.kill()
                return
            await asyncio.sleep(self.interval_s)


@dataclass(frozen=True)
class Attempt:
    """One request of one case."""

    status: int | None
    error: str | None
    """Client-side failure (timeout, connection reset) or `killed_over_rss_cap`; None if answered."""
    seconds: float
    cpu_s: float | None
    rss_before_mb: float | None
    rss_increase_mb: float | None
    """Peak RSS during the request minus RSS just before it."""
    peak_from: str
    """"VmHWM" (kernel high-water mark, exact) or "sampled" (RSS read every 10 ms)."""
    server_died: bool


async def post_case(
    session: aiohttp.ClientSession, url: str, case: HostileCase, timeout_s: float
) -> tuple[int | None, str | None]:
    """Send the case's raw multipart body; (status, None) or (None, error kind)."""
    body, content_type = case.multipart()
    try:
        async with session.post(
            url,
            data=io.BytesIO(body),  # aiohttp warns that large raw bytes are copied on the event loop
            headers={"Content-Type": content_type},
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        ) as response:
            await response.read()
            return response.status, None
    except (aiohttp.ClientError, TimeoutError) as exc:
        return None, type(exc).__name__


async def measure_attempt(
    session: aiohttp.ClientSession,
    url: str,
    pid: int,
    *,
    case: HostileCase,
    timeout_s: float,
    kill_above_mb: float,
) -> Attempt:
    """Send one case to an idle server and read what it cost."""
    rss_before = tree_rss_mb(pid)
    clock = CpuClock(pid)
    hwm = reset_peak_rss(pid)
    started = time.perf_counter()
    async with MemoryWatch(pid, kill_above_mb) as watch:
        status, error = await post_case(session, url, case, timeout_s)
        seconds = time.perf_counter() - started
        await asyncio.sleep(SETTLE_S)
    died = watch.killed or tree_rss_mb(pid) is None
    peak = peak_rss_mb(pid) if hwm and not died else None
    cpu = None if died else clock.seconds()
    if peak is None or watch.peak_mb > peak:  # the sampler saw more (or VmHWM is unavailable)
        peak, source = watch.peak_mb, "sampled"
    else:
        source = "VmHWM"
    if watch.killed:
        error = f"killed_over_{watch.kill_above_mb:.0f}_mb"
    return Attempt(
        status=status,
        error=error,
        seconds=round(seconds, 4),
        cpu_s=None if cpu is None else round(cpu, 4),
        rss_before_mb=None if rss_before is None else round(rss_before, 1),
        rss_increase_mb=None if rss_before is None else round(max(0.0, peak - rss_before), 1),
        peak_from=source,
        server_died=died,
    )


def _median(values: list[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return round(statistics.median(present), 4) if present else None


def summarize_case(
    case: HostileCase, attempts: list[Attempt], reference: dict[str, Any] | None
) -> dict[str, Any]:
    """Per-case row: statuses, median time and CPU, largest memory increase, ratios to the reference."""
    statuses = [attempt.status for attempt in attempts]
    cpu = _median([attempt.cpu_s for attempt in attempts])
    # The largest increase, not the median: after the first attempt the allocator often still holds
    # the pages it needs, so repeats understate what the file costs a server meeting it first.
    increases = [attempt.rss_increase_mb for attempt in attempts if attempt.rss_increase_mb is not None]
    memory = max(increases) if increases else None
    row: dict[str, Any] = {
        "name": case.name,
        "description": case.description,
        "files": len(case.files),
        "upload_bytes": case.upload_bytes,
        "expected_status": case.expected_status,
        "status": statuses[0],
        "statuses": statuses,
        "as_expected": all(status == case.expected_status for status in statuses),
        "errors": [attempt.error for attempt in attempts if attempt.error],
        "server_died": any(attempt.server_died for attempt in attempts),
        "seconds": _median([attempt.seconds for attempt in attempts]),
        "cpu_s": cpu,
        "rss_increase_mb": memory,
        "peak_from": attempts[0].peak_from,
        "attempts": [asdict(attempt) for attempt in attempts],
    }
    if reference:
        row["cpu_ratio"] = _ratio(cpu, reference.get("cpu_s"), floor=0.001)
        row["memory_ratio"] = _ratio(memory, reference.get("rss_increase_mb"), floor=1.0)
    return row


def _ratio(value: float | None, reference: float | None, floor: float) -> float | None:
    """value / reference, with the reference floored (a reference near zero would make noise huge)."""
    if value is None or reference is None:
        return None
    return round(value / max(reference, floor), 2)
