"""Load levels against one running server: each level's throughput and latency, with the server's
metrics deltas, CPU and memory sampled over the window, and an optional py-spy profile level."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

import psutil

from benchmarks.common.corpus import Photo
from benchmarks.common.loadgen import LoadRun, Transport, Window, closed_loop, open_loop
from benchmarks.common.processes import ResourceSampler, ServerProcess, rss_mb, thread_cpu_seconds
from benchmarks.common.promtext import scrape, window_means
from benchmarks.performance.profiling import PySpyRecorder, summarize

log = logging.getLogger(__name__)

WARMUP_REQUESTS = 16
"""Sequential requests sent before a peer's levels (`ServerBench.warm_up`): BentoML's dispatcher learns
a batch's cost from its first ~11 requests, holding two of them for a second or two to do so. That is
start-up, like the service's own warm-up before it reports ready, so it stays out of the measured levels."""


def _own_cpu_seconds() -> float:
    """CPU seconds used so far by this process: the load generator's cost on the shared cores."""
    times = psutil.Process().cpu_times()
    return float(times.user + times.system)


def _text_or_empty(path: Path) -> str:
    return path.read_text() if path.exists() else ""


class ServerBench:
    """Load levels against one running server, with metrics deltas and resource samples per level."""

    def __init__(self, server_name: str, server: ServerProcess, photos: Sequence[Photo]) -> None:
        self.server_name = server_name
        self.server = server
        self.photos = photos
        self.url = f"{server.url}/predict"
        self.requests_sent = 0
        self.rows: list[dict[str, Any]] = []
        self.description: dict[str, object] = server.describe()
        self.profile_result: dict[str, Any] | None = None
        self.rss_after_all: dict[str, Any] | None = None

    async def _measured(self, load: Coroutine[Any, Any, LoadRun], *, keep: bool = True) -> dict[str, Any]:
        before = await scrape(self.server.url)
        client_cpu_before, started = _own_cpu_seconds(), time.perf_counter()
        async with ResourceSampler(self.server.pid) as sampler:
            result = (await load).result()
        client_cpu_percent = 100 * (_own_cpu_seconds() - client_cpu_before) / (time.perf_counter() - started)
        after = await scrape(self.server.url)
        self.requests_sent += result.sent_total
        assert sampler.result is not None
        row = {
            "server": self.server_name,
            **result.to_dict(),
            **window_means(before, after),
            **sampler.result.to_dict(),
            "client_cpu_percent": round(client_cpu_percent, 1),
            "server_requests_before": self.requests_sent - result.sent_total,
        }
        log.info(
            "%-9s %-11s %6g: %6.1f img/s  p50 %s  p99 %s ms  errors %d  batch %s  cpu %s%% (client %s%%)",
            self.server_name,
            row["mode"],
            row["level"],
            row["img_per_s"],
            row["p50_ms"],
            row["p99_ms"],
            row["errors"],
            row.get("mean_batch_size"),
            row["server_cpu_percent"],
            row["client_cpu_percent"],
        )
        if keep:
            self.rows.append(row)
        return row

    async def warm_up(self) -> None:
        """`WARMUP_REQUESTS` sequential requests, unrecorded, before a server's levels."""
        warmup = await closed_loop(
            self.url, self.photos, 1, Window(duration_s=60.0, max_requests=WARMUP_REQUESTS)
        )
        if warmup.result().errors:
            log.warning(
                "%s: warm-up errors %s (see %s)",
                self.server_name,
                warmup.result().error_kinds,
                self.server.log_path,
            )

    async def concurrency_levels(self, levels: Sequence[int], timing: Window) -> None:
        for level in levels:
            await self.measure(self.url, level, timing)

    async def measure(self, target: str | Transport, concurrency: int, timing: Window) -> dict[str, Any]:
        """One closed-loop level against `target` (a URL to upload to, or another transport); its row."""
        return await self._measured(closed_loop(target, self.photos, concurrency, timing))

    async def profile(self, concurrency: int, timing: Window, output: Path) -> dict[str, Any]:
        """An extra, unrecorded level under py-spy (sampling costs CPU, so it never feeds the table)."""
        seconds = timing.warmup_s + timing.duration_s
        threads_before = thread_cpu_seconds(self.server.pid)
        async with PySpyRecorder(self.server.pid, seconds, output):
            row = await self._measured(
                closed_loop(self.url, self.photos, concurrency, Window(duration_s=seconds)),
                keep=False,
            )
        threads_after = thread_cpu_seconds(self.server.pid)
        summary = summarize(
            await asyncio.to_thread(_text_or_empty, output),
            thread_cpu_s={tid: cpu - threads_before.get(tid, 0.0) for tid, cpu in threads_after.items()},
            images=row["ok"],
        )
        log.info("profile at concurrency %d: %s", concurrency, summary["buckets"])
        return {
            "concurrency": concurrency,
            "img_per_s_while_profiling": row["img_per_s"],
            "server_cpu_percent": row["server_cpu_percent"],
            "raw_stacks": str(output),
            **summary,
        }

    async def rates(self, rates: Sequence[float], timing: Window) -> None:
        for rate in rates:
            await self._measured(open_loop(self.url, self.photos, rate, timing))

    async def soak_until(self, lifetime_requests: int, concurrency: int, max_s: float) -> tuple[int, float]:
        """Send requests until the server has had `lifetime_requests` (or `max_s` passed); (count, RSS MB)."""
        remaining = lifetime_requests - self.requests_sent
        if remaining > 0:
            run = await closed_loop(
                self.url, self.photos, concurrency, Window(duration_s=max_s, max_requests=remaining)
            )
            result = run.result()
            self.requests_sent += result.sent_total
            if result.errors:
                log.warning(
                    "soak to %d requests: %d errors %s", lifetime_requests, result.errors, result.error_kinds
                )
        await asyncio.sleep(1.0)  # let in-flight buffers be released before reading memory
        rss = rss_mb(self.server.pid)
        log.info("%s RSS after %d requests: %.1f MB", self.server_name, self.requests_sent, rss)
        return self.requests_sent, rss
