"""Interference: how much one hostile client slows a normal one down.

A normal client sends the reference 2-MP JPEG to `POST /predict`, one request at a time, first to
an idle server (the baseline), then beside each hostile class of `benchmarks.robustness.hostile_requests`. The
hostile client is one sequential client too: it sends its next request as soon as the previous one
is answered or closed, cycling through its class's requests until the normal client is done (and
never past its own count and time bounds). Per class: what the hostile requests got, the normal
client's p50/p99 and the p99's ratio to the idle one, and the server's CPU seconds and peak RSS
growth over the window (the normal client's share included, as in the idle row).

The hostile client runs in a process of its own, so its Python work (building, sending, reading
tens of MB) never delays the normal client's clock in this one, and at the lowest CPU priority
(`HOSTILE_NICE`): a real attacker's CPU is on the attacker's machine, while here it shares the
server's two cores, and a client sending a thousand cheap requests a second would otherwise take a
core from the server and measure the load generator instead of the service.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import os
import queue
import time
from collections import Counter
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, ExitStack
from dataclasses import asdict, dataclass, field
from multiprocessing.synchronize import Event
from typing import Any

import aiohttp

from benchmarks.common.loadgen import client_session
from benchmarks.common.processes import LOOPBACK, RunningServer, process_alive
from benchmarks.common.stats import latency_summary_ms
from benchmarks.robustness.hostile_inputs import HostileCase
from benchmarks.robustness.hostile_requests import (
    CLASSES,
    HostileRequest,
    HostileSizes,
    HttpRequest,
    TrickledHead,
    V2Target,
    image_cases,
    requests_for,
    send_http,
    send_trickled,
    upload,
)
from benchmarks.robustness.input_cost import CpuClock, MemoryWatch, peak_rss_mb, reset_peak_rss, tree_rss_mb

log = logging.getLogger(__name__)

WARMUP_REQUESTS = 3
READY_TIMEOUT_S = 120.0
"""How long the hostile client may take to build its requests (tens of MB to compress) and start."""
Sent = tuple[str, int | None, str | None, float]
"""(request label, status or None, client-side error or None, seconds) of one request."""
ServerOpener = Callable[[], AbstractContextManager[RunningServer]]
"""Gives a server that is started on entering and stopped on leaving (a fresh one each call)."""


@dataclass(frozen=True)
class InterferencePlan:
    normal_requests: int = 200
    """Normal requests per window at least: the idle one, then one beside each class."""
    min_window_s: float = 10.0
    """Shortest a window's normal client runs, in seconds, whatever its count: one trickled head takes
    seconds, and its cost grows as it gets longer."""
    window_s: float = 60.0
    """Longest a window's normal client runs, in seconds, whatever its count."""
    hostile_max_requests: int = 200_000
    """A safety bound only: cheap refusals come back at thousands per second, and a client that
    stopped early would leave the rest of the window idle."""
    request_timeout_s: float = 30.0
    rss_kill_mb: float = 6144.0
    """SIGKILL the server past this RSS, MiB (the machine is shared); the next class gets a new one."""
    classes: tuple[str, ...] = tuple(CLASSES)
    sizes: HostileSizes = field(default_factory=HostileSizes)


@dataclass(frozen=True)
class HostileSpec:
    """All the hostile client's process needs (picklable: it crosses a process boundary)."""

    class_name: str
    port: int
    target: V2Target
    sizes: HostileSizes
    max_requests: int
    max_s: float
    timeout_s: float


async def _hostile_loop(spec: HostileSpec, requests: list[HostileRequest], stop: Event) -> list[Sent]:
    sent: list[Sent] = []
    deadline = time.monotonic() + spec.max_s
    base_url = f"http://{LOOPBACK}:{spec.port}"
    async with client_session(1, spec.timeout_s) as session:
        for request in itertools.cycle(requests):
            if stop.is_set() or len(sent) >= spec.max_requests or time.monotonic() > deadline:
                break
            started = time.perf_counter()
            if isinstance(request, TrickledHead):
                status, error = await send_trickled(LOOPBACK, spec.port, request, spec.sizes, spec.timeout_s)
            else:
                status, error = await send_http(session, base_url, request)
            sent.append((request.label, status, error, round(time.perf_counter() - started, 4)))
    return sent


HOSTILE_NICE = 19


def _hostile_client_main(spec: HostileSpec, ready: Event, stop: Event, results: Any) -> None:
    """The hostile client's process: build its requests, say ready, loop until stopped, report."""
    os.nice(HOSTILE_NICE - os.nice(0))  # see the module docstring
    try:
        requests = requests_for(spec.class_name, spec.target, spec.sizes)
        if not requests:
            raise ValueError(f"hostile class {spec.class_name} has no requests to send")
    except Exception as exc:
        results.put({"error": f"{type(exc).__name__}: {exc}", "sent": []})
        ready.set()
        return
    ready.set()
    try:
        results.put({"error": None, "sent": asyncio.run(_hostile_loop(spec, requests, stop))})
    except Exception as exc:  # a bug here must still end the window, with its reason
        results.put({"error": f"{type(exc).__name__}: {exc}", "sent": []})


class HostileClient:
    """One hostile client in a spawned process: `await start()` (requests built), `await stop()`."""

    def __init__(self, spec: HostileSpec) -> None:
        context = multiprocessing.get_context("spawn")  # inherits nothing of this process's state
        self._ready, self._stop, self._results = context.Event(), context.Event(), context.Queue()
        self._process = context.Process(
            target=_hostile_client_main,
            args=(spec, self._ready, self._stop, self._results),
            name=f"hostile-{spec.class_name}",
            daemon=True,
        )
        self._report_timeout_s = spec.timeout_s + 30.0
        self._report: dict[str, Any] | None = None

    async def start(self) -> None:
        self._process.start()
        if not await asyncio.to_thread(self._ready.wait, READY_TIMEOUT_S):
            await self.stop()
            raise RuntimeError(f"the hostile client was not ready within {READY_TIMEOUT_S:g} s")

    async def stop(self) -> dict[str, Any]:
        """Ask it to stop after its current request; its report (the same on later calls)."""
        if self._report is None:
            self._stop.set()
            try:
                report = await asyncio.to_thread(self._results.get, True, self._report_timeout_s)
            except queue.Empty:
                report = {"error": f"no report {self._report_timeout_s:g} s after stop", "sent": []}
            await asyncio.to_thread(self._process.join, 10.0)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
            self._report = report
        return self._report


async def discover_v2_target(session: aiohttp.ClientSession, base_url: str, photo: HttpRequest) -> V2Target:
    """The default model's V2 names, from a /predict answer and the model's V2 metadata (else defaults)."""
    try:
        async with session.post(
            base_url + photo.path, data=photo.body, headers=dict(photo.headers)
        ) as answer:
            name = (await answer.json())["model"]["name"]
        async with session.get(f"{base_url}/v2/models/{name}") as answer:
            metadata = await answer.json()
        tensor = metadata["inputs"][0]
        return V2Target(
            name, tensor["name"], tuple(tensor["shape"][1:]), metadata["outputs"][0]["name"], True
        )
    except (aiohttp.ClientError, TimeoutError, ValueError, LookupError, TypeError):
        return V2Target()


async def _warm_up(server: RunningServer, photo: HttpRequest, plan: InterferencePlan) -> V2Target:
    async with client_session(1, plan.request_timeout_s) as session:
        for _ in range(WARMUP_REQUESTS):  # the first requests allocate pools: not part of any window
            await send_http(session, server.url, photo)
        return await discover_v2_target(session, server.url, photo)


async def _normal_client(server: RunningServer, photo: HttpRequest, plan: InterferencePlan) -> list[Sent]:
    sent: list[Sent] = []
    started = time.monotonic()
    async with client_session(1, plan.request_timeout_s) as session:
        while (elapsed := time.monotonic() - started) < plan.window_s and (
            len(sent) < plan.normal_requests or elapsed < plan.min_window_s
        ):
            sent_at = time.perf_counter()
            status, error = await send_http(session, server.url, photo)
            sent.append((photo.label, status, error, time.perf_counter() - sent_at))
    return sent


def _outcome(status: int | None, error: str | None) -> str:
    return str(status) if status is not None else error or "no answer"


def _counts(outcomes: Iterable[str]) -> dict[str, int]:
    return dict(sorted(Counter(outcomes).items()))


def _hostile_summary(report: dict[str, Any]) -> dict[str, Any]:
    sent: list[Sent] = report["sent"]
    labels = dict.fromkeys(label for label, *_ in sent)
    return {
        "hostile_requests": len(sent),
        "hostile_statuses": _counts(_outcome(status, error) for _, status, error, _ in sent),
        "hostile_by_request": {
            label: _counts(_outcome(s, e) for name, s, e, _ in sent if name == label) for label in labels
        },
        "hostile_latency_ms": latency_summary_ms([seconds for *_, seconds in sent]),
        "hostile_error": report["error"],
    }


async def _window(
    server: RunningServer, photo: HttpRequest, plan: InterferencePlan, hostile: HostileSpec | None
) -> dict[str, Any]:
    """The normal client's run, beside the hostile client of `hostile` (None: alone), and its cost."""
    client = None if hostile is None else HostileClient(hostile)
    if client is not None:
        await client.start()  # its requests are built before any clock starts
    pid = server.pid
    rss_before, clock, exact_peak = tree_rss_mb(pid), CpuClock(pid), reset_peak_rss(pid)
    started = time.perf_counter()
    try:
        async with MemoryWatch(pid, plan.rss_kill_mb, interval_s=0.05) as watch:
            normal = await _normal_client(server, photo, plan)
            seconds = time.perf_counter() - started
            if client is not None:  # stopped inside: its last request's cost counts, and is watched
                await client.stop()
    finally:
        report = None if client is None else await client.stop()  # the same report; stops it on errors
    died = watch.killed or tree_rss_mb(pid) is None
    peaks = [watch.peak_mb, *([peak_rss_mb(pid) or 0.0] if exact_peak and not died else [])]
    row: dict[str, Any] = {
        "seconds": round(seconds, 2),
        "normal_requests": len(normal),
        "normal_statuses": _counts(_outcome(status, error) for _, status, error, _ in normal),
        "normal_latency_ms": latency_summary_ms([s for _, status, _, s in normal if status == 200]),
        "server_cpu_s": None if died else round(clock.seconds(), 3),
        "rss_before_mb": None if rss_before is None else round(rss_before, 1),
        "rss_growth_mb": None if rss_before is None else round(max(0.0, max(peaks) - rss_before), 1),
        "server_died": died,
    }
    if report is not None:
        row.update(_hostile_summary(report))
    return row


def _ratio(value: float | None, reference: float | None) -> float | None:
    return None if value is None or not reference else round(value / reference, 2)


async def measure_interference(
    open_server: ServerOpener, reference: HostileCase, plan: InterferencePlan
) -> dict[str, Any]:
    """The idle baseline, then one window per class of `plan.classes`; a killed server is replaced."""
    photo = upload(reference)
    restarted_before: list[str] = []
    with ExitStack() as stack:
        server = stack.enter_context(open_server())
        target = await _warm_up(server, photo, plan)
        idle = await _window(server, photo, plan, None)
        idle_p99 = idle["normal_latency_ms"]["p99_ms"]
        log.info("idle: normal p50/p99 %s", idle["normal_latency_ms"])
        rows = []
        for name in plan.classes:
            if not process_alive(server.pid):
                restarted_before.append(name)
                stack.close()
                server = stack.enter_context(open_server())
                await _warm_up(server, photo, plan)
            spec = HostileSpec(
                name,
                server.port,
                target,
                plan.sizes,
                plan.hostile_max_requests,
                max_s=plan.window_s + plan.request_timeout_s,
                timeout_s=plan.request_timeout_s,
            )
            row = {"name": name, "description": CLASSES[name], **await _window(server, photo, plan, spec)}
            row["p99_ratio"] = _ratio(row["normal_latency_ms"]["p99_ms"], idle_p99)
            rows.append(row)
            log.info(
                "%-24s hostile %s; normal p99 %s ms (%s x idle); server CPU %s s, RSS +%s MB",
                name,
                row["hostile_statuses"],
                row["normal_latency_ms"]["p99_ms"],
                row["p99_ratio"],
                row["server_cpu_s"],
                row["rss_growth_mb"],
            )
    present, missing = image_cases()
    return {
        "reference": reference.name,
        "plan": asdict(plan),
        "hostile_client_nice": HOSTILE_NICE,
        "v2_target": asdict(target),
        "image_cases": [case.name for case in present],
        "image_cases_missing": missing,
        "idle": idle,
        "classes": rows,
        "server_restarted_before": restarted_before,
    }
