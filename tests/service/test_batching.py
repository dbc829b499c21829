"""The dynamic batcher against the real tiny model's `session.run`, with metrics on a fresh registry."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from service.errors import (
    DeadlineExceededError,
    InferenceError,
    PayloadTooLargeError,
    QueueFullError,
    ServiceUnavailableError,
)
from service.inference import batching
from service.inference.batching import DynamicBatcher, InferFn, Reservation
from service.metrics import Metrics
from service.models.runtime import OnnxModel
from tests.waiting import wait_until_async

HANG_GUARD_S = 30.0  # only stops a broken batcher from hanging the suite; never a speed check


def rows(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 3, 32, 32)).astype(np.float32)


LABELS = {"model": "test", "version": "1"}
_METRICS: dict[int, Metrics] = {}


def sample(metrics: Metrics, name: str) -> float:
    return metrics.registry.get_sample_value(name, LABELS) or 0.0


def batch_sizes(metrics: Metrics) -> tuple[float, float]:
    """(number of session.run calls, images in them) from the batch-size histogram."""
    return sample(metrics, "convserve_batch_size_count"), sample(metrics, "convserve_batch_size_sum")


def run(coroutine_fn: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    async def guarded() -> Any:
        return await asyncio.wait_for(coroutine_fn(), HANG_GUARD_S)

    return asyncio.run(guarded())


def make(
    infer: InferFn,
    *,
    max_batch: int = 4,
    delay_s: float = 0.002,
    queue: int = 16,
    instances: int = 1,
    lone_batches: bool = False,
) -> DynamicBatcher:
    metrics = Metrics(CollectorRegistry(), max_batch)
    batcher = DynamicBatcher(
        infer,
        max_batch_size=max_batch,
        max_queue_delay_s=delay_s,
        max_queue_size=queue,
        instances=instances,
        metrics=metrics.for_model(LABELS["model"], int(LABELS["version"])),
        lone_batches=lone_batches,
    )
    _METRICS[id(batcher)] = metrics
    return batcher


def metrics_of(batcher: DynamicBatcher) -> Metrics:
    return _METRICS[id(batcher)]


def later(seconds: float = HANG_GUARD_S) -> float:
    return time.monotonic() + seconds


async def collector_turns(batcher: DynamicBatcher, turns: int = 20) -> int:
    """The images still queued after `turns` turns of the event loop, at each of which the collector
    runs: what it would start now, it has started."""
    for _ in range(turns):
        await asyncio.sleep(0)
    return batcher.queued_images


def submit_all(batcher: DynamicBatcher, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """Start the batcher, submit every input concurrently, drain it, and return the outputs in order."""

    async def scenario() -> list[np.ndarray]:
        await batcher.start()
        results = await asyncio.gather(*(batcher.submit(x, later()) for x in inputs))
        await batcher.close(5)
        return list(results)

    return list(run(scenario))


def test_batch_flushes_when_full_without_waiting_for_the_delay(tiny_model: OnnxModel) -> None:
    # A one-minute delay: only a size-triggered flush lets these complete within the hang guard.
    batcher = make(tiny_model.run, max_batch=4, delay_s=60.0)
    inputs = [rows(1, seed) for seed in range(4)]
    results = submit_all(batcher, inputs)
    assert batch_sizes(metrics_of(batcher)) == (1.0, 4.0)
    for x, result in zip(inputs, results, strict=True):
        np.testing.assert_allclose(result, tiny_model.run(x), atol=1e-6)


def test_lone_request_flushes_after_max_delay(tiny_model: OnnxModel) -> None:
    delay_s = 0.05
    batcher = make(tiny_model.run, max_batch=8, delay_s=delay_s)

    async def scenario() -> np.ndarray:
        await batcher.start()
        result = await batcher.submit(rows(1), later())
        await batcher.close(5)
        return result

    assert run(scenario).shape == (1, 3)
    metrics = metrics_of(batcher)
    assert batch_sizes(metrics) == (1.0, 1.0)
    # The collector holds the first request for the whole delay hoping for company.
    assert sample(metrics, "convserve_queue_wait_seconds_sum") >= delay_s * 0.99


def test_concurrent_requests_share_batches(tiny_model: OnnxModel) -> None:
    batcher = make(tiny_model.run, max_batch=8, delay_s=0.02, queue=64)
    inputs = [rows(1, seed) for seed in range(16)]
    results = submit_all(batcher, inputs)
    calls, images = batch_sizes(metrics_of(batcher))
    assert images == 16
    assert images / calls > 1, f"mean batch size {images / calls} shows no batching"
    for x, result in zip(inputs, results, strict=True):
        np.testing.assert_allclose(result, tiny_model.run(x), atol=1e-6)


def test_oversized_request_is_split_and_reassembled_in_order(tiny_model: OnnxModel) -> None:
    batcher = make(tiny_model.run, max_batch=4, delay_s=0.0)
    big, small = rows(10, seed=1), rows(3, seed=2)

    async def scenario() -> tuple[np.ndarray, np.ndarray]:
        await batcher.start()
        first, second = await asyncio.gather(batcher.submit(big, later()), batcher.submit(small, later()))
        await batcher.close(5)
        return first, second

    first, second = run(scenario)
    np.testing.assert_allclose(first, tiny_model.run(big), atol=1e-6)
    np.testing.assert_allclose(second, tiny_model.run(small), atol=1e-6)
    calls, images = batch_sizes(metrics_of(batcher))
    assert images == 13 and calls == 4  # 4 + 4 + (2 of big + 2 of small) + 1


def test_failed_batch_fails_every_waiter_and_the_next_batch_runs(tiny_model: OnnxModel) -> None:
    # 16x16 rows are the wrong size for the 32x32 model: ONNX Runtime itself rejects the batch.
    batcher = make(tiny_model.run, max_batch=8, delay_s=0.02)
    wrong = [np.zeros((1, 3, 16, 16), np.float32) for _ in range(3)]

    async def scenario() -> tuple[list[Any], np.ndarray]:
        await batcher.start()
        failed = await asyncio.gather(*(batcher.submit(x, later()) for x in wrong), return_exceptions=True)
        recovered = await batcher.submit(rows(2), later())
        await batcher.close(5)
        return failed, recovered

    failed, recovered = run(scenario)
    assert all(isinstance(outcome, InferenceError) for outcome in failed), failed
    assert all(outcome.status_code == 500 and "inference failed" in outcome.message for outcome in failed)
    np.testing.assert_allclose(recovered, tiny_model.run(rows(2)), atol=1e-6)


def test_full_queue_rejects_at_once_with_retry_after(tiny_model: OnnxModel) -> None:
    # 7 images wait for an 8-image batch (60 s delay); 2 more would overflow the 8-image queue.
    batcher = make(tiny_model.run, max_batch=8, delay_s=60.0, queue=8)

    async def scenario() -> QueueFullError:
        await batcher.start()
        waiting = asyncio.ensure_future(batcher.submit(rows(3), later()))
        also_waiting = asyncio.ensure_future(batcher.submit(rows(4), later()))
        await wait_until_async(lambda: batcher.queued_images == 7, "both requests' 7 images queued")
        with pytest.raises(QueueFullError) as refused:
            await batcher.submit(rows(2), later())
        assert batcher.queued_images == 7
        await batcher.close(5)  # drains the two accepted requests
        await asyncio.gather(waiting, also_waiting)
        return refused.value

    error = run(scenario)
    assert error.status_code == 503
    assert int(error.headers()["Retry-After"]) >= 1
    assert "queue is full" in error.message


def test_retry_after_counts_the_queued_rows_at_the_measured_speed(tiny_model: OnnxModel) -> None:
    # A model taking at least 0.1 s a row: with 7 rows queued and a batch of 8 to come after them,
    # the queue needs at least 1.5 s, so Retry-After says 2 s or more, not the 1 s of a fast model.
    def infer(batch: np.ndarray) -> np.ndarray:
        time.sleep(0.1 * len(batch))
        return tiny_model.run(batch)

    batcher = make(infer, max_batch=8, delay_s=60.0, queue=8)

    async def scenario() -> QueueFullError:
        await batcher.start()
        await batcher.submit(rows(8), later())  # a full batch: no delay, and measured
        waiting = asyncio.ensure_future(batcher.submit(rows(7), later()))
        await wait_until_async(lambda: batcher.queued_images == 7, "7 images queued")
        with pytest.raises(QueueFullError) as refused:
            await batcher.submit(rows(2), later())
        await batcher.close(5)
        await waiting
        return refused.value

    assert int(run(scenario).headers()["Retry-After"]) >= 2


def test_request_larger_than_the_queue_is_refused_with_413(tiny_model: OnnxModel) -> None:
    batcher = make(tiny_model.run, max_batch=4, queue=8)

    async def scenario() -> None:
        await batcher.start()
        with pytest.raises(PayloadTooLargeError, match="at most 8"):
            await batcher.submit(rows(9), later())
        await batcher.close(5)

    run(scenario)


def test_request_past_its_deadline_gets_504_and_is_never_computed(tiny_model: OnnxModel) -> None:
    batcher = make(tiny_model.run, max_batch=4, delay_s=10.0)

    async def scenario() -> None:
        await batcher.start()
        with pytest.raises(DeadlineExceededError) as timed_out:
            await batcher.submit(rows(1), later(0.05))
        assert timed_out.value.status_code == 504
        assert batcher.queued_images == 0
        await batcher.close(5)

    run(scenario)
    assert batch_sizes(metrics_of(batcher)) == (0.0, 0.0)
    assert sample(metrics_of(batcher), "convserve_queue_depth") == 0


def test_shutdown_drains_queued_requests(tiny_model: OnnxModel) -> None:
    # The 10 s delay would hold these; close() must flush them at once and answer every one.
    batcher = make(tiny_model.run, max_batch=4, delay_s=10.0)
    inputs = [rows(2, seed) for seed in range(3)]

    async def scenario() -> list[np.ndarray]:
        await batcher.start()
        pending = [asyncio.ensure_future(batcher.submit(x, later())) for x in inputs]
        # The first two fill a batch at once; the third waits out the delay, which close() must cut short.
        await wait_until_async(
            lambda: batch_sizes(metrics_of(batcher)) == (1, 4) and batcher.queued_images == 2,
            "one full batch computed and the third request queued",
        )
        await batcher.close(timeout_s=HANG_GUARD_S)
        with pytest.raises(ServiceUnavailableError, match="shutting down"):
            await batcher.submit(rows(1), later())
        return list(await asyncio.gather(*pending))

    for x, result in zip(inputs, run(scenario), strict=True):
        np.testing.assert_allclose(result, tiny_model.run(x), atol=1e-6)


def test_shutdown_timeout_fails_stuck_requests_instead_of_hanging() -> None:
    entered, release = threading.Event(), threading.Event()

    def stuck_infer(batch: np.ndarray) -> np.ndarray:
        entered.set()
        release.wait(HANG_GUARD_S)  # a model call that never returns in time
        return np.zeros((len(batch), 3), np.float32)

    batcher = make(stuck_infer, max_batch=2, delay_s=0.0)

    async def scenario() -> list[Any]:
        await batcher.start()
        pending = [asyncio.ensure_future(batcher.submit(rows(1, s), later())) for s in range(3)]
        await wait_until_async(entered.is_set, "the first batch entering the model call")
        await batcher.close(timeout_s=0.1)
        return list(await asyncio.gather(*pending, return_exceptions=True))

    try:
        outcomes = run(scenario)
    finally:
        release.set()
    assert all(isinstance(outcome, ServiceUnavailableError) for outcome in outcomes), outcomes


def test_instances_compute_batches_at_the_same_time_and_results_stay_in_order(tiny_model: OnnxModel) -> None:
    # Each batch waits at the barrier until the other instance's batch is inside `infer` too: with one
    # instance at a time the barrier would break and fail the batch.
    both_inside = threading.Barrier(2, timeout=HANG_GUARD_S / 3)
    inside_at_once: list[int] = []

    def infer(batch: np.ndarray) -> np.ndarray:
        inside_at_once.append(both_inside.wait())
        return tiny_model.run(batch)

    batcher = make(infer, max_batch=4, delay_s=0.0, instances=2)
    # 8 rows of one request: split over two batches of 4, computed at once, reassembled in order.
    inputs = [rows(8, seed=3)]
    [outputs] = submit_all(batcher, inputs)
    np.testing.assert_allclose(outputs, tiny_model.run(inputs[0]), rtol=1e-5, atol=1e-5)
    assert sorted(inside_at_once) == [0, 1]
    assert batch_sizes(metrics_of(batcher)) == (2.0, 8.0)


def test_a_failed_instance_batch_leaves_the_other_instance_serving(tiny_model: OnnxModel) -> None:
    calls = iter(range(1000))

    def infer(batch: np.ndarray) -> np.ndarray:
        if next(calls) == 0:
            raise RuntimeError("first batch fails")
        return tiny_model.run(batch)

    batcher = make(infer, max_batch=2, delay_s=0.0, instances=2)

    async def scenario() -> list[Any]:
        await batcher.start()
        first = await asyncio.gather(batcher.submit(rows(2, seed=1), later()), return_exceptions=True)
        second = await batcher.submit(rows(2, seed=2), later())
        await batcher.close(5)
        return [*first, second]

    failed, served = run(scenario)
    assert isinstance(failed, InferenceError)
    np.testing.assert_allclose(served, tiny_model.run(rows(2, seed=2)), rtol=1e-5, atol=1e-5)


def test_with_several_instances_a_batch_takes_an_equal_share_of_the_waiting_rows(
    tiny_model: OnnxModel,
) -> None:
    # One batch of all 12 waiting rows (max batch 32) would run on one instance's threads while the
    # other idled: with two instances free, each takes half.
    sizes: list[int] = []

    def infer(batch: np.ndarray) -> np.ndarray:
        sizes.append(len(batch))
        return tiny_model.run(batch)

    batcher = make(infer, max_batch=32, delay_s=0.0, queue=32, instances=2)
    inputs = [rows(12, seed=5)]
    [outputs] = submit_all(batcher, inputs)
    np.testing.assert_allclose(outputs, tiny_model.run(inputs[0]), rtol=1e-5, atol=1e-5)
    assert sizes == [6, 6]

    single = make(infer, max_batch=32, delay_s=0.0, queue=32, instances=1)
    sizes.clear()
    submit_all(single, inputs)
    assert sizes == [12]


def test_with_several_instances_a_batch_holds_what_one_computes_in_instance_batch_s(
    tiny_model: OnnxModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A model taking at least 10 ms a row (it sleeps that long), against 20 ms a batch: once a batch
    # was measured, two free instances take at most 2 of 12 waiting rows each, not 6. One instance
    # is never held: it takes all 12, however slow.
    monkeypatch.setattr(batching, "INSTANCE_BATCH_S", 0.02)
    sizes: list[int] = []

    def infer(batch: np.ndarray) -> np.ndarray:
        sizes.append(len(batch))
        time.sleep(0.01 * len(batch))
        return tiny_model.run(batch)

    async def scenario(batcher: DynamicBatcher) -> np.ndarray:
        await batcher.start()
        await batcher.submit(rows(1, seed=1), later())  # measured: >= 10 ms a row
        outputs = await batcher.submit(rows(12, seed=5), later())
        await batcher.close(5)
        return outputs

    outputs = run(lambda: scenario(make(infer, max_batch=32, delay_s=0.0, queue=32, instances=2)))
    np.testing.assert_allclose(outputs, tiny_model.run(rows(12, seed=5)), rtol=1e-5, atol=1e-5)
    assert sizes[0] == 1 and sum(sizes[1:]) == 12 and max(sizes[1:]) <= 2, sizes

    sizes.clear()
    run(lambda: scenario(make(infer, max_batch=32, delay_s=0.0, queue=32, instances=1)))
    assert sizes == [1, 12]


def test_a_freed_instance_leaves_a_share_of_the_waiting_rows_to_the_busy_one(tiny_model: OnnxModel) -> None:
    # Instance one is held inside `infer`; eight rows then arrive. The free instance takes half (4)
    # rather than all 8, the rest in shares as it frees; nothing waits for the held instance forever.
    held, release = threading.Event(), threading.Event()
    sizes: list[int] = []

    def infer(batch: np.ndarray) -> np.ndarray:
        sizes.append(len(batch))
        if not held.is_set():
            held.set()
            release.wait(HANG_GUARD_S)
        return tiny_model.run(batch)

    batcher = make(infer, max_batch=32, delay_s=0.0, queue=32, instances=2)

    async def scenario() -> list[np.ndarray]:
        await batcher.start()
        first = asyncio.create_task(batcher.submit(rows(1, seed=1), later()))
        await asyncio.to_thread(held.wait, HANG_GUARD_S)
        second = await batcher.submit(rows(8, seed=2), later())
        release.set()
        outputs = [await first, second]
        await batcher.close(5)
        return outputs

    try:
        first, second = run(scenario)
    finally:
        release.set()
    np.testing.assert_allclose(first, tiny_model.run(rows(1, seed=1)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(second, tiny_model.run(rows(8, seed=2)), rtol=1e-5, atol=1e-5)
    assert sizes[:2] == [1, 4] and sum(sizes) == 9, sizes


@pytest.mark.parametrize("instances", [1, 2])
def test_an_instance_takes_its_next_batch_itself_while_the_event_loop_is_busy(
    tiny_model: OnnxModel, instances: int
) -> None:
    """Under load an instance's thread goes from one batch to the next without an event-loop turn: with
    the event loop held, the batch queued behind the one computing still starts, on the same thread,
    and both requests get their own outputs once the loop runs again."""
    held, release, next_started = threading.Event(), threading.Event(), threading.Event()
    threads: list[int] = []
    lock = threading.Lock()

    def infer(batch: np.ndarray) -> np.ndarray:
        with lock:
            threads.append(threading.get_ident())
            calls = len(threads)
        if calls <= instances:  # a row on each instance, held there
            if calls == instances:
                held.set()
            release.wait(HANG_GUARD_S)
        else:
            next_started.set()
        return tiny_model.run(batch)

    batcher = make(infer, max_batch=instances, delay_s=0.0, instances=instances)

    async def scenario() -> tuple[bool, list[np.ndarray]]:
        await batcher.start()
        first = asyncio.create_task(batcher.submit(rows(instances, seed=1), later()))
        await asyncio.to_thread(held.wait, HANG_GUARD_S)
        second = asyncio.create_task(batcher.submit(rows(instances, seed=2), later()))
        assert await collector_turns(batcher) == instances  # queued: no instance is free for it
        release.set()
        started_while_held = next_started.wait(HANG_GUARD_S)  # blocks the event loop meanwhile
        return started_while_held, [await first, await second]

    try:
        started_while_held, (first, second) = run(scenario)
    finally:
        release.set()
    assert started_while_held
    assert len(set(threads[:instances])) == instances  # each instance's thread,
    assert set(threads[instances:]) <= set(threads[:instances])  # then the same ones again
    np.testing.assert_allclose(first, tiny_model.run(rows(instances, seed=1)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(second, tiny_model.run(rows(instances, seed=2)), rtol=1e-5, atol=1e-5)


def test_a_lone_batch_runs_alone_and_company_runs_one_batch_per_instance(tiny_model: OnnxModel) -> None:
    # (rows, alone) of every batch: a lone one-row request runs alone; one whose neighbour is still
    # being decoded (its room reserved), or with as many rows as instances, is shared out per instance.
    calls: list[tuple[int, bool]] = []

    def infer(batch: np.ndarray, alone: bool = False) -> Any:
        calls.append((len(batch), alone))
        return tiny_model.run(batch, alone=alone)

    batcher = make(infer, max_batch=4, delay_s=0.0, instances=2, lone_batches=True)

    async def scenario() -> None:
        await batcher.start()
        await batcher.submit(rows(1, seed=1), later())
        with batcher.reserve(1):  # another request's image, still decoding
            await batcher.submit(rows(1, seed=2), later())
        await batcher.submit(rows(2, seed=3), later())
        await batcher.close(5)

    run(scenario)
    assert calls == [(1, True), (1, False), (1, False), (1, False)]


def test_a_request_has_the_batcher_alone_with_nothing_else_admitted_or_computing(
    tiny_model: OnnxModel,
) -> None:
    """What lets a lone image's decode take every core: it is the only image admitted, no batch is
    computing, and lone batches are on."""
    inside, release = threading.Event(), threading.Event()

    def infer(batch: np.ndarray, alone: bool = False) -> np.ndarray:
        inside.set()
        release.wait(HANG_GUARD_S)
        return tiny_model.run(batch)

    batcher = make(infer, max_batch=4, delay_s=0.0, instances=2, lone_batches=True)
    without = make(tiny_model.run, max_batch=4, delay_s=0.0, instances=2, lone_batches=False)

    async def scenario() -> list[bool]:
        await batcher.start()
        seen = []
        with batcher.reserve(1):
            seen.append(batcher.has_alone(1))
            with batcher.reserve(1):  # another request's image
                seen.append(batcher.has_alone(1))
        computing = asyncio.create_task(batcher.submit(rows(1, seed=1), later()))
        await asyncio.to_thread(inside.wait, HANG_GUARD_S)
        with batcher.reserve(1):  # a batch is computing
            seen.append(batcher.has_alone(1))
        release.set()
        await computing
        with batcher.reserve(1):
            seen.append(batcher.has_alone(1))
        with without.reserve(1):
            seen.append(without.has_alone(1))
        await batcher.close(5)
        return seen

    try:
        assert run(scenario) == [True, False, False, True, False]
    finally:
        release.set()


def test_a_batch_computing_alone_holds_every_instance_until_it_ends(tiny_model: OnnxModel) -> None:
    inside, release = threading.Event(), threading.Event()
    calls: list[bool] = []

    def infer(batch: np.ndarray, alone: bool = False) -> np.ndarray:
        calls.append(alone)
        if alone:
            inside.set()
            release.wait(HANG_GUARD_S)
        return tiny_model.run(batch)

    batcher = make(infer, max_batch=4, delay_s=0.0, instances=2, lone_batches=True)

    async def scenario() -> int:
        await batcher.start()
        first = asyncio.create_task(batcher.submit(rows(1, seed=1), later()))
        await asyncio.to_thread(inside.wait, HANG_GUARD_S)
        second = asyncio.create_task(batcher.submit(rows(1, seed=2), later()))
        still_queued = await collector_turns(batcher)  # a free instance would have taken it
        release.set()
        await asyncio.gather(first, second)
        await batcher.close(5)
        return still_queued

    try:
        assert run(scenario) == 1
    finally:
        release.set()
    assert calls == [True, True]  # the second, alone again once the first ended


def recording(tiny_model: OnnxModel, fail: bool = False) -> tuple[InferFn, list[tuple[int, bool, str]]]:
    """An `infer` that records (rows, alone, thread name) of every batch; with `fail`, it then raises."""
    calls: list[tuple[int, bool, str]] = []

    def infer(batch: np.ndarray, alone: bool = False) -> np.ndarray:
        calls.append((len(batch), alone, threading.current_thread().name))
        if fail:
            raise RuntimeError("the model broke")
        return tiny_model.run(batch, alone=alone)

    return infer, calls


def test_a_lone_run_computes_on_the_thread_that_prepared_it_and_gives_its_room_back(
    tiny_model: OnnxModel,
) -> None:
    infer, calls = recording(tiny_model)
    batcher = make(infer, max_batch=4, delay_s=0.0, instances=2, lone_batches=True)

    async def scenario() -> tuple[np.ndarray, list[bool]]:
        await batcher.start()
        seen = []
        with (
            ThreadPoolExecutor(1, thread_name_prefix="decoder") as decoder,
            batcher.reserve(1) as reservation,
        ):
            lone = batcher.lone_run(reservation)
            assert lone is not None
            seen.append(batcher.has_alone(1))  # the right is taken: no second one
            loop = asyncio.get_running_loop()
            computed = await loop.run_in_executor(decoder, lone.compute, rows(1, seed=1), later())
            assert computed is not None
            # The loop learns that the run ended before the thread's answer reaches the request.
            seen.append(batcher.queued_images == 0)
        with batcher.reserve(1) as reservation:
            seen.append(batcher.lone_run(reservation) is not None)  # the next lone request has it again
        await batcher.close(5)
        return computed[0], seen

    outputs, seen = run(scenario)
    assert seen == [False, True, True]
    assert calls == [(1, True, "decoder_0")]
    np.testing.assert_allclose(outputs, tiny_model.run(rows(1, seed=1)), rtol=1e-5, atol=1e-5)
    metrics = metrics_of(batcher)
    assert batch_sizes(metrics) == (1.0, 1.0)
    assert sample(metrics, "convserve_queue_wait_seconds_count") == 1.0
    assert sample(metrics, "convserve_inference_duration_seconds_count") == 1.0


def test_a_lone_run_lapses_when_another_request_is_admitted_and_both_are_batched(
    tiny_model: OnnxModel,
) -> None:
    infer, calls = recording(tiny_model)
    batcher = make(infer, max_batch=4, delay_s=0.0, instances=2, lone_batches=True)

    async def scenario() -> list[np.ndarray]:
        await batcher.start()
        with batcher.reserve(1) as first:
            lone = batcher.lone_run(first)
            assert lone is not None
            with batcher.reserve(1) as second:  # admitted while the first is still being decoded
                assert lone.compute(rows(1, seed=1), later()) is None
                outputs = await asyncio.gather(
                    first.submit(rows(1, seed=1), later()), second.submit(rows(1, seed=2), later())
                )
        await batcher.close(5)
        return outputs

    outputs = run(scenario)
    assert [(size, alone) for size, alone, _ in calls] == [(1, False), (1, False)]  # one per instance
    assert all(name.startswith("convserve-infer") for _, _, name in calls)
    for output, seed in zip(outputs, (1, 2), strict=True):
        np.testing.assert_allclose(output, tiny_model.run(rows(1, seed=seed)), rtol=1e-5, atol=1e-5)


def test_a_lone_run_never_computes_more_rows_than_a_batch_holds(tiny_model: OnnxModel) -> None:
    infer, calls = recording(tiny_model)
    batcher = make(infer, max_batch=2, delay_s=0.0, lone_batches=True)

    async def scenario() -> tuple[np.ndarray, list[bool]]:
        await batcher.start()
        seen = []
        with batcher.reserve(3) as big:  # more than one batch: the queue splits it
            seen.append(batcher.lone_run(big) is None)
            outputs = await big.submit(rows(3, seed=1), later())
        with batcher.reserve(1) as reservation:
            lone = batcher.lone_run(reservation)
            assert lone is not None
            with pytest.raises(ValueError, match="reserved 1 rows but computing 3"):
                lone.compute(rows(3), later())
        with batcher.reserve(1) as reservation:  # the refused run left the batcher as it was
            seen.append(batcher.lone_run(reservation) is not None)
        await batcher.close(5)
        return outputs, seen

    outputs, seen = run(scenario)
    assert seen == [True, True]
    assert [size for size, _, _ in calls] == [2, 1]
    np.testing.assert_allclose(outputs, tiny_model.run(rows(3, seed=1)), rtol=1e-5, atol=1e-5)


def test_with_a_queue_delay_a_lone_request_waits_in_the_queue_for_company(tiny_model: OnnxModel) -> None:
    # A one-minute delay and room for two: only the second request's arrival lets the first complete.
    infer, calls = recording(tiny_model)
    batcher = make(infer, max_batch=2, delay_s=60.0, lone_batches=True)

    async def scenario() -> tuple[list[np.ndarray], list[bool]]:
        await batcher.start()
        seen = []
        with batcher.reserve(1) as first:
            seen.append(batcher.lone_run(first) is None)  # alone, but the delay holds it for company
            waiting = asyncio.ensure_future(first.submit(rows(1, seed=1), later()))
            seen.append(await collector_turns(batcher) == 1)  # held in the queue, not computed
            with batcher.reserve(1) as second:
                outputs = await asyncio.gather(waiting, second.submit(rows(1, seed=2), later()))
        await batcher.close(5)
        return outputs, seen

    outputs, seen = run(scenario)
    assert seen == [True, True]
    assert [(size, alone) for size, alone, _ in calls] == [(2, False)]  # one batch, formed by the delay
    for output, seed in zip(outputs, (1, 2), strict=True):
        np.testing.assert_allclose(output, tiny_model.run(rows(1, seed=seed)), rtol=1e-5, atol=1e-5)


async def lone_run_inside(
    batcher: DynamicBatcher, reservation: Reservation, inside: threading.Event
) -> asyncio.Future[tuple[np.ndarray, dict[str, np.ndarray]] | None]:
    """Start `reservation`'s lone run on a thread of its own; return its answer-to-be once the model,
    which sets `inside` when called, is computing it."""
    lone = batcher.lone_run(reservation)
    assert lone is not None
    computing = asyncio.ensure_future(asyncio.to_thread(lone.compute, rows(1, seed=1), later()))
    assert await asyncio.to_thread(inside.wait, HANG_GUARD_S), "the lone run never reached the model"
    return computing


@pytest.mark.parametrize("gone", [False, True])
def test_a_computing_lone_run_holds_every_instance_until_the_loop_sees_it_end(
    tiny_model: OnnxModel, gone: bool
) -> None:
    """`gone`: the lone request is cancelled while its rows compute (a client that disconnects): the
    instances stay held until the computation ends all the same, and are then freed."""
    inside, release = threading.Event(), threading.Event()
    calls: list[bool] = []

    def infer(batch: np.ndarray, alone: bool = False) -> np.ndarray:
        calls.append(alone)
        if not inside.is_set():
            inside.set()
            release.wait(HANG_GUARD_S)
        return tiny_model.run(batch)

    batcher = make(infer, max_batch=4, delay_s=0.0, instances=2, lone_batches=True)

    async def scenario() -> tuple[int, int]:
        await batcher.start()
        with batcher.reserve(1) as reservation:
            computing = await lone_run_inside(batcher, reservation, inside)
            second = asyncio.create_task(batcher.submit(rows(1, seed=2), later()))
            # A free instance would have taken it; the lone run's image counts as admitted until it ends.
            if gone:
                reservation.release()
            still_queued = await collector_turns(batcher)
            batches_meanwhile = len(calls)
            release.set()
            assert await computing is not None  # admitted after it started: it was not lapsed
        await second
        await batcher.close(5)
        return still_queued, batches_meanwhile

    try:
        assert run(scenario) == (1 if gone else 2, 1)
    finally:
        release.set()
    assert calls == [True, True]  # the second, alone in its turn once the lone run ended


@pytest.mark.parametrize("gone", [False, True])
def test_closing_waits_for_a_computing_lone_run(tiny_model: OnnxModel, gone: bool) -> None:
    """A version being swapped out or a server draining: `close` returns only once a lone run computing
    outside the queue has ended, even when its request is gone and no image is counted anymore."""
    inside, release = threading.Event(), threading.Event()

    def infer(batch: np.ndarray, alone: bool = False) -> np.ndarray:
        inside.set()
        release.wait(HANG_GUARD_S)
        return tiny_model.run(batch)

    batcher = make(infer, max_batch=4, delay_s=0.0, instances=2, lone_batches=True)

    async def scenario() -> tuple[bool, bool]:
        await batcher.start()
        with batcher.reserve(1) as reservation:
            computing = await lone_run_inside(batcher, reservation, inside)
            if gone:
                reservation.release()
            closing = asyncio.create_task(batcher.close(HANG_GUARD_S))
            await collector_turns(batcher)
            closed_early = closing.done()
            release.set()
            answered = await computing is not None
        await closing
        return closed_early, answered

    try:
        assert run(scenario) == (False, True)
    finally:
        release.set()


@pytest.mark.parametrize("how", ["failed", "released", "late"])
def test_a_lone_run_that_does_not_compute_leaves_the_batcher_as_it_was(
    tiny_model: OnnxModel, how: str
) -> None:
    """A model error (500 for that request), a request gone before its rows were ready (a decode error,
    a disconnect), or a deadline passed during the decode (504 from the queue): the next lone request
    has every instance again."""
    infer, calls = recording(tiny_model, fail=how == "failed")
    batcher = make(infer, max_batch=4, delay_s=0.0, instances=2, lone_batches=True)

    async def scenario() -> tuple[BaseException | None, bool]:
        await batcher.start()
        error: BaseException | None = None
        with batcher.reserve(1) as reservation:
            lone = batcher.lone_run(reservation)
            assert lone is not None
            if how == "released":
                reservation.release()
                assert await asyncio.to_thread(lone.compute, rows(1), later()) is None
            elif how == "late":
                past = time.monotonic() - 1.0
                assert await asyncio.to_thread(lone.compute, rows(1), past) is None
                with pytest.raises(DeadlineExceededError):
                    await reservation.submit(rows(1), past)
            else:
                with pytest.raises(InferenceError) as raised:
                    await asyncio.to_thread(lone.compute, rows(1), later())
                error = raised.value
        with batcher.reserve(1) as reservation:
            again = batcher.lone_run(reservation) is not None
        await batcher.close(5)
        return error, again

    error, again = run(scenario)
    assert again and batcher.queued_images == 0
    assert len(calls) == (1 if how == "failed" else 0)
    if how == "failed":
        assert "the model broke" in str(error) and "retry it" in str(error)


def background(batcher: DynamicBatcher, inputs: np.ndarray) -> Coroutine[Any, Any, Any]:
    """Submit `inputs` as a background request (a gallery's examples being embedded)."""
    return batcher.reserve(len(inputs)).submit_with(inputs, later(), frozenset(), background=True)


def held_first_call(tiny_model: OnnxModel) -> tuple[Callable[..., np.ndarray], list[tuple[int, bool]], Any]:
    """An `infer` whose first batch waits inside the model until released; it records (rows, alone)."""
    held, release = threading.Event(), threading.Event()
    calls: list[tuple[int, bool]] = []

    def infer(batch: np.ndarray, alone: bool = False) -> np.ndarray:
        calls.append((len(batch), alone))
        if not held.is_set():
            held.set()
            release.wait(HANG_GUARD_S)
        return tiny_model.run(batch)

    return infer, calls, (held, release)


@pytest.mark.parametrize(
    ("starved_s", "expected"),
    [
        # Requests first; then the background rows, in batches of their own of at most 4 rows. (The
        # clock goes back a minute: however slow this machine, the rows have not waited that long.)
        (-60.0, [1, 3, 4, 4, 2]),
        # Background rows that waited BACKGROUND_MAX_WAIT_S take the next free instance first, one
        # batch, and their wait starts again: the request goes next, then the rest of the rows.
        (batching.BACKGROUND_MAX_WAIT_S, [1, 4, 3, 4, 2]),
    ],
)
def test_background_rows_yield_to_requests_in_small_batches_of_their_own(
    tiny_model: OnnxModel, starved_s: float, expected: list[int]
) -> None:
    infer, calls, (held, release) = held_first_call(tiny_model)
    shift = [0.0]  # the batcher's clock moves `starved_s` once both are queued
    batcher = DynamicBatcher(
        infer,
        max_batch_size=8,
        max_queue_delay_s=0.0,
        max_queue_size=32,
        clock=lambda: time.monotonic() + shift[0],
    )

    async def scenario() -> list[np.ndarray]:
        await batcher.start()
        first = asyncio.create_task(batcher.submit(rows(1, seed=1), later()))
        await asyncio.to_thread(held.wait, HANG_GUARD_S)
        rows_in_background = asyncio.create_task(background(batcher, rows(10, seed=2)))
        request = asyncio.create_task(batcher.submit(rows(3, seed=3), later()))
        await wait_until_async(lambda: batcher.queued_images == 13, "both queued")
        await collector_turns(batcher)  # let it see them
        shift[0] = starved_s
        release.set()
        outputs = [await first, (await rows_in_background)[0], await request]
        await batcher.close(5)
        return outputs

    try:
        outputs = run(scenario)
    finally:
        release.set()
    assert [size for size, _ in calls] == expected
    for output, (count, seed) in zip(outputs, [(1, 1), (10, 2), (3, 3)], strict=True):
        np.testing.assert_allclose(output, tiny_model.run(rows(count, seed=seed)), rtol=1e-5, atol=1e-5)


def test_background_rows_use_every_free_instance_but_never_alone_on_every_core(tiny_model: OnnxModel) -> None:
    # Two idle instances and eight background rows: two batches of 4, one per instance, neither alone.
    # The first is held inside the model; a request arriving then waits for the other batch only.
    infer, calls, (held, release) = held_first_call(tiny_model)
    batcher = make(infer, max_batch=8, delay_s=0.0, queue=32, instances=2, lone_batches=True)

    async def scenario() -> None:
        await batcher.start()
        rows_in_background = asyncio.create_task(background(batcher, rows(8, seed=1)))
        await asyncio.to_thread(held.wait, HANG_GUARD_S)
        await wait_until_async(lambda: len(calls) == 2, "the second batch of background rows")
        await batcher.submit(rows(1, seed=2), later())  # answered while the first batch is still held
        release.set()
        await rows_in_background
        await batcher.close(5)

    try:
        run(scenario)
    finally:
        release.set()
    assert calls == [(4, False), (4, False), (1, False)], calls


def test_shutdown_finishes_background_rows_already_accepted(tiny_model: OnnxModel) -> None:
    batcher = make(tiny_model.run, max_batch=8, delay_s=0.0, queue=32)

    async def scenario() -> np.ndarray:
        await batcher.start()
        pending = asyncio.create_task(background(batcher, rows(6, seed=4)))
        await wait_until_async(lambda: batcher.queued_images == 6, "queued")
        await batcher.close(5)
        return (await pending)[0]

    np.testing.assert_allclose(run(scenario), tiny_model.run(rows(6, seed=4)), rtol=1e-5, atol=1e-5)


def test_while_requests_compute_one_background_batch_at_a_time(tiny_model: OnnxModel) -> None:
    # Three instances: a request's batch and a background batch are both held inside the model. The
    # third instance stays free for requests: the other 4 background rows wait for their turn.
    holding, release = threading.Semaphore(0), threading.Event()
    calls: list[int] = []

    def infer(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        if len(calls) <= 2:
            holding.release()
            release.wait(HANG_GUARD_S)
        return tiny_model.run(batch)

    batcher = make(infer, max_batch=8, delay_s=0.0, queue=32, instances=3)

    async def scenario() -> int:
        await batcher.start()
        request = asyncio.create_task(batcher.submit(rows(1, seed=1), later()))
        await asyncio.to_thread(holding.acquire, True, HANG_GUARD_S)
        rows_in_background = asyncio.create_task(background(batcher, rows(8, seed=2)))
        await asyncio.to_thread(holding.acquire, True, HANG_GUARD_S)
        waiting = await collector_turns(batcher)  # a second background batch would have started
        release.set()
        await asyncio.gather(request, rows_in_background)
        await batcher.close(5)
        return waiting

    try:
        assert run(scenario) == 4
    finally:
        release.set()
    assert calls == [1, 4, 4]
