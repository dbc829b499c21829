"""prometheus-client's multiprocess mode as the service uses it, with real worker processes.

Two spawned processes record events into one fresh directory, as two uvicorn workers do; a scrape
from any process sees the sum, and the live gauges of a worker that died are dropped.
"""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from service.metrics import MULTIPROCESS_DIR_ENV, Metrics, forget_dead_workers
from tests.service.promtext import metric

# Spawned workers import this module: it stays light (no torch, no model) so they start in a second.


def _worker(requests: int, queued: int, ready: str, release: str) -> None:
    metrics = Metrics(CollectorRegistry(), max_batch_size=4)
    for _ in range(requests):
        metrics.requests.labels(endpoint="/predict", status="200", model="tiny", version="1").inc()
    metrics.for_model("tiny", 1).queue_depth.set(queued)
    metrics.set_model_state("tiny", 1, "READY", "CPUExecutionProvider")
    Path(ready).touch()
    deadline = time.monotonic() + 60
    while not Path(release).exists() and time.monotonic() < deadline:  # a live worker until released
        time.sleep(0.01)


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + 60
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.01)


def test_a_scrape_sums_every_worker_and_drops_dead_workers_live_gauges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared, signals = tmp_path / "metrics", tmp_path / "signals"
    shared.mkdir()
    signals.mkdir()
    monkeypatch.setenv(MULTIPROCESS_DIR_ENV, str(shared))  # spawned children inherit it
    release = str(signals / "release")
    context = multiprocessing.get_context("spawn")
    alive = context.Process(target=_worker, args=(25, 3, str(signals / "a"), release))
    dying = context.Process(target=_worker, args=(35, 2, str(signals / "b"), release))
    alive.start()
    dying.start()
    try:
        _wait_for(signals / "a")
        _wait_for(signals / "b")
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
        Path(release).touch()
        alive.join(30)
