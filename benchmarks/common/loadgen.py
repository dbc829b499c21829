"""The load generator: sends JPEGs, closed loop or open loop, and keeps every outcome.

What one request is comes from a `Transport`: by default a multipart upload to a URL (`/predict`);
`benchmarks.performance.protocols` adds V2 REST and V2 gRPC ones. A transport answers with an HTTP-like
status (gRPC codes are mapped: OK 200, UNAVAILABLE 503, ...) so every figure is counted the same way.

Closed loop (`closed_loop`): N clients each send a request, wait for the answer, send the next — how a
fixed pool of callers behaves; throughput is whatever the server sustains at that concurrency.
Open loop (`open_loop`): requests are sent on a fixed schedule whether or not earlier ones have been
answered, as independent users do; latency is measured from the scheduled send time so a server that
falls behind is charged for the queueing it causes (no coordinated omission).

Both return a `LoadRun`: every request's `Outcome` (when it was sent or due, when it ended, the status
or the client-side error) and the measured window. A window has a warm-up that is not measured, a
measured part bounded both in seconds and in requests, and a drain bounded by the request timeout.
`LoadRun.result()` gives the figures of a benchmark level (latencies and errors of the requests started
inside the window, throughput from the successful answers received inside it); the robustness phases
read the outcomes themselves (how many were refused, lost, …).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from benchmarks.common.corpus import Photo
from benchmarks.common.stats import latency_summary_ms

DEFAULT_REQUEST_TIMEOUT_S = 60.0
REFUSAL_STATUSES = frozenset({429, 503})
CLIENT_BACKLOG = "client_backlog"
"""The error of an open-loop send skipped because too many requests were still unanswered."""


@dataclass(frozen=True)
class Outcome:
    """One request: when it was sent (open loop: when it was due), when it ended, and how."""

    sent: float
    """perf_counter() time the request was sent, or due to be sent (open loop)."""
    finished: float
    status: int | None
    """HTTP status of the whole answer; None when no answer was read."""
    error: str | None
    """Client-side error kind (connection, timeout, truncated body, `client_backlog`); None with a status."""

    @property
    def kind(self) -> str:
        """answered (200), refused (429/503: "not now"), lost (the server took it and failed it),
        connection_error (refused or reset at the TCP level, or no answer in time) or unsent."""
        if self.error == CLIENT_BACKLOG:
            return "unsent"
        if self.error is not None:
            return "connection_error"
        if self.status == 200:
            return "answered"
        if self.status in REFUSAL_STATUSES:
            return "refused"
        return "lost"

    @property
    def latency_s(self) -> float:
        return self.finished - self.sent

    @property
    def error_label(self) -> str | None:
        """None for a 200, else `http_503`, `ClientOSError(errno 104)`, … (the results' error kinds)."""
        if self.error is not None:
            return self.error
        return None if self.status == 200 else f"http_{self.status}"


def error_kind(exc: BaseException) -> str:
    """`ClientOSError(errno 104)`: the class, plus the errno that tells a reset from a refusal."""
    errno = getattr(exc, "errno", None)
    return f"{type(exc).__name__}(errno {errno})" if errno else type(exc).__name__


def client_session(connections: int, timeout_s: float) -> aiohttp.ClientSession:
    """A session with at most `connections` connections, each request bounded by `timeout_s`."""
    connector = aiohttp.TCPConnector(limit=connections)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s))


async def post_photo(session: aiohttp.ClientSession, url: str, photo: Photo) -> tuple[int | None, str | None]:
    """POST one photo as `multipart/form-data` (field `file`) and read the whole answer: (status, error)."""
    form = aiohttp.FormData()
    form.add_field("file", photo.data, filename=photo.filename, content_type="image/jpeg")
    try:
        async with session.post(url, data=form) as response:
            # Read the whole body: a real client does, and the server's JSON cost belongs in the figure.
            await response.read()
            return response.status, None
    except (aiohttp.ClientError, TimeoutError) as exc:
        return None, error_kind(exc)


Send = Callable[[Photo], Awaitable[tuple[int | None, str | None]]]
"""Sends one photo and reads the whole answer: (status, client-side error), as `post_photo` does."""
Transport = Callable[[int, float], AbstractAsyncContextManager[Send]]
"""Opens at most `connections` connections, each request bounded by `timeout_s`, for one run."""


def multipart_transport(url: str) -> Transport:
    """Each photo POSTed to `url` as a multipart upload (`post_photo`)."""

    @asynccontextmanager
    async def connect(connections: int, timeout_s: float) -> AsyncIterator[Send]:
        async with client_session(connections, timeout_s) as session:
            yield functools.partial(post_photo, session, url)

    return connect


def _transport(target: str | Transport) -> Transport:
    return multipart_transport(target) if isinstance(target, str) else target


@dataclass(frozen=True)
class Window:
    """What part of a run is measured."""

    duration_s: float
    """Measured window, seconds (after the warm-up)."""
    warmup_s: float = 0.0
    """Load applied before the window (lets queues and thread pools reach steady state), seconds."""
    max_requests: int = 1_000_000
    """Requests started in the window at most; the window closes early when reached."""

    def __post_init__(self) -> None:
        if self.duration_s <= 0 or self.warmup_s < 0 or self.max_requests < 1:
            raise ValueError(
                f"need duration_s > 0, warmup_s >= 0 and max_requests >= 1; got {self.duration_s}, "
                f"{self.warmup_s}, {self.max_requests}"
            )


@dataclass
class _Clock:
    """The window in perf_counter() time; closes early once its request budget is spent."""

    start: float
    end: float
    max_requests: int
    started: int = 0

    @classmethod
    def at(cls, begin: float, window: Window) -> _Clock:
        start = begin + window.warmup_s
        return cls(start=start, end=start + window.duration_s, max_requests=window.max_requests)

    def admits(self, sent: float) -> bool:
        return self.start <= sent < self.end

    def count_start(self, sent: float) -> None:
        if self.admits(sent):
            self.started += 1
            if self.started >= self.max_requests:
                # The request budget is spent: close the window now so the run stays bounded.
                self.end = sent + 1e-9


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


@dataclass
class LoadRun:
    """Every outcome of one run and its measured window (`window_start` … `window_end`, perf_counter)."""

    mode: str
    level: float
    window_start: float
    window_end: float
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def measured(self) -> list[Outcome]:
        """The outcomes of the requests sent (or due) inside the window."""
        return [o for o in self.outcomes if self.window_start <= o.sent < self.window_end]

    @property
    def sent_total(self) -> int:
        return sum(outcome.kind != "unsent" for outcome in self.outcomes)

    def result(self) -> LoadResult:
        """Latency and errors of the requests started in the window; throughput = 200s received in it."""
        measured = self.measured
        errors = Counter(label for o in measured if (label := o.error_label) is not None)
        answered_inside = sum(
            o.kind == "answered" and self.window_start <= o.finished <= self.window_end for o in self.outcomes
        )
        window_s = self.window_end - self.window_start
        return LoadResult(
            mode=self.mode,
            level=self.level,
            window_s=window_s,
            ok=sum(o.kind == "answered" for o in measured),
            errors=sum(errors.values()),
            error_kinds=dict(errors),
            img_per_s=answered_inside / window_s if window_s > 0 else 0.0,
            latency_ms=latency_summary_ms([o.latency_s for o in measured if o.kind == "answered"]),
            sent_total=self.sent_total,
        )


async def closed_loop(
    target: str | Transport,
    photos: Sequence[Photo],
    concurrency: int,
    window: Window,
    *,
    stop: asyncio.Event | None = None,
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
) -> LoadRun:
    """`concurrency` clients back to back until the window ends (or `stop` is set), then drain.

    `target` is a URL to upload to as multipart, or a `Transport`.
    A client starts no request after the window's end or once `stop` is set; every request it started
    is awaited (bounded by `request_timeout_s`)."""
    if concurrency < 1:
        raise ValueError(f"need concurrency >= 1, got {concurrency}")
    clock = _Clock.at(time.perf_counter(), window)
    run = LoadRun("concurrency", concurrency, clock.start, clock.end)
    cycle = itertools.cycle(photos)

    async def client(send: Send) -> None:
        while (sent := time.perf_counter()) < clock.end and not (stop is not None and stop.is_set()):
            clock.count_start(sent)
            status, error = await send(next(cycle))
            run.outcomes.append(Outcome(sent, time.perf_counter(), status, error))

    async with _transport(target)(concurrency, request_timeout_s) as send:
        await asyncio.gather(*(client(send) for _ in range(concurrency)))
    run.window_end = clock.end
    return run


async def open_loop(
    target: str | Transport,
    photos: Sequence[Photo],
    rate_per_s: float,
    window: Window,
    *,
    max_outstanding: int = 512,
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
) -> LoadRun:
    """One request every 1/`rate_per_s` seconds, evenly spaced (perf_analyzer's "constant"), from the
    warm-up to the window's end; then every unanswered request is awaited.

    More than `max_outstanding` unanswered requests means the server has fallen hopelessly behind: the
    send is skipped and recorded as `unsent` (`client_backlog`), which bounds the client's memory and
    sockets when the server stops answering altogether.
    """
    if rate_per_s <= 0:
        raise ValueError(f"need rate_per_s > 0, got {rate_per_s}")
    begin = time.perf_counter()
    clock = _Clock.at(begin, window)
    horizon_s = window.warmup_s + window.duration_s
    run = LoadRun("rate", rate_per_s, clock.start, clock.end)
    schedule: Iterator[Photo] = itertools.cycle(photos)
    in_flight: set[asyncio.Task[None]] = set()

    async def request(send: Send, photo: Photo, due: float) -> None:
        status, error = await send(photo)
        run.outcomes.append(Outcome(due, time.perf_counter(), status, error))

    async with _transport(target)(max_outstanding, request_timeout_s) as send:
        for index in itertools.count():
            offset = index / rate_per_s
            due = begin + offset
            # The offset decides the count (rate × seconds, whatever the rounding of `begin` + offset);
            # the clock only when a spent request budget closed the window early.
            if offset >= horizon_s or due >= clock.end:
                break
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            clock.count_start(due)
            if len(in_flight) >= max_outstanding:
                run.outcomes.append(Outcome(due, due, None, CLIENT_BACKLOG))
                continue
            task = asyncio.create_task(request(send, next(schedule), due))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        if in_flight:
            await asyncio.wait(in_flight)
    run.window_end = clock.end
    return run
