"""Dynamic batching: many requests' images, one `session.run`.

Batches take rows (images) from a FIFO queue of requests, at most `max_batch_size` per batch,
waiting at most `max_queue_delay_s` after the oldest arrived; a bigger request is split over
consecutive batches and reassembled in order. Batches run on `instances` worker threads, never the
event loop; with several instances a batch takes at most an equal share of the rows waiting, and at
most the rows one instance computes in about `INSTANCE_BATCH_S` (`_instance_rows`).

The event loop decides which batch starts on a free instance (`_dispatch`): a collector task does
when a request arrives, and a batch's own completion does in the event-loop turn that delivers its
outputs. Under load, an instance's thread that finishes a batch takes its next one itself, by the
same rules, under the lock both share (`_take_next`), and hands the finished outputs to the event
loop only then: an instance does not wait for an event-loop turn, nor to be woken and get the GIL,
between two batches (that wait had left each instance idle ~6 ms per ~40-ms batch at 32 clients).
Anything else — background rows, a request past its deadline, a lone request, shutdown — it leaves
to the event loop.

The queue is bounded in images, and admission happens before any work: `reserve(n)` holds room for
a request's n images as soon as their count is known (before decoding), or refuses at once (503).
So `max_queue_size` counts every image admitted and not yet handed to a batch — waiting to be
decoded, being decoded, or waiting here — and never the batch being computed. A request whose
deadline passes before any of its rows were taken is dropped before compute (504), and a failed
batch fails every request in it (500) while the next batch runs normally.

With `lone_batches`, a batch that has nothing else in sight — no batch computing, no other image
admitted (a lone request) — and too few rows to share among the instances runs as
`infer(batch, alone=True)`, taking every instance: the model may then compute it on every core
(`service.models.threads` says why that is not how batches run under load). A request that is alone
when admitted can skip the queue altogether (`lone_run`) unless a queue delay is set: the thread that
decodes its images computes them as soon as they are ready, with no hand-off to the event loop and the
inference thread and back, as long as no other request was admitted meanwhile (the first one to be
admitted takes that right away, and both are then batched as usual).

Given `batch_sizes` (a model on a GPU, whose kernels are chosen per input shape), a batch is padded
with zero rows to the next of those sizes, so it only ever runs shapes that were warmed up; the
padding rows' outputs are dropped. Without them (a CPU) a batch runs as formed.

Background requests (`submit_with(..., background=True)`: a gallery's examples being embedded) wait
in a queue of their own and never delay a request for long: they form batches of their own, at most
`BACKGROUND_BATCH` rows, when an instance is free and no other request waits — one such batch at a
time while requests are being computed, one per free instance while none is — or, when no such batch
started for `BACKGROUND_MAX_WAIT_S`, one at the next free instance even under load, so they progress
at a bounded cost to everyone else. A request that arrives meanwhile waits for one such batch at
most. Such a batch never runs alone on every core.

A request may ask for some of the model's other named outputs too (`Reservation.submit_with`: its
feature maps, its embedding): a batch fetches the union of what its requests asked for, as
`infer(batch, extra=names) -> (outputs, {name: rows})`, and each request receives exactly the outputs
it asked for. A batch in which nobody asked runs as `infer(batch)`, so plain batches cost what they did.

This module knows nothing about HTTP or ONNX Runtime: it calls `infer(batch) -> outputs`.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field

import numpy as np

from service.errors import (
    DeadlineExceededError,
    InferenceError,
    PayloadTooLargeError,
    QueueFullError,
    ServiceError,
    ServiceUnavailableError,
)
from service.metrics import ModelMetrics
from service.priority import yield_to_the_event_loop

logger = logging.getLogger(__name__)

BACKGROUND_BATCH = 4
"""Most rows in a batch of background requests: what a request arriving just after it started waits
for is one such batch, ~4 single-core inferences (EfficientNet-Lite0: ~65 ms)."""
BACKGROUND_MAX_WAIT_S = 0.25
"""After this long without a batch of them, background rows take the next free instance even while
requests wait: under a load that never leaves an instance idle they still advance, four batches a
second. Measured with 8 clients saturating 2 cores while 1,000 photos were added 10 per request: the
clients' p99 rose 1.14x (1.03x with 1 s, 1.6x with no background queue at all), and the adds ran at
12 images/s (5 with 1 s; 53 taking their turn with the requests)."""

INSTANCE_BATCH_S = 0.06
"""With several instances, a batch holds at most the rows one instance computes in about this long,
as last measured. A batch on one core computes its rows no faster for being big (ONNX Runtime on one
thread: 134 images/s at batch 1, 131 at 8, 118 at 32, EfficientNet-Lite0), but every row in it waits
for the last, so a big batch stretches the latency of the rows at its head. Measured with 32 and 64
clients on 2 cores (EfficientNet-Lite0, ~16 ms a row on a core shared with decoding): batches held
to 4 rows brought the p99 from 481 to 358 ms and from 951 to 661 ms; held to 2 rows, the batches' own
cost (thread hand-offs, stacking, delivery) took 8 %. The 4-row bound is not free either: its
smaller batches each have their own cost, about 2-3 % of the images a second at 32 clients against
batches of any size (paired 10-s rounds: 0.962-0.966x against 0.985-0.990x of the same reference,
within the rounds' spread of 0.90-1.17). A bound of ~9 rows (150 ms) cost little or none, but ONNX
Runtime's arena then keeps what the biggest batches need: the server's RSS grew 14 % (482 -> 548 MB)
between 1,000 and 20,000 requests, against 1 % with this bound. A model that computes a row in well
under a millisecond is not held: its batches stay as big as the queue makes them."""

Extras = Mapping[str, np.ndarray]
"""Named outputs besides the main one, each [N, ...] in the order of the rows."""
BatchOutputs = np.ndarray | tuple[np.ndarray, Extras]
InferFn = Callable[..., BatchOutputs]
"""`infer(batch)` -> outputs [N, ...]; `infer(batch, extra=names)` -> (outputs, {name: rows [N, ...]}) for
each of `names` (a non-empty frozenset), only called for batches holding a request that asked for
them. With `lone_batches`, a batch computed alone is also passed `alone=True`."""


@dataclass(eq=False)
class _Request:
    inputs: np.ndarray
    deadline: float
    enqueued_at: float
    future: asyncio.Future[tuple[np.ndarray, dict[str, np.ndarray]]]
    extra: frozenset[str] = frozenset()
    """The named outputs the request wants besides the main one."""
    background: bool = False
    """Whether it waits in the background queue (`DynamicBatcher` says how that is served)."""
    taken: int = 0
    """Rows already handed to a batch; the rest are still queued."""
    completed: int = 0
    assembled: tuple[np.ndarray, dict[str, np.ndarray]] | None = field(default=None, repr=False)
    """The outputs of a request split over several batches, filled in as its batches finish."""

    @property
    def size(self) -> int:
        return len(self.inputs)

    @property
    def untaken(self) -> int:
        return self.size - self.taken


@dataclass(frozen=True)
class _Segment:
    request: _Request
    start: int
    stop: int


class Reservation:
    """Room in the queue for one request's images, from admission until they are submitted; leaving
    its `with` block without `submit` (a decode error, a timeout, a cancellation) gives it back."""

    def __init__(self, batcher: DynamicBatcher, size: int) -> None:
        self._batcher = batcher
        self.size = size
        self._held = True

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    async def submit(self, inputs: np.ndarray, deadline: float) -> np.ndarray:
        """Outputs for `inputs` (exactly `size` rows) in order; `deadline` is a `time.monotonic()` time."""
        return (await self.submit_with(inputs, deadline, frozenset()))[0]

    async def submit_with(
        self, inputs: np.ndarray, deadline: float, extra: frozenset[str], background: bool = False
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """`submit`, and the named outputs `extra` for the same rows: (outputs, {name: rows}). The
        names must be ones the model has: a name it lacks fails the whole batch, so check them first.
        `background`: the rows yield to every other request (see `DynamicBatcher`)."""
        if not self._held:
            raise RuntimeError("this reservation was already used or released")
        if len(inputs) != self.size:
            raise ValueError(f"reserved {self.size} rows but submitted {len(inputs)}")
        self._held = False  # the rows move into the queue, which already counts them
        return await self._batcher._enqueue(inputs, deadline, extra, background)

    def release(self) -> None:
        if self._held:
            self._held = False
            self._batcher._release(self)


class LoneRun:
    """A lone request's right to be computed on every core by the thread that prepared its rows, as
    soon as they are ready, instead of through the queue (`DynamicBatcher.lone_run`).

    It is pending until that thread calls `compute`, and lapses if another request is admitted first
    (`DynamicBatcher.reserve`): the two are then batched as usual. Once computing, it holds every
    instance until the event loop has seen it end. One lock orders the two transitions, so exactly
    one of them happens.
    """

    def __init__(self, batcher: DynamicBatcher, reservation: Reservation, extra: frozenset[str]) -> None:
        self._batcher = batcher
        self._extra = extra
        self.reservation = reservation
        self._loop = asyncio.get_running_loop()
        self._lock = threading.Lock()
        self._state = "pending"  # -> "computing" (compute) or "lapsed" (lapse)

    @property
    def computing(self) -> bool:
        return self._state == "computing"

    def lapse(self) -> bool:
        """On the event loop: give up the right unless its rows are already computing; whether it lapsed."""
        with self._lock:
            if self._state == "pending":
                self._state = "lapsed"
            return self._state == "lapsed"

    def compute(self, inputs: np.ndarray, deadline: float) -> tuple[np.ndarray, dict[str, np.ndarray]] | None:
        """On the thread that prepared `inputs` (the reserved rows): their outputs, computed here on every
        core, as `Reservation.submit_with` would return them; None when the right lapsed or the deadline
        passed (submit them: the queue batches them, or refuses them with 504). `InferenceError` when
        the model fails on them."""
        if len(inputs) != self.reservation.size:
            raise ValueError(f"reserved {self.reservation.size} rows but computing {len(inputs)}")
        with self._lock:
            if self._state != "pending" or self._batcher._clock() >= deadline:
                self._state = "lapsed"
                return None
            self._state = "computing"
        try:
            outputs, extras, _ = self._batcher._compute(inputs, self._extra, alone=True)
        except Exception as exc:
            _log_failure(len(inputs), exc)
            raise _inference_error(len(inputs), exc) from exc
        finally:
            _call_on(self._loop, self._batcher._lone_ended, self)
        return outputs, dict(extras)


def _pad(batch: np.ndarray, sizes: tuple[int, ...]) -> np.ndarray:
    """`batch` with zero rows appended up to the smallest of `sizes` that holds it."""
    size = sizes[bisect.bisect_left(sizes, len(batch))]
    if size == len(batch):
        return batch
    padded = np.zeros((size, *batch.shape[1:]), dtype=batch.dtype)
    padded[: len(batch)] = batch
    return padded


def _rows_like(part: np.ndarray, rows: int) -> np.ndarray:
    """An empty array of `rows` rows shaped and typed as `part`'s."""
    return np.empty((rows, *part.shape[1:]), part.dtype)


def _log_failure(rows: int, exc: Exception) -> None:
    logger.error("inference failed on a batch of %d images: %s: %s", rows, type(exc).__name__, exc)


def _inference_error(rows: int, exc: Exception) -> InferenceError:
    return InferenceError(
        f"inference failed on the batch of {rows} images this request was part of "
        f"({type(exc).__name__}: {exc}); the request was not completed, retry it"
    )


def _call_on(loop: asyncio.AbstractEventLoop, callback: Callable[..., object], *args: object) -> None:
    """From any thread: `callback(*args)` on `loop`, unless the loop is already closed."""
    with suppress(RuntimeError):  # the server stopped without waiting for this
        loop.call_soon_threadsafe(callback, *args)


def _fail(request: _Request, error: ServiceError) -> None:
    if not request.future.done():
        request.future.set_exception(error)
        request.future.exception()  # mark retrieved: the waiter may already be gone


class DynamicBatcher:
    """Collects concurrent requests into batches; `submit` is the one public coroutine."""

    def __init__(
        self,
        infer: InferFn,
        *,
        max_batch_size: int,
        max_queue_delay_s: float,
        max_queue_size: int,
        instances: int = 1,
        metrics: ModelMetrics | None = None,
        batch_sizes: tuple[int, ...] | None = None,
        lone_batches: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`clock` is the time deadlines are given in (`time.monotonic`; a test may shift it)."""
        if max_batch_size < 1 or max_queue_size < max_batch_size or max_queue_delay_s < 0 or instances < 1:
            raise ValueError(
                f"need max_batch_size >= 1, max_queue_size >= max_batch_size, a delay >= 0 and "
                f"instances >= 1; got {max_batch_size}, {max_queue_size}, {max_queue_delay_s}, {instances}"
            )
        if batch_sizes is not None and (
            list(batch_sizes) != sorted(set(batch_sizes))
            or batch_sizes[0] < 1
            or batch_sizes[-1] != max_batch_size
        ):
            raise ValueError(
                f"batch_sizes must be increasing positive sizes ending at max_batch_size ({max_batch_size}); "
                f"got {batch_sizes}"
            )
        self._batch_sizes = batch_sizes
        self._infer = infer
        self._max_batch = max_batch_size
        self._max_delay = max_queue_delay_s
        self._max_queue = max_queue_size
        self._metrics = metrics
        self._queue: deque[_Request] = deque()
        self._background: deque[_Request] = deque()
        """Background requests, served as the module docstring says."""
        self._queued = 0
        self._instances = instances
        self._running: dict[asyncio.Future[None], list[_Segment]] = {}
        """Batches being computed, at most `instances` at once, and the rows in each; each future is
        done once its batch's outputs were delivered (or its requests failed)."""
        self._lone_batches = lone_batches
        self._alone: asyncio.Future[None] | None = None
        """The batch computing alone, which takes every instance; None when there is none."""
        self._lone: LoneRun | None = None
        """The lone request pending or computing outside the queue (`lone_run`); None when there is none."""
        self._clock = clock
        self._background_batches: set[asyncio.Future[None]] = set()
        """The batches of background rows being computed, a subset of `_running`."""
        self._background_turn = -math.inf
        """When background rows last started a batch (`clock`): their wait is counted from
        there or from their arrival, whichever is later, so going first under load is one batch a turn."""
        self._wakeup = asyncio.Event()
        self._lock = threading.RLock()
        """Held while the queues, the count of queued images or the running batches change, or while a
        decision is made from them: the event loop makes them, and an instance's thread too when it
        takes its next batch itself (`_take_next`)."""
        self._executor = ThreadPoolExecutor(
            max_workers=instances, thread_name_prefix="convserve-infer", initializer=yield_to_the_event_loop
        )
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._row_s: float | None = None
        """Seconds one instance takes per row of a batch, a moving average over its batches (not those
        computed alone on every core); None until one was computed. It sizes batches on several
        instances (`_instance_rows`) and the Retry-After of a full queue."""

    @property
    def queued_images(self) -> int:
        """Images admitted and not yet in a batch: reserved, being decoded, or queued here."""
        return self._queued

    def has_alone(self, size: int) -> bool:
        """Whether a request of `size` admitted images is all there is: no other image admitted and no
        batch computing, with lone batches on. Its batch will then compute alone on every core."""
        with self._lock:  # an instance's thread passes its instance from one batch to the next under it
            return (
                self._lone_batches
                and not self._closing
                and not self._running
                and self._lone is None
                and self._queued == size
            )

    def lone_run(self, reservation: Reservation, extra: frozenset[str] = frozenset()) -> LoneRun | None:
        """For a reserved request that is all there is (`has_alone`): the right to compute its rows, with
        the named outputs `extra`, on the thread that prepares them (`LoneRun.compute`); None otherwise.
        Also None with a queue delay, which promises to hold a lone request for company, and for more
        rows than one batch may hold, which the queue splits."""
        if self._max_delay > 0 or reservation.size > self._max_batch or not self.has_alone(reservation.size):
            return None
        self._lone = LoneRun(self, reservation, extra)
        return self._lone

    async def start(self) -> None:
        """Start the collector task on the running loop."""
        if self._task is None:
            self._task = asyncio.create_task(self._collect(), name="convserve-batcher")

    def check_room(self, size: int = 1) -> None:
        """Raise what `reserve(size)` would raise, holding nothing (to refuse before reading a body)."""
        if self._closing:
            raise ServiceUnavailableError("the server is shutting down; retry on another replica")
        if size < 1:
            raise ValueError("a request needs at least one row")
        if size > self._max_queue:
            raise PayloadTooLargeError(
                f"the request carries {size} images but at most {self._max_queue} can be queued "
                "(CONVSERVE_MAX_QUEUE_SIZE); split it into smaller requests"
            )
        if self._queued + size > self._max_queue:
            # Until what is queued, and one more batch, has been computed on every instance.
            rows = self._queued + self._instance_rows()
            retry_after = max(1, math.ceil(rows * (self._row_s or 0.0) / self._instances))
            raise QueueFullError(
                f"the queue is full ({self._queued} of {self._max_queue} images admitted and waiting); "
                f"retry in {retry_after} s",
                retry_after_s=retry_after,
            )

    def reserve(self, size: int) -> Reservation:
        """Admit a request of `size` images now or refuse it (503 full, 413 too big, 503 closing)."""
        self.check_room(size)
        if self._lone is not None and self._lone.lapse():  # not alone anymore: both go through the queue
            self._lone = None
        self._count_queued(size)
        return Reservation(self, size)

    async def submit(self, inputs: np.ndarray, deadline: float) -> np.ndarray:
        """Outputs for `inputs` ([N, ...] rows, N >= 1) in order; `deadline` is a `time.monotonic()` time."""
        return await self.reserve(len(inputs)).submit(inputs, deadline)

    def _release(self, reservation: Reservation) -> None:
        lone = self._lone
        if lone is not None and lone.reservation is reservation and lone.lapse():  # it never got computed
            self._lone = None
        self._unreserve(reservation.size)

    def _unreserve(self, size: int) -> None:
        self._count_queued(-size)
        self._wakeup.set()  # a draining collector may be waiting for the last reservations

    async def _enqueue(
        self, inputs: np.ndarray, deadline: float, extra: frozenset[str], background: bool
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Queue rows whose room is already counted in `_queued`; wait for their outputs."""
        now = self._clock()
        future = asyncio.get_running_loop().create_future()
        request = _Request(inputs, deadline, now, future, extra, background)
        if self._task is None or self._task.done():
            self._unreserve(request.size)
            raise ServiceUnavailableError("the server shut down before this request was queued; retry it")
        if now >= deadline:
            self._unreserve(request.size)
            raise DeadlineExceededError("the request's deadline passed before it could be queued")
        with self._lock:
            (self._background if background else self._queue).append(request)
        self._wakeup.set()
        try:
            return await asyncio.wait_for(asyncio.shield(request.future), timeout=deadline - now)
        except TimeoutError:
            if self._drop_untaken(request):
                raise DeadlineExceededError(
                    f"the request waited {deadline - now:.3g} s in the queue without reaching the model "
                    "(CONVSERVE_REQUEST_TIMEOUT_S); the server is overloaded, retry later"
                ) from None
            return await request.future  # part of it is computing: accepted work is finished, not dropped
        except asyncio.CancelledError:
            self._drop_untaken(request)
            raise

    def _drop_untaken(self, request: _Request) -> bool:
        """Take a request out of the queue unless some of its rows were taken (they will be answered);
        whether it was. Atomic: an instance's thread may be taking rows."""
        with self._lock:
            untaken = request.taken == 0 and not request.future.done()
            if untaken:
                self._drop(request)
            return untaken

    async def close(self, timeout_s: float) -> None:
        """Refuse new work, finish queued and in-flight batches (up to `timeout_s`), then stop."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
            except TimeoutError:
                self._abandon(timeout_s)
                with suppress(asyncio.CancelledError):
                    await self._task
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _abandon(self, timeout_s: float) -> None:
        assert self._task is not None
        self._task.cancel()
        with self._lock:  # no instance's thread takes another batch from here on
            in_flight = [segment for segments in self._running.values() for segment in segments]
            for batch in self._running:
                batch.cancel()
            self._running.clear()  # their outputs, should they come, have nobody left to go to
            self._alone = None
            self._background_batches.clear()
            queued = (*self._queue, *self._background)
        stranded = {id(s.request): s.request for s in in_flight} | {id(r): r for r in queued}
        logger.error(
            "batcher did not drain within %.3g s; failing %d unfinished requests", timeout_s, len(stranded)
        )
        for request in stranded.values():
            self._drop(request)
            _fail(
                request,
                ServiceUnavailableError("the server shut down before this request finished; retry it"),
            )

    def _count_queued(self, change: int) -> None:
        with self._lock:
            self._queued += change
            if self._metrics is not None:
                self._metrics.queue_depth.set(self._queued)

    def _drop(self, request: _Request) -> None:
        """Take a request's remaining rows out of the queue."""
        with self._lock, suppress(ValueError):
            (self._background if request.background else self._queue).remove(request)
            self._count_queued(-request.untaken)

    async def _collect(self) -> None:
        while True:
            hold_s = self._dispatch()
            with self._lock:
                drained = not (self._queued or self._queue or self._background or self._lone)
                running = list(self._running)
            if self._closing and drained:  # nothing admitted is left to start (a lone run has ended too)
                if running:  # but the batches computing still deliver
                    await asyncio.wait(running)
                return
            # Until a request arrives or a batch ends, or the queue's head has waited its delay.
            self._wakeup.clear()
            with suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), hold_s)

    def _dispatch(self) -> float | None:
        """Start every batch that may start now, on the free instances (the module docstring says which
        rows go first and how many go together). Called by the collector whenever something changed, and
        by a batch as it ends, so that its instance's next batch starts in the same event-loop turn.
        Returns how long the queue's head still waits for company (`max_queue_delay_s`) while an
        instance is free for it, else None (nothing starts before a request arrives or a batch ends)."""
        try:
            with self._lock:
                while len(self._running) < self._instances and self._alone is None:
                    if self._lone is not None and self._lone.computing:  # it holds every instance
                        return None
                    if self._background_due(starving_only=True):  # waited long enough to go first
                        self._start(self._take_batch(BACKGROUND_BATCH, self._background), background=True)
                    elif self._queue:
                        hold_s = self._hold_s()
                        if hold_s > 0:
                            return hold_s
                        if self._is_alone():
                            self._start(self._take_batch(self._max_batch), alone=True)
                            return None
                        share = self._share()
                        while self._queue and len(self._running) < self._instances:
                            self._start(self._take_batch(share))
                    elif self._background_due(starving_only=False):  # their turn: no request waits
                        self._start(self._take_batch(BACKGROUND_BATCH, self._background), background=True)
                    else:
                        return None
        except Exception:  # a bug here must not stop batching for everyone
            logger.exception("batch scheduling error; continuing")
        return None

    def _hold_s(self) -> float:
        """How much longer the queue's head waits for other requests to share its batch: until
        `max_queue_delay_s` after it arrived, unless a full batch's worth of images was admitted or the
        server is closing."""
        if self._closing or self._queued >= self._max_batch:
            return 0.0
        return self._queue[0].enqueued_at + self._max_delay - self._clock()

    def _is_alone(self) -> bool:
        """Whether what waits is a batch with nothing else in sight, too small to share among instances:
        no batch computing, and every image admitted is queued (none is still being decoded)."""
        if not self._lone_batches or self._running or not self._queue:
            return False
        waiting = sum(request.untaken for request in self._queue)
        return waiting == self._queued and waiting < self._instances

    def _background_due(self, starving_only: bool) -> bool:
        """Whether a batch of background rows may start now: an instance is free, no other request
        waits, and no request is being computed unless no such batch is either — or, `starving_only`,
        they have waited `BACKGROUND_MAX_WAIT_S` for a batch (then one goes first, whatever waits)."""
        if not self._background or len(self._running) >= self._instances or self._alone is not None:
            return False
        waiting_since = max(self._background[0].enqueued_at, self._background_turn)
        if self._clock() - waiting_since >= BACKGROUND_MAX_WAIT_S:
            return True
        # Under load, several batches of them at once would hold every instance a request frees into.
        idle = len(self._background_batches) == len(self._running)
        return not starving_only and not self._queue and (idle or not self._background_batches)

    def _start(self, segments: list[_Segment], alone: bool = False, background: bool = False) -> None:
        """Hand a batch to a free instance's thread."""
        if not segments:
            return
        loop = asyncio.get_running_loop()
        batch: asyncio.Future[None] = loop.create_future()
        self._running[batch] = segments
        if alone:
            self._alone = batch
        if background:
            self._background_batches.add(batch)
            self._background_turn = self._clock()
        self._executor.submit(self._work, loop, batch, segments, alone)

    def _work(
        self,
        loop: asyncio.AbstractEventLoop,
        batch: asyncio.Future[None],
        segments: list[_Segment],
        alone: bool,
    ) -> None:
        """An instance's thread, from a batch the event loop gave it: compute it, take the next batch
        from the queue itself if it may (`_take_next`), hand the outputs to the event loop, and go on
        with that batch; return when there is none for it. Under load an instance thus never waits for
        the event loop between batches, nor for this thread to be woken."""
        while True:
            try:
                outcome: tuple[np.ndarray, Extras, float] | Exception = self._infer_batch(segments, alone)
            except Exception as exc:
                outcome = exc
            following = None
            if not (alone or isinstance(outcome, Exception)):
                try:
                    following = self._take_next(loop, batch)
                except Exception:  # a bug here must not keep this batch's outputs from their requests
                    logger.exception("taking the next batch on an instance's thread failed; continuing")
            _call_on(loop, self._computed, batch, segments, outcome)
            if following is None:
                return
            batch, segments = following

    def _take_next(
        self, loop: asyncio.AbstractEventLoop, done: asyncio.Future[None]
    ) -> tuple[asyncio.Future[None], list[_Segment]] | None:
        """On the thread of an instance whose batch `done` just computed: the batch it takes next, as the
        event loop would give it one; None when that is the event loop's to decide (background rows, a
        lone run, a request past its deadline, a batch held or to run alone, shutdown) or nothing waits."""
        with self._lock:
            if (
                self._closing
                or self._background
                or self._lone is not None
                or not self._queue
                or done not in self._running
                or self._hold_s() > 0
            ):
                return None
            computed = self._running.pop(done)  # its instance is free: for the rows waiting, as on the loop
            segments = None if self._is_alone() else self._take_batch(self._share(), on_loop=False)
            if not segments:
                self._running[done] = computed  # still its instance's until the event loop delivers it
                return None
            batch: asyncio.Future[None] = loop.create_future()
            self._running[batch] = segments
            return batch, segments

    def _computed(
        self,
        batch: asyncio.Future[None],
        segments: list[_Segment],
        outcome: tuple[np.ndarray, Extras, float] | Exception,
    ) -> None:
        """On the event loop, once a batch's thread is done with it: its requests get their outputs (or
        fail), and a free instance takes the next batch, in this same event-loop turn."""
        if batch.cancelled():  # abandoned at shutdown: its requests were failed already
            return
        with self._lock:
            self._running.pop(batch, None)  # unless its thread already passed its instance on
            alone = batch is self._alone
            if alone:
                self._alone = None
            self._background_batches.discard(batch)
        if isinstance(outcome, Exception):
            self._fail_batch(segments, outcome)  # before the next batch takes the rest of a split request
        else:
            outputs, extras, seconds = outcome
            if not alone:  # a batch on every core says nothing of one instance's speed
                row_s = seconds / len(outputs)
                self._row_s = row_s if self._row_s is None else 0.8 * self._row_s + 0.2 * row_s
            self._deliver(segments, outputs, extras)
        self._dispatch()
        batch.set_result(None)
        self._wakeup.set()  # the collector: a queue delay to time anew, or a drain to finish

    def _share(self) -> int:
        """Rows per batch for the free instances now: an equal share of what waits, per instance.

        Each instance computes its batch on its own threads, so one batch of everything waiting would
        hold all those rows for a whole single-instance run while the busy instances free up. Free
        instances each take a share now, of at most `_instance_rows`; the rest goes to the next
        instance that frees.
        """
        waiting = sum(request.untaken for request in self._queue)
        return max(1, min(self._instance_rows(), math.ceil(waiting / self._instances)))

    def _instance_rows(self) -> int:
        """The most rows a batch on one of several instances holds: those it computes in about
        `INSTANCE_BATCH_S`, by the last batches' speed; `max_batch_size` with one instance."""
        if self._instances == 1 or self._row_s is None:
            return self._max_batch
        return max(1, min(self._max_batch, round(INSTANCE_BATCH_S / self._row_s)))

    def _take_batch(
        self, space: int, queue: deque[_Request] | None = None, on_loop: bool = True
    ) -> list[_Segment]:
        """Up to `space` rows from the head of `queue` (default: the requests' queue), failing the
        requests past their deadline on the way; off the event loop (`on_loop=False`), the rows before
        the first such request (its failure is the event loop's to deliver)."""
        queue = self._queue if queue is None else queue
        segments: list[_Segment] = []
        now = self._clock()
        while queue and space > 0:
            request = queue[0]
            if request.taken == 0 and now >= request.deadline:
                if not on_loop:
                    break
                self._drop(request)
                _fail(request, DeadlineExceededError("the request's deadline passed while it was queued"))
                continue
            rows = min(request.untaken, space)
            segments.append(_Segment(request, request.taken, request.taken + rows))
            if request.taken == 0 and self._metrics is not None:
                self._metrics.queue_wait.observe(now - request.enqueued_at)
            request.taken += rows
            space -= rows
            if request.untaken == 0:
                queue.popleft()
            self._count_queued(-rows)
        return segments

    def _infer_batch(self, segments: list[_Segment], alone: bool) -> tuple[np.ndarray, Extras, float]:
        """Runs on the inference thread: stack the rows, run the model once (fetching the named outputs
        any request in the batch asked for; on every core when `alone`); the outputs and the seconds the
        model took."""
        rows = [s.request.inputs[s.start : s.stop] for s in segments]
        # The rows' own dtype: float32, or uint8 pixels for a model that normalizes in its graph.
        batch = np.ascontiguousarray(rows[0] if len(rows) == 1 else np.concatenate(rows))
        extra = frozenset().union(*(segment.request.extra for segment in segments))
        return self._compute(batch, extra, alone)

    def _compute(
        self, batch: np.ndarray, extra: frozenset[str], alone: bool
    ) -> tuple[np.ndarray, Extras, float]:
        """Run the model once on `batch` (on an inference thread, or a lone run's own thread)."""
        if self._metrics is not None:
            self._metrics.batch_size.observe(len(batch))
        options: dict[str, object] = {"extra": extra} if extra else {}
        if alone:
            options["alone"] = True
        padded = batch if self._batch_sizes is None else _pad(batch, self._batch_sizes)
        start = time.perf_counter()
        result = self._infer(padded, **options)
        seconds = time.perf_counter() - start
        if self._metrics is not None:
            self._metrics.inference_duration.observe(seconds)
        outputs, fetched = result if extra else (result, {})
        assert isinstance(outputs, np.ndarray)
        extras = {name: fetched[name] for name in extra}  # only what was asked for
        if any(len(part) != len(padded) for part in (outputs, *extras.values())):
            counts = [len(outputs), *(len(part) for part in extras.values())]
            raise RuntimeError(f"the model returned {counts} rows for a batch of {len(padded)}")
        rows_formed = len(batch)  # padding rows dropped
        return outputs[:rows_formed], {name: part[:rows_formed] for name, part in extras.items()}, seconds

    def _deliver(self, segments: list[_Segment], outputs: np.ndarray, extras: Extras) -> None:
        offset = 0
        for segment in segments:
            request, rows = segment.request, segment.stop - segment.start
            if not request.future.done():
                mine = slice(offset, offset + rows)
                own = (outputs[mine], {name: extras[name][mine] for name in request.extra})
                if rows == request.size:
                    request.future.set_result(own)
                else:
                    if request.assembled is None:
                        request.assembled = (
                            _rows_like(own[0], request.size),
                            {name: _rows_like(part, request.size) for name, part in own[1].items()},
                        )
                    place = slice(segment.start, segment.stop)
                    request.assembled[0][place] = own[0]
                    for name, part in own[1].items():
                        request.assembled[1][name][place] = part
                    request.completed += rows
                    if request.completed == request.size:
                        request.future.set_result(request.assembled)
            offset += rows

    def _fail_batch(self, segments: list[_Segment], exc: Exception) -> None:
        rows = sum(s.stop - s.start for s in segments)
        _log_failure(rows, exc)
        for request in {id(s.request): s.request for s in segments}.values():
            self._drop(request)  # the rest of a split request is useless without this part
            _fail(request, _inference_error(rows, exc))

    def _lone_ended(self, run: LoneRun) -> None:
        """On the event loop, once a lone run's thread is done with it: its rows leave the count of
        admitted images (unless its request already gave them back), and the instances are free."""
        if self._lone is run:
            self._lone = None
        if self._metrics is not None:
            self._metrics.queue_wait.observe(0.0)  # it never waited in the queue
        run.reservation.release()  # unless its request is gone and gave its rows back already
        self._wakeup.set()  # what was admitted meanwhile may start
