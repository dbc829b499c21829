"""The load generator, metrics reader and process sampler against a real tiny server on loopback."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from benchmarks.common.corpus import Photo, build_corpus
from benchmarks.common.loadgen import CLIENT_BACKLOG, LoadRun, Outcome, Window, closed_loop, open_loop
from benchmarks.common.processes import ResourceSampler, cpu_seconds, free_port
from benchmarks.common.promtext import parse_histogram_totals, scrape, window_means
from tests.liveserver import ServiceProcess
from tests.waiting import wait_until


@pytest.fixture(scope="module")
def photos() -> list[Photo]:
    return build_corpus([0.05, 0.1])


def test_closed_loop_stops_at_request_budget_and_counts_every_answer(
    tiny_server: ServiceProcess, photos: list[Photo]
) -> None:
    run = asyncio.run(
        closed_loop(f"{tiny_server.url}/predict", photos, 4, Window(duration_s=30, max_requests=24))
    )
    result = run.result()
    # The budget closes the window at the 24th start; every request started inside it is answered.
    assert result.ok == 24
    assert result.errors == 0
    assert result.img_per_s > 0
    p50, p99, slowest = (result.latency_ms[key] for key in ("p50_ms", "p99_ms", "max_ms"))
    assert p50 is not None and p99 is not None and slowest is not None
    assert p50 <= p99 <= slowest


def test_server_errors_are_counted_by_status_not_as_successes(
    tiny_server: ServiceProcess, photos: list[Photo]
) -> None:
    rejected = Photo(
        filename="reject.jpg", data=photos[0].data, width=photos[0].width, height=photos[0].height
    )
    run = asyncio.run(
        closed_loop(
            f"{tiny_server.url}/predict", [photos[0], rejected], 1, Window(duration_s=30, max_requests=10)
        )
    )
    result = run.result()
    assert result.ok == 5
    assert result.error_kinds == {"http_503": 5}
    assert sorted(outcome.kind for outcome in run.outcomes) == ["answered"] * 5 + ["refused"] * 5


def test_connection_refused_is_an_error_not_a_crash(photos: list[Photo]) -> None:
    url = f"http://127.0.0.1:{free_port()}/predict"
    run = asyncio.run(closed_loop(url, photos, 2, Window(duration_s=30, max_requests=4)))
    result = run.result()
    assert result.ok == 0
    assert result.errors == 4
    assert result.latency_ms["p99_ms"] is None
    assert {outcome.kind for outcome in run.outcomes} == {"connection_error"}


def test_open_loop_sends_on_schedule_for_the_window(tiny_server: ServiceProcess, photos: list[Photo]) -> None:
    run = asyncio.run(
        open_loop(f"{tiny_server.url}/predict", photos, 40.0, Window(duration_s=1.0, warmup_s=0.25))
    )
    result = run.result()
    # The schedule, not the clock, decides the count: due times 0.25, 0.275, … 1.225 s are measured.
    assert result.ok + result.errors == 40
    assert len(run.outcomes) == 50  # the warm-up's 10 too
    assert result.errors == 0
    assert result.mode == "rate"


def _answered(url: str) -> float:
    """Requests the tiny server has answered (it observes its batch-size histogram once per request)."""
    return parse_histogram_totals(httpx.get(f"{url}/metrics").text)["convserve_batch_size"].count


def test_a_closed_loop_stops_starting_requests_once_told_to(
    tiny_server: ServiceProcess, photos: list[Photo]
) -> None:
    async def run() -> tuple[LoadRun, float]:
        before = _answered(tiny_server.url)
        stop = asyncio.Event()
        # A window far longer than the test: only `stop` can end this run.
        load = asyncio.create_task(
            closed_loop(f"{tiny_server.url}/predict", photos, 3, Window(duration_s=3600), stop=stop)
        )
        # The tiny server counts one batch-size observation per answered request.
        await asyncio.to_thread(
            wait_until, lambda: _answered(tiny_server.url) - before >= 6, "six answered requests"
        )
        stop.set()
        # Bound only for a broken build, which would otherwise run for the hour.
        finished = await asyncio.wait_for(load, timeout=60)
        return finished, _answered(tiny_server.url) - before

    finished, answered = asyncio.run(run())
    assert len(finished.outcomes) == answered >= 6  # each client finished the request it had started
    assert {outcome.kind for outcome in finished.outcomes} == {"answered"}


def test_skipped_sends_are_unsent_errors_not_requests() -> None:
    skipped = Outcome(sent=1.0, finished=1.0, status=None, error=CLIENT_BACKLOG)
    run = LoadRun("rate", 10.0, window_start=0.0, window_end=2.0, outcomes=[skipped])
    assert skipped.kind == "unsent"
    assert run.sent_total == 0
    assert run.result().error_kinds == {CLIENT_BACKLOG: 1}


def test_metrics_deltas_give_the_mean_batch_size_of_the_window(
    tiny_server: ServiceProcess, photos: list[Photo]
) -> None:
    async def measure() -> dict[str, float | None]:
        before = await scrape(tiny_server.url)
        await closed_loop(f"{tiny_server.url}/predict", photos, 2, Window(duration_s=30, max_requests=6))
        after = await scrape(tiny_server.url)
        return window_means(before, after)

    means = asyncio.run(measure())
    assert means["mean_batch_size"] == 2.0
    # The tiny server has no inference histogram: absent means None, never zero.
    assert means["mean_inference_s_per_batch"] is None


def test_sampler_reports_cpu_and_memory_of_the_server_under_load(
    tiny_server: ServiceProcess, photos: list[Photo]
) -> None:
    # The kernel counts CPU time in clock ticks: load the server until it has visibly spent some (a
    # fast machine answers a few dozen tiny requests within one tick), then ask the sampler.
    async def measure() -> tuple[ResourceSampler, float]:
        start = cpu_seconds(tiny_server.pid)
        async with ResourceSampler(tiny_server.pid, interval_s=0.1) as sampler:
            for _ in range(50):
                await closed_loop(
                    f"{tiny_server.url}/predict", photos, 4, Window(duration_s=30, max_requests=40)
                )
                if cpu_seconds(tiny_server.pid) - start >= 0.1:
                    break
        return sampler, cpu_seconds(tiny_server.pid) - start

    sampler, spent = asyncio.run(measure())
    assert spent >= 0.1, f"2,000 tiny requests cost the server only {spent} CPU seconds"
    sample = sampler.result
    assert sample is not None
    assert sample.rss_mb_peak is not None and sample.rss_mb_peak > 10
    assert sample.cpu_percent_mean is not None and sample.cpu_percent_mean > 0
