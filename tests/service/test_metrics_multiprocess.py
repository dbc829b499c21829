"""prometheus-client's multiprocess mode as the service uses it, with real worker processes.

Two spawned processes record events into one fresh directory, as two uvicorn workers do; a scrape
from any process sees the sum, and the live gauges of a worker that died are dropped.
"""

from __future__ import annotations

import multiprocessing
from multiprocessing.synchronize import Event as EventType
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from service.metrics import MULTIPROCESS_DIR_ENV, Metrics, forget_dead_workers
from tests.service.promtext import metric

# Spawned workers import this module: it stays light (no torch, no model) so they start in a second.


WAIT_S = 60.0


def _worker(requests: int, queued: int, ready: EventType, release: EventType) -> None:
    metrics = Metrics(CollectorRegistry(), max_batch_size=4)
    for _ in range(requests):
        metrics.requests.labels(
            protocol="http", endpoint="/predict", status="200", model="tiny", version="1"
        ).inc()
    metrics.for_model("tiny", 1).queue_depth.set(queued)
    metrics.set_model_state("tiny", 1, "READY", "CPUExecutionProvider")
    ready.set()
    release.wait(WAIT_S)  # a live worker until released


def test_a_scrape_sums_every_worker_and_drops_dead_workers_live_gauges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = tmp_path / "metrics"
    shared.mkdir()
    monkeypatch.setenv(MULTIPROCESS_DIR_ENV, str(shared))  # spawned children inherit it
    context = multiprocessing.get_context("spawn")
    alive_ready, dying_ready = context.Event(), context.Event()
    # The worker that will be killed waits on an event of its own that nobody sets: setting an event
    # a killed process was waiting on blocks for its acknowledgement forever. Both stay referenced
    # here until the end: `start()` drops the process's own reference to its arguments.
    release, never = context.Event(), context.Event()
    alive = context.Process(target=_worker, args=(25, 3, alive_ready, release))
    dying = context.Process(target=_worker, args=(35, 2, dying_ready, never))
    alive.start()
    dying.start()
    try:
        assert alive_ready.wait(WAIT_S) and dying_ready.wait(WAIT_S), "a worker never recorded its metrics"
        dying.kill()  # a crash: no clean shutdown, its live gauge file stays behind
        dying.join(30)
        scrape = Metrics(CollectorRegistry(), max_batch_size=4).exposition().decode()
        assert metric(scrape, 'convserve_requests_total{endpoint="/predict",status="200"}') == 60
        assert metric(scrape, "convserve_queue_depth") == 5  # the dead worker's 2 still counted
        forget_dead_workers()  # what the next worker to start does
        scrape = Metrics(CollectorRegistry(), max_batch_size=4).exposition().decode()
        assert metric(scrape, 'convserve_requests_total{endpoint="/predict",status="200"}') == 60
        assert metric(scrape, "convserve_queue_depth") == 3
        assert scrape.count("convserve_model_info{") == 1
    finally:
        release.set()
        alive.join(WAIT_S)
