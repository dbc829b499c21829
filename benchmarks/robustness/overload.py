"""Overload: what became of every request of an open loop at a multiple of the measured capacity,
and what a liveness probe and the kernel's accept queue saw meanwhile.

The open loop itself is `benchmarks.common.loadgen.open_loop`; each of its requests ends in one of four
ways (`Outcome.kind`): answered (200 with the whole body), refused (503 or 429: how fast the server
says "not now" is the point), lost (the server took the request and then failed it) or connection
error (refused or reset at the TCP level, or no answer within the client timeout). Lost requests and
connection errors together are the lost total.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.common.loadgen import Outcome
from benchmarks.common.stats import latency_summary_ms


def summarize_outcomes(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """Counts by fate and by status, latency of refusals and of answers, and the lost total.

    Sends skipped for the client's backlog (`unsent`) are counted apart and are not requests."""
    by_kind: dict[str, list[Outcome]] = {
        "answered": [],
        "refused": [],
        "lost": [],
        "connection_error": [],
        "unsent": [],
    }
    for outcome in outcomes:
        by_kind[outcome.kind].append(outcome)
    sent = [outcome for outcome in outcomes if outcome.kind != "unsent"]
    statuses = Counter(str(outcome.status) for outcome in sent if outcome.status is not None)
    errors = Counter(outcome.error for outcome in sent if outcome.error is not None)
    answered = by_kind["answered"]
    span = max((o.finished for o in answered), default=0.0) - min((o.sent for o in sent), default=0.0)
    return {
        "requests": len(sent),
        "skipped_client_backlog": len(by_kind["unsent"]),
        "answered_per_s": round(len(answered) / span, 2) if answered and span > 0 else None,
        "answered": len(answered),
        "refused": len(by_kind["refused"]),
        "lost_after_acceptance": len(by_kind["lost"]),
        "connection_errors": len(by_kind["connection_error"]),
        "lost_total": len(by_kind["lost"]) + len(by_kind["connection_error"]),
        "by_status": dict(sorted(statuses.items())),
        "by_error": dict(errors),
        "refused_latency_ms": latency_summary_ms([o.latency_s for o in by_kind["refused"]]),
        "answered_latency_ms": latency_summary_ms([o.latency_s for o in answered]),
        "lost_latency_ms": latency_summary_ms([o.latency_s for o in by_kind["lost"]]),
        "connection_error_latency_ms": latency_summary_ms([o.latency_s for o in by_kind["connection_error"]]),
    }


@dataclass
class HealthProbe:
    """GET /healthz on a new connection every `interval_s` until stopped: how long a liveness probe
    (Kubernetes, a load balancer) waits while the server is overloaded, from connect to answer."""

    base_url: str
    interval_s: float = 1.0
    timeout_s: float = 30.0
    samples: list[tuple[int | None, float]] = field(default_factory=list)
    """(status or None, seconds) of every probe so far, in order."""

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            started = time.perf_counter()
            status: int | None = None
            try:
                async with (
                    aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as session,
                    session.get(f"{self.base_url}/healthz") as response,
                ):
                    await response.read()
                    status = response.status
            except (aiohttp.ClientError, TimeoutError):
                status = None
            self.samples.append((status, time.perf_counter() - started))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    stop.wait(), timeout=max(0.0, self.interval_s - (time.perf_counter() - started))
                )

    def summary(self) -> dict[str, Any]:
        return {
            "probes": len(self.samples),
            "ok": sum(status == 200 for status, _ in self.samples),
            "latency_ms": latency_summary_ms([seconds for _, seconds in self.samples]),
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
