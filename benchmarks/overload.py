"""Overload: an open loop at a multiple of the measured capacity, with the fate of every request.

Each request is sent on schedule (latency counts from the scheduled time, so a server that falls
behind is charged for it) and ends in one of four ways:
- answered: HTTP 200 with the whole body;
- refused: 503 or 429, the server saying "not now" (how fast it says it is the point);
- lost: the server took the request and then failed it (any other status, a truncated body);
- connection error: refused or reset at the TCP level, or no answer within the client timeout.
Lost requests and connection errors together are what the issue calls lost requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.corpus import Photo
from benchmarks.stats import latency_summary_ms

REFUSAL_STATUSES = frozenset({429, 503})


@dataclass(frozen=True)
class Outcome:
    scheduled: float
    """perf_counter() time the request was due to be sent."""
    finished: float
    status: int | None
    error: str | None
    """Client-side error kind (connection, timeout, truncated body), None when a response was read."""

    @property
    def kind(self) -> str:
        if self.error is not None:
            return "connection_error"
        if self.status == 200:
            return "answered"
        if self.status in REFUSAL_STATUSES:
            return "refused"
        return "lost"

    @property
    def latency_s(self) -> float:
        return self.finished - self.scheduled


async def post_photo(session: aiohttp.ClientSession, url: str, photo: Photo) -> tuple[int | None, str | None]:
    """POST one photo as a multipart upload and read the whole answer."""
    form = aiohttp.FormData()
    form.add_field("file", photo.data, filename=photo.filename, content_type="image/jpeg")
    try:
        async with session.post(url, data=form) as response:
            await response.read()
            return response.status, None
    except (aiohttp.ClientError, TimeoutError) as exc:
        return None, error_kind(exc)


def error_kind(exc: BaseException) -> str:
    """`ClientOSError(errno 104)`: the class, plus the errno that tells a reset from a refusal."""
    errno = getattr(exc, "errno", None)
    return f"{type(exc).__name__}(errno {errno})" if errno else type(exc).__name__


def client_session(connections: int, timeout_s: float) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=connections)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s))


async def open_loop(
    url: str,
    photos: Sequence[Photo],
    rate_per_s: float,
    duration_s: float,
    *,
    max_outstanding: int = 2048,
    timeout_s: float = 60.0,
) -> tuple[list[Outcome], int]:
    """Send `rate_per_s` requests a second for `duration_s`; (outcomes, sends skipped for backlog).

    Past `max_outstanding` unanswered requests a send is skipped (and counted), which bounds the
    client's memory and sockets when the server stops answering altogether.
    """
    if rate_per_s <= 0 or duration_s <= 0:
        raise ValueError(f"need rate_per_s > 0 and duration_s > 0, got {rate_per_s}, {duration_s}")
    outcomes: list[Outcome] = []
    skipped = 0
    in_flight: set[asyncio.Task[None]] = set()
    cycle = itertools.cycle(photos)
    begin = time.perf_counter()

    async def send(session: aiohttp.ClientSession, photo: Photo, scheduled: float) -> None:
        status, error = await post_photo(session, url, photo)
        outcomes.append(Outcome(scheduled, time.perf_counter(), status, error))

    async with client_session(max_outstanding, timeout_s) as session:
        for index in range(int(rate_per_s * duration_s)):
            scheduled = begin + index / rate_per_s
            await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
            if len(in_flight) >= max_outstanding:
                skipped += 1
                continue
            task = asyncio.create_task(send(session, next(cycle), scheduled))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        if in_flight:
            await asyncio.wait(in_flight)
    return outcomes, skipped


def summarize_outcomes(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """Counts by fate and by status, latency of refusals and of answers, and the lost total."""
    by_kind: dict[str, list[Outcome]] = {"answered": [], "refused": [], "lost": [], "connection_error": []}
    for outcome in outcomes:
        by_kind[outcome.kind].append(outcome)
    statuses = Counter(str(outcome.status) for outcome in outcomes if outcome.status is not None)
    errors = Counter(outcome.error for outcome in outcomes if outcome.error is not None)
    answered = by_kind["answered"]
    span = max((o.finished for o in answered), default=0.0) - min(
        (o.scheduled for o in outcomes), default=0.0
    )
    return {
        "requests": len(outcomes),
        "answered_per_s": round(len(answered) / span, 2) if answered and span > 0 else None,
        "answered": len(by_kind["answered"]),
        "refused": len(by_kind["refused"]),
        "lost_after_acceptance": len(by_kind["lost"]),
        "connection_errors": len(by_kind["connection_error"]),
        "lost_total": len(by_kind["lost"]) + len(by_kind["connection_error"]),
        "by_status": dict(sorted(statuses.items())),
        "by_error": dict(errors),
        "refused_latency_ms": latency_summary_ms([o.latency_s for o in by_kind["refused"]]),
        "answered_latency_ms": latency_summary_ms([o.latency_s for o in by_kind["answered"]]),
        "lost_latency_ms": latency_summary_ms([o.latency_s for o in by_kind["lost"]]),
        "connection_error_latency_ms": latency_summary_ms([o.latency_s for o in by_kind["connection_error"]]),
    }


async def probe_health(base_url: str, stop: asyncio.Event, interval_s: float = 1.0) -> dict[str, Any]:
    """GET /healthz on a new connection every `interval_s` until `stop`: how long a liveness probe
    (Kubernetes, a load balancer) waits while the server is overloaded, from connect to answer."""
    results: list[tuple[int | None, float]] = []
    while not stop.is_set():
        started = time.perf_counter()
        status: int | None = None
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30.0)) as session,
                session.get(f"{base_url}/healthz") as response,
            ):
                await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError):
            status = None
        results.append((status, time.perf_counter() - started))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                stop.wait(), timeout=max(0.0, interval_s - (time.perf_counter() - started))
            )
    return {
        "probes": len(results),
        "ok": sum(status == 200 for status, _ in results),
        "latency_ms": latency_summary_ms([seconds for _, seconds in results]),
    }


def accept_queue_length(port: int) -> int | None:
    """Connections waiting in the kernel's accept queue of the IPv4 socket listening on `port`.

    For a listening socket, /proc/net/tcp's rx_queue is that queue's length: requests the server
    has not even accepted yet, invisible to any cap it applies to accepted connections.
    """
    try:
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        local, state, queues = fields[1], fields[3], fields[4]
        if state == "0A" and int(local.rpartition(":")[2], 16) == port:  # 0A = LISTEN
            return int(queues.partition(":")[2], 16)
    return None


async def sample_accept_queue(port: int, stop: asyncio.Event, interval_s: float = 0.5) -> dict[str, Any]:
    """Sample `accept_queue_length` until `stop`: its largest and mean value."""
    samples: list[int] = []
    while not stop.is_set():
        length = accept_queue_length(port)
        if length is not None:
            samples.append(length)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval_s)
    return {
        "max": max(samples) if samples else None,
        "mean": round(sum(samples) / len(samples), 1) if samples else None,
        "samples": len(samples),
    }
