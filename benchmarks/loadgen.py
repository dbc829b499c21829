"""An async HTTP load generator: POSTs JPEGs as multipart uploads, closed loop or open loop.

Closed loop (`run_concurrency`): N clients each send a request, wait for the answer, send the next —
how a fixed pool of callers behaves; throughput is whatever the server sustains at that concurrency.
Open loop (`run_rate`): requests are sent on a fixed schedule whether or not earlier ones have been
answered, as independent users do; latency is measured from the scheduled send time so a server that
falls behind is charged for the queueing it causes (no coordinated omission).

Every run has a warm-up that is not measured, a measured window bounded both in seconds and in
requests, and a drain bounded by the request timeout. Latencies and errors come from the requests
started inside the window; throughput counts successful answers received inside it.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from benchmarks.corpus import Photo
from benchmarks.stats import latency_summary_ms

DEFAULT_REQUEST_TIMEOUT_S = 60.0


@dataclass
class _Window:
    """The measured window and what happened inside it."""

    start: float
    end: float
    max_requests: int
    started: int = 0
    sent_total: int = 0
    ok_finished_inside: int = 0
    latencies_s: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)

    def admits(self, sent_at: float) -> bool:
        """Whether a request sent (or scheduled) at `sent_at` belongs to the measured set."""
        return self.start <= sent_at < self.end

    def count_start(self, sent_at: float) -> None:
        self.sent_total += 1
        if self.admits(sent_at):
            self.started += 1
            if self.started >= self.max_requests:
                # The request budget is spent: close the window now so the run stays bounded.
                self.end = sent_at + 1e-9

    def record(self, sent_at: float, finished_at: float, error: str | None) -> None:
        if error is None and self.start <= finished_at <= self.end:
            self.ok_finished_inside += 1
        if not self.admits(sent_at):
            return
        if error is None:
            self.latencies_s.append(finished_at - sent_at)
        else:
            self.errors[error] += 1


@dataclass(frozen=True)
class LoadResult:
    """One measured load level."""

    mode: str
    """"concurrency" (closed loop) or "rate" (open loop)."""
    level: float
    """Concurrent clients, or requests per second offered."""
    window_s: float
    ok: int
    errors: int
    error_kinds: dict[str, int]
    img_per_s: float
    latency_ms: dict[str, float | None]
    sent_total: int
    """Every request sent, warm-up included (for counting a server's lifetime requests)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "level": self.level,
            "window_s": round(self.window_s, 3),
            "ok": self.ok,
            "errors": self.errors,
            "error_kinds": self.error_kinds,
            "img_per_s": round(self.img_per_s, 2),
            **self.latency_ms,
        }


class UploadClient:
    """POSTs one photo per request as `multipart/form-data` (field `file`) and reports the outcome."""

    def __init__(self, url: str, session: aiohttp.ClientSession) -> None:
        self._url = url
        self._session = session

    async def post(self, photo: Photo) -> str | None:
        """None on HTTP 200, else a short error kind such as `http_503` or `ServerDisconnectedError`."""
        form = aiohttp.FormData()
        form.add_field("file", photo.data, filename=photo.filename, content_type="image/jpeg")
        try:
            async with self._session.post(self._url, data=form) as response:
                # Read the whole body: a real client does, and the server's JSON cost belongs in the figure.
                await response.read()
                return None if response.status == 200 else f"http_{response.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            return type(exc).__name__


def _open_session(connections: int, request_timeout_s: float) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=connections, force_close=False)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=request_timeout_s))


def _result(mode: str, level: float, window: _Window, window_s: float) -> LoadResult:
    ok = len(window.latencies_s)
    return LoadResult(
        mode=mode,
        level=level,
        window_s=window_s,
        ok=ok,
        errors=sum(window.errors.values()),
        error_kinds=dict(window.errors),
        img_per_s=window.ok_finished_inside / window_s if window_s > 0 else 0.0,
        latency_ms=latency_summary_ms(window.latencies_s),
        sent_total=window.sent_total,
    )


async def run_concurrency(
    url: str,
    photos: Sequence[Photo],
    concurrency: int,
    *,
    duration_s: float,
    warmup_s: float = 0.0,
    max_requests: int = 1_000_000,
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
) -> LoadResult:
    """Closed loop: `concurrency` clients back to back for `warmup_s` + up to `duration_s`/`max_requests`."""
    if concurrency < 1 or duration_s <= 0 or max_requests < 1:
        raise ValueError(
            f"need concurrency >= 1, duration_s > 0 and max_requests >= 1; "
            f"got {concurrency}, {duration_s}, {max_requests}"
        )
    now = time.perf_counter()
    window = _Window(start=now + warmup_s, end=now + warmup_s + duration_s, max_requests=max_requests)
    cycle = itertools.cycle(photos)

    async def client_loop(client: UploadClient) -> None:
        while (sent_at := time.perf_counter()) < window.end:
            window.count_start(sent_at)
            error = await client.post(next(cycle))
            window.record(sent_at, time.perf_counter(), error)

    async with _open_session(concurrency, request_timeout_s) as session:
        client = UploadClient(url, session)
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    return _result("concurrency", concurrency, window, window.end - window.start)


async def run_rate(
    url: str,
    photos: Sequence[Photo],
    rate_per_s: float,
    *,
    duration_s: float,
    warmup_s: float = 0.0,
    max_requests: int = 1_000_000,
    max_outstanding: int = 512,
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
) -> LoadResult:
    """Open loop: one request every 1/`rate_per_s` seconds, evenly spaced (perf_analyzer's "constant").

    More than `max_outstanding` unanswered requests means the server has fallen hopelessly behind:
    further sends are skipped and counted as `client_backlog` errors, which keeps memory bounded.
    """
    if rate_per_s <= 0 or duration_s <= 0:
        raise ValueError(f"need rate_per_s > 0 and duration_s > 0; got {rate_per_s}, {duration_s}")
    begin = time.perf_counter()
    window = _Window(start=begin + warmup_s, end=begin + warmup_s + duration_s, max_requests=max_requests)
    cycle: Iterator[Photo] = itertools.cycle(photos)
    in_flight: set[asyncio.Task[None]] = set()

    async def send(client: UploadClient, photo: Photo, scheduled: float) -> None:
        error = await client.post(photo)
        window.record(scheduled, time.perf_counter(), error)

    async with _open_session(max_outstanding, request_timeout_s) as session:
        client = UploadClient(url, session)
        for index in itertools.count():
            scheduled = begin + index / rate_per_s
            if scheduled >= window.end:
                break
            await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
            window.count_start(scheduled)
            if len(in_flight) >= max_outstanding:
                window.record(scheduled, time.perf_counter(), "client_backlog")
                continue
            task = asyncio.create_task(send(client, next(cycle), scheduled))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        if in_flight:
            await asyncio.wait(in_flight)
    return _result("rate", rate_per_s, window, window.end - window.start)
