"""Many models under a memory budget: one process serving N copies of the model with
CONVSERVE_MEMORY_BUDGET_MB set, under a skewed request mix.

The copies are separate models (`model_memory.copy_models`), so each has its own session and its own
measured cost against the budget. 32 clients send real JPEGs back to back; each request picks its model
from a Zipf distribution over the copies (rank 1 = `m00`, the most requested), as traffic over one
classifier per customer tends to be: a few models get most requests, the long tail is asked rarely. A
request for a version that is not loaded waits for its on-demand load, and the service says so in the
answer's `Server-Timing: load;dur=<ms>` header; that splits the latencies into hits and waits.

Per budget: requests and failures, the share of hits, p50/p99 of hits and of waits, the load time the
waits saw, evictions per minute and on-demand loads (from the service's counters, before and after the
window), the peak RSS sampled throughout against the budget, and the budget's use at the end
(`/readyz`).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import logging
import random
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.common.corpus import Photo
from benchmarks.common.docblock import cell
from benchmarks.common.loadgen import DEFAULT_REQUEST_TIMEOUT_S, Outcome, client_session, error_kind
from benchmarks.common.processes import (
    ServerProcess,
    ServerStartError,
    free_port,
    python_module_command,
    rss_mb,
)
from benchmarks.common.promtext import counter_by_label
from benchmarks.common.stats import latency_summary_ms
from benchmarks.performance.model_memory import copy_models
from benchmarks.performance.subjects import RunConfig, ServedModel, service_env_for

log = logging.getLogger(__name__)

ZIPF_EXPONENT = 1.1
SEED = 21
RSS_INTERVAL_S = 0.2
"""How often the server's RSS is read during a run: often enough to catch a load's transient peak."""


@dataclass(frozen=True)
class BudgetPlan:
    """How many copies, which budgets (one service start each) and how long each is loaded."""

    models: int
    budgets_mb: tuple[int, ...]
    """CONVSERVE_MEMORY_BUDGET_MB of each start, MiB."""
    warmup_s: float
    """Load before the measured window (the budget's first loads and evictions settle), seconds."""
    duration_s: float
    """Measured window, seconds."""
    concurrency: int = 32


@dataclass(frozen=True)
class BudgetRequest(Outcome):
    """One request of the mix: the load generator's outcome, which model it asked for, and the
    on-demand load it waited for."""

    model: str = ""
    load_ms: float | None = None
    """The on-demand load this request waited for (its `Server-Timing`); None for a hit."""

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None

    @property
    def waited(self) -> bool:
        return self.load_ms is not None


def zipf_cumulative(count: int, exponent: float = ZIPF_EXPONENT) -> list[float]:
    """Cumulative probabilities of ranks 1..`count` under Zipf(`exponent`): P(k) ∝ 1 / k^exponent."""
    if count < 1:
        raise ValueError(f"need at least one model, got {count}")
    weights = list(itertools.accumulate(1.0 / rank**exponent for rank in range(1, count + 1)))
    return [weight / weights[-1] for weight in weights]


def zipf_index(uniform: float, cumulative: Sequence[float]) -> int:
    """The 0-based rank a uniform draw in [0, 1) falls on."""
    return min(bisect.bisect_right(cumulative, uniform), len(cumulative) - 1)


def load_duration_ms(server_timing: str | None) -> float | None:
    """The `dur` of the `load` metric in a `Server-Timing` header (`load;dur=12.5`), else None."""
    for metric in (server_timing or "").split(","):
        name, *parameters = (part.strip() for part in metric.split(";"))
        if name != "load":
            continue
        for parameter in parameters:
            key, _, value = parameter.partition("=")
            if key == "dur":
                try:
                    return float(value)
                except ValueError:
                    return None
    return None


async def post_to_model(
    session: aiohttp.ClientSession, url: str, model: str, photo: Photo
) -> tuple[int | None, str | None, float | None]:
    """POST one photo to `url?model=NAME` and read the whole answer: (status, error, load wait ms)."""
    form = aiohttp.FormData()
    form.add_field("file", photo.data, filename=photo.filename, content_type="image/jpeg")
    try:
        async with session.post(url, params={"model": model}, data=form) as response:
            await response.read()
            return response.status, None, load_duration_ms(response.headers.get("Server-Timing"))
    except (aiohttp.ClientError, TimeoutError) as exc:
        return None, error_kind(exc), None


async def zipf_mix(
    url: str,
    names: Sequence[str],
    photos: Sequence[Photo],
    concurrency: int,
    until: float,
    *,
    seed: int = SEED,
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
) -> list[BudgetRequest]:
    """`concurrency` clients back to back until perf_counter() reaches `until`, each request to a model
    drawn from Zipf over `names`; every request started is awaited."""
    cumulative = zipf_cumulative(len(names))
    requests: list[BudgetRequest] = []

    async def client(session: aiohttp.ClientSession, index: int) -> None:
        # One generator per client, seeded by its index: the same sequence of models every run.
        draws = random.Random(f"{seed}-{index}")
        for turn in itertools.count():
            sent = time.perf_counter()
            if sent >= until:
                return
            model = names[zipf_index(draws.random(), cumulative)]
            photo = photos[(index + turn) % len(photos)]
            status, error, load_ms = await post_to_model(session, url, model, photo)
            requests.append(BudgetRequest(sent, time.perf_counter(), status, error, model, load_ms))

    async with client_session(concurrency, request_timeout_s) as session:
        await asyncio.gather(*(client(session, index) for index in range(concurrency)))
    return requests


def summarize(requests: Sequence[BudgetRequest], window_start: float, window_end: float) -> dict[str, Any]:
    """Figures of the requests sent inside the window; img/s from the 200s answered inside it."""
    window_s = window_end - window_start
    measured = [r for r in requests if window_start <= r.sent < window_end]
    answered = [r for r in measured if r.ok]
    hits = latency_summary_ms([r.latency_s for r in answered if not r.waited])
    waits = latency_summary_ms([r.latency_s for r in answered if r.waited])
    loads = latency_summary_ms([r.load_ms / 1000.0 for r in answered if r.load_ms is not None])
    errors = Counter(label for r in measured if (label := r.error_label) is not None)
    outside = sum(r.error_label is not None for r in requests) - sum(errors.values())
    answered_inside = sum(r.ok and window_start <= r.finished <= window_end for r in requests)
    waited = sum(r.waited for r in answered)
    return {
        "window_s": round(window_s, 2),
        "requests": len(measured),
        "failed": sum(errors.values()),
        "error_kinds": dict(errors),
        "failed_outside_window": outside,
        "waited": waited,
        "hit_rate": round(1.0 - waited / len(answered), 4) if answered else None,
        "hit_p50_ms": hits["p50_ms"],
        "hit_p99_ms": hits["p99_ms"],
        "waited_p50_ms": waits["p50_ms"],
        "waited_p99_ms": waits["p99_ms"],
        "load_wait_p50_ms": loads["p50_ms"],
        "load_wait_p99_ms": loads["p99_ms"],
        "models_requested": len({r.model for r in measured}),
        "img_per_s": round(answered_inside / window_s, 2) if window_s > 0 else 0.0,
    }


def per_minute(delta: float | None, window_s: float) -> float | None:
    """A counter's increase over the window as a rate per minute; None when it could not be read."""
    if delta is None or window_s <= 0:
        return None
    return round(delta * 60.0 / window_s, 1)


@dataclass(frozen=True)
class Counters:
    """The service's model lifecycle counters at one moment (None: `/metrics` could not be read)."""

    evictions: float | None
    """Versions unloaded to make room, all models."""
    loads: float | None
    """Successful loads, start-up and on-demand."""

    @classmethod
    async def scrape(cls, base_url: str) -> Counters:
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10.0)) as session,
                session.get(f"{base_url}/metrics") as response,
            ):
                text = await response.text() if response.status == 200 else None
        except (aiohttp.ClientError, TimeoutError):
            text = None
        if text is None:
            return cls(evictions=None, loads=None)
        evictions = counter_by_label(text, "convserve_model_evictions_total", "model")
        loads = counter_by_label(text, "convserve_model_loads_total", "result")
        # A labelled counter has no sample until its first increment: absent = none so far.
        return cls(evictions=sum(evictions.values()), loads=loads.get("success", 0.0))

    def since(self, before: Counters) -> dict[str, int | None]:
        """Increase of each counter from `before` to this scrape."""

        def delta(after: float | None, earlier: float | None) -> int | None:
            return None if after is None or earlier is None else round(after - earlier)

        return {
            "evictions": delta(self.evictions, before.evictions),
            "loads": delta(self.loads, before.loads),
        }


async def _readyz(base_url: str) -> dict[str, Any]:
    """The `/readyz` body ({} if the server no longer answers: the figures say so rather than crash)."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10.0)) as session,
            session.get(f"{base_url}/readyz") as response,
        ):
            body = await response.json()
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return {}
    return body if isinstance(body, dict) else {}


async def _sample_rss(pid: int, samples: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        samples.append(rss_mb(pid))
        with contextlib.suppress(TimeoutError):  # the interval passed: sample again
            await asyncio.wait_for(stop.wait(), RSS_INTERVAL_S)


async def run_mix(
    server: ServerProcess, names: Sequence[str], photos: Sequence[Photo], plan: BudgetPlan
) -> dict[str, Any]:
    """The Zipf mix against a ready server: warm-up, measured window, drain; figures of the window."""
    rss: list[float] = [rss_mb(server.pid)]
    rss_ready = rss[0]
    stop = asyncio.Event()
    sampler = asyncio.create_task(_sample_rss(server.pid, rss, stop))
    window_start = time.perf_counter() + plan.warmup_s
    window_end = window_start + plan.duration_s
    mix = asyncio.create_task(zipf_mix(f"{server.url}/predict", names, photos, plan.concurrency, window_end))
    await asyncio.sleep(max(0.0, window_start - time.perf_counter()))
    before = await Counters.scrape(server.url)
    await asyncio.sleep(max(0.0, window_end - time.perf_counter()))
    after = await Counters.scrape(server.url)
    requests = await mix
    stop.set()
    await sampler
    ready = await _readyz(server.url)
    figures = summarize(requests, window_start, window_end)
    deltas = after.since(before)
    memory = ready.get("memory") or {}
    return {
        **figures,
        "evictions": deltas["evictions"],
        "evictions_per_min": per_minute(deltas["evictions"], figures["window_s"]),
        "on_demand_loads": deltas["loads"],
        "rss_ready_mb": rss_ready,
        "rss_peak_mb": max(rss),
        "rss_last_mb": rss[-1],
        "rss_samples": len(rss),
        "used_mb": memory.get("used_mb"),
        "loaded_at_end": len(ready.get("models") or []),
        "loadable_at_end": len(ready.get("loadable") or []),
        "evicted_at_end": len(ready.get("evicted") or []),
    }


def budget_process(config: RunConfig, model: ServedModel, log_dir: Path, budget_mb: int) -> ServerProcess:
    """The service with every copy in `model.repository` and the budget; otherwise the defaults."""
    port = free_port()
    # The memory scenario's settings (the defaults), plus the budget.
    env = {**service_env_for(config, model, port, "memory"), "CONVSERVE_MEMORY_BUDGET_MB": str(budget_mb)}
    return ServerProcess(
        name=f"budget-{budget_mb}",
        command=python_module_command("service"),
        env=env,
        port=port,
        log_path=log_dir / f"budget-{budget_mb}.log",
    )


def measure(
    config: RunConfig, model: ServedModel, photos: Sequence[Photo], plan: BudgetPlan, log_dir: Path
) -> dict[str, Any]:
    """One service start per budget of `plan`, each serving `plan.models` copies under the Zipf mix."""
    entries = []
    with tempfile.TemporaryDirectory(prefix="convserve-bench-budget-") as scratch:
        root = Path(scratch)
        names = copy_models(model, plan.models, root)
        copies = replace(
            model, repository=root, name=names[0], version=1, path=root / names[0] / "1" / model.path.name
        )
        served = replace(config, service_env={**config.service_env, "CONVSERVE_MODELS": ",".join(names)})
        for budget_mb in plan.budgets_mb:
            server = budget_process(served, copies, log_dir, budget_mb)
            entry: dict[str, Any] = {"budget_mb": budget_mb, "log": str(server.log_path)}
            try:
                with server:
                    entry["startup_s"] = server.startup_s
                    entry.update(asyncio.run(run_mix(server, names, photos, plan)))
            except ServerStartError as error:
                entry["error"] = str(error)[-500:]
                log.error("budget %d MiB: the service did not start: %s", budget_mb, error)
            entries.append(entry)
            _log_entry(entry)
    return {
        "models": plan.models,
        "concurrency": plan.concurrency,
        "zipf_exponent": ZIPF_EXPONENT,
        "seed": SEED,
        "warmup_s": plan.warmup_s,
        "budgets": entries,
    }


def _log_entry(entry: Mapping[str, Any]) -> None:
    if "error" in entry:
        return
    log.info(
        "budget %d MiB: %d requests, %d failed, hit rate %s, %s evictions/min, peak RSS %.0f MB, used %s MiB",
        entry["budget_mb"],
        entry["requests"],
        entry["failed"],
        entry["hit_rate"],
        entry["evictions_per_min"],
        entry["rss_peak_mb"],
        entry["used_mb"],
    )


def budget_table(budget: Mapping[str, Any] | None) -> list[str]:
    """Markdown: one row per budget (hits vs waits, evictions, peak RSS against the budget)."""
    if not budget or not budget.get("budgets"):
        return []
    lines = [
        "| Budget MiB | loaded at end | requests | failed | hit rate % | hit p50 / p99 ms | "
        "waited p50 / p99 ms | load wait p50 / p99 ms | evictions/min | on-demand loads | used MiB | "
        "peak RSS MB | img/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in budget["budgets"]:
        if "error" in entry:
            lines.append(f"| {entry['budget_mb']} | did not start: see `{entry['log']}` |" + " |" * 11)
            continue
        hit_rate = None if entry["hit_rate"] is None else 100.0 * entry["hit_rate"]
        lines.append(
            f"| {entry['budget_mb']} | {entry['loaded_at_end']} of {budget['models']} | "
            f"{entry['requests']} | {entry['failed']} | {cell(hit_rate, 1)} | "
            f"{cell(entry['hit_p50_ms'], 0)} / {cell(entry['hit_p99_ms'], 0)} | "
            f"{cell(entry['waited_p50_ms'], 0)} / {cell(entry['waited_p99_ms'], 0)} | "
            f"{cell(entry['load_wait_p50_ms'], 0)} / {cell(entry['load_wait_p99_ms'], 0)} | "
            f"{cell(entry['evictions_per_min'], 1)} | {cell(entry['on_demand_loads'], 0)} | "
            f"{cell(entry['used_mb'], 0)} | {cell(entry['rss_peak_mb'], 0)} | {cell(entry['img_per_s'], 1)} |"
        )
    return lines
