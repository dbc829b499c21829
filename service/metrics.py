"""Every Prometheus collector of the service, built in one place on a registry that is passed in.

Tests give each app a fresh `CollectorRegistry`, so nothing leaks between them. Names follow
Prometheus' conventions (base units, `_seconds`, `_total`) and are documented in docs/operations.md.

With several uvicorn workers, each process only sees its own events, so `python -m service` gives the
workers prometheus-client's multiprocess mode (a fresh `PROMETHEUS_MULTIPROC_DIR` per start): every
process writes its values to files there, and a scrape, whichever worker answers it, aggregates all
of them — counters and histograms summed, gauges by the mode declared on each. A worker that stops
or dies leaves its counts in the totals but its live gauges are removed.
"""

from __future__ import annotations

import os
import re
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

REJECT_REASONS = (
    "queue_full",
    "timeout",
    "bad_input",
    "slow_client",
    "too_many_connections",
    "header_too_large",
    "unauthorized",
    "cross_origin",
    "body_memory",
)
MULTIPROCESS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
"""prometheus-client's own switch: set before the workers start, it puts every process's values there."""
# prometheus-client's own file names for the live gauges of one process (gauge_livesum_<pid>.db, ...): an
# internal, hence the pinned range in pyproject.toml and tests/service/test_library_internals.py.
_LIVE_GAUGE_FILE = re.compile(r"^gauge_live\w*_(\d+)\.db$")

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


def batch_size_buckets(max_batch_size: int) -> tuple[float, ...]:
    """Powers of two up to the largest batch, plus the largest batch itself."""
    buckets = {float(max_batch_size)}
    size = 1
    while size < max_batch_size:
        buckets.add(float(size))
        size *= 2
    return tuple(sorted(buckets))


@dataclass(frozen=True)
class ModelMetrics:
    """The collectors one loaded model version records into, with `model` and `version` bound."""

    name: str
    version: str
    queue_wait: Any
    inference_duration: Any
    preprocess_duration: Any
    batch_size: Any
    queue_depth: Any
    prediction_confidence: Any
    predictions: Counter

    def count_prediction(self, label: str) -> None:
        self.predictions.labels(model=self.name, version=self.version, label=label).inc()


class Metrics:
    """The collectors, as attributes; labels are filled in where the events happen."""

    # Collectors whose series belong to one loaded version (removed when it is unloaded).
    _PER_VERSION = (
        "queue_wait",
        "inference_duration",
        "preprocess_duration",
        "batch_size",
        "queue_depth",
        "prediction_confidence",
    )

    def __init__(self, registry: CollectorRegistry, max_batch_size: int) -> None:
        self.registry = registry
        model = ["model", "version"]
        self.requests = Counter(
            "convserve_requests_total",
            "Requests by protocol (http, grpc), route template or gRPC method, status code (for gRPC the "
            "HTTP status of the same answer over REST) and the model version that answered (empty for "
            "routes that reach no model).",
            ["protocol", "endpoint", "status", *model],
            registry=registry,
        )
        self.request_duration = Histogram(
            "convserve_request_duration_seconds",
            "Time from request arrival to the end of the response, by protocol, route template or gRPC "
            "method and model version.",
            ["protocol", "endpoint", *model],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_wait = Histogram(
            "convserve_queue_wait_seconds",
            "Time a request's first images waited in the batching queue before entering a batch.",
            model,
            buckets=_FAST_BUCKETS,
            registry=registry,
        )
        self.inference_duration = Histogram(
            "convserve_inference_duration_seconds",
            "Duration of one session.run call (one batch).",
            model,
            buckets=_FAST_BUCKETS,
            registry=registry,
        )
        self.preprocess_duration = Histogram(
            "convserve_preprocess_duration_seconds",
            "Time to decode and preprocess one image.",
            model,
            buckets=_FAST_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "convserve_batch_size",
            "Images per session.run call; mean batch size = sum / count.",
            model,
            buckets=batch_size_buckets(max_batch_size),
            registry=registry,
        )
        self.queue_depth = Gauge(
            "convserve_queue_depth",
            "Images admitted and not yet in a batch (waiting to be decoded, decoding, or queued).",
            model,
            registry=registry,
            multiprocess_mode="livesum",  # the process group's queue is the sum of the workers'
        )
        self.rejected = Counter(
            "convserve_rejected_total",
            "Requests refused: queue_full (503), timeout (504 before compute), bad_input (4xx), "
            "slow_client (408 or header timeout), too_many_connections (503), header_too_large (431), "
            "unauthorized (401/403: missing or wrong token), cross_origin (403: a browser request from "
            "another site), body_memory (503: MAX_BODY_BYTES_IN_FLIGHT of bodies held already).",
            ["reason"],
            registry=registry,
        )
        self.body_bytes = Gauge(
            "convserve_request_body_bytes",
            "Bytes of request bodies held by requests in progress (bounded by MAX_BODY_BYTES_IN_FLIGHT).",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.model_info = Gauge(
            "convserve_model_info",
            "One series per model version the server holds or can load on demand, with its state (READY, "
            "LOADING, UNLOADING, UNAVAILABLE, LOADABLE, EVICTED) and execution provider; the value is 1.",
            [*model, "state", "provider"],
            registry=registry,
            multiprocess_mode="livemax",  # one series per version, not one per worker
        )
        self.model_loads = Counter(
            "convserve_model_loads_total",
            "Model version loads by result (success, failure).",
            ["model", "result"],
            registry=registry,
        )
        self.model_evictions = Counter(
            "convserve_model_evictions_total",
            "Model versions unloaded to make room within CONVSERVE_MEMORY_BUDGET_MB.",
            ["model"],
            registry=registry,
        )
        self.model_memory = Gauge(
            "convserve_model_memory_bytes",
            "Resident memory a loaded model version took when it loaded (at least its file's size); the "
            "versions' sum counts against CONVSERVE_MEMORY_BUDGET_MB.",
            model,
            registry=registry,
            multiprocess_mode="livesum",  # each worker holds its own copy
        )
        self.memory_budget = Gauge(
            "convserve_memory_budget_bytes",
            "CONVSERVE_MEMORY_BUDGET_MB of one worker, in bytes (absent when unset).",
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.gpu_fallbacks = Counter(
            "convserve_gpu_fallbacks_total",
            "Model versions whose session left the GPU while serving (ONNX Runtime's reason is logged); "
            "with REQUIRE_GPU the version then refuses every batch and /healthz fails.",
            ["model"],
            registry=registry,
        )
        self.model_load_duration = Histogram(
            "convserve_model_load_duration_seconds",
            "Time to load one model version: session creation plus warmup.",
            ["model"],
            buckets=(0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0),
            registry=registry,
        )
        self.predictions = Counter(
            "convserve_predictions_total",
            "Top-1 predictions by model version and label, for drift dashboards.",
            [*model, "label"],
            registry=registry,
        )
        self.prediction_confidence = Histogram(
            "convserve_prediction_confidence",
            "Softmax probability of the top-1 class.",
            model,
            buckets=_CONFIDENCE_BUCKETS,
            registry=registry,
        )
        # Galleries live in a directory every worker shares, so each worker reads the same sizes: the
        # most recent reading is the gallery's, not a sum of the workers'.
        self.gallery_entries = Gauge(
            "convserve_gallery_entries",
            "Examples in a model's gallery (all workers and replicas sharing CONVSERVE_GALLERY_DIR).",
            ["model"],
            registry=registry,
            multiprocess_mode="mostrecent",
        )
        self.gallery_pending = Gauge(
            "convserve_gallery_pending",
            "Examples of a model's gallery not yet embedded by a served version (re-embedding in "
            "progress after a new version; 0 once that version's gallery is complete).",
            model,
            registry=registry,
            multiprocess_mode="mostrecent",
        )
        self.gallery_query_duration = Histogram(
            "convserve_gallery_query_seconds",
            "Time to search a model's gallery for one request's images and vote on their labels "
            "(embedding the images not included).",
            ["model"],
            buckets=_FAST_BUCKETS,
            registry=registry,
        )
        self.gallery_changes = Counter(
            "convserve_gallery_changes_total",
            "Gallery examples added (change=add) and removed (change=remove) through this server.",
            ["model", "change"],
            registry=registry,
        )
        for reason in REJECT_REASONS:
            self.rejected.labels(reason=reason)  # export zeros so rate() works from the first scrape
        self._info_labels: dict[tuple[str, int], tuple[str, str, str, str]] = {}

    def for_model(self, name: str, version: int) -> ModelMetrics:
        """The collectors of one model version, labels bound."""
        labels = {"model": name, "version": str(version)}
        bound = {attribute: getattr(self, attribute).labels(**labels) for attribute in self._PER_VERSION}
        bound["queue_depth"].set(0)  # exported from the start, so the series exists before the first request
        return ModelMetrics(name=name, version=str(version), predictions=self.predictions, **bound)

    def set_model_state(self, name: str, version: int, state: str, provider: str) -> None:
        """`convserve_model_info` for one version: its current state replaces the previous one."""
        previous = self._info_labels.pop((name, version), None)
        if previous is not None:
            _retire(self.model_info, previous)
        self._info_labels[(name, version)] = (name, str(version), state, provider)
        self.model_info.labels(*self._info_labels[(name, version)]).set(1)

    def forget_model(self, name: str, version: int) -> None:
        """Retire an unloaded version's `convserve_model_info`, queue-depth and memory series."""
        previous = self._info_labels.pop((name, version), None)
        if previous is not None:
            _retire(self.model_info, previous)
        _retire(self.queue_depth, (name, str(version)))
        _retire(self.model_memory, (name, str(version)))

    def forget_gallery_version(self, model: str, version: int) -> None:
        """Retire `convserve_gallery_pending` of a version a gallery no longer answers with."""
        _retire(self.gallery_pending, (model, str(version)))

    def exposition(self) -> bytes:
        """The text a scrape gets: this registry, or every worker's values in multiprocess mode."""
        if not os.environ.get(MULTIPROCESS_DIR_ENV):
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)
        return generate_latest(merged)


def _retire(gauge: Gauge, labels: tuple[str, ...]) -> None:
    """Remove a gauge series; in multiprocess mode, where prometheus-client cannot remove, zero it."""
    if os.environ.get(MULTIPROCESS_DIR_ENV):
        gauge.labels(*labels).set(0)
    else:
        with suppress(KeyError):
            gauge.remove(*labels)


def forget_dead_workers() -> None:
    """Drop the live gauges of worker processes that no longer exist (no-op outside multiprocess mode).

    A worker that stops cleanly calls `forget_worker` itself; one that crashed is cleaned up here
    by whichever worker starts next (uvicorn replaces dead workers).
    """
    directory = os.environ.get(MULTIPROCESS_DIR_ENV)
    if not directory:
        return
    for path in Path(directory).iterdir():
        match = _LIVE_GAUGE_FILE.match(path.name)
        if match and not _alive(int(match.group(1))):
            multiprocess.mark_process_dead(int(match.group(1)), directory)


def forget_worker() -> None:
    """Remove this process's live gauges at a clean shutdown (no-op outside multiprocess mode)."""
    if os.environ.get(MULTIPROCESS_DIR_ENV):
        multiprocess.mark_process_dead(os.getpid())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
