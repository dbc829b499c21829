"""The load generator, metrics reader and process sampler against a real tiny server on loopback."""

from __future__ import annotations

import asyncio

import pytest

from benchmarks.corpus import Photo, build_corpus
from benchmarks.loadgen import run_concurrency, run_rate
from benchmarks.processes import ResourceSampler, ServerProcess, cpu_seconds, free_port
from benchmarks.promtext import scrape, window_means


@pytest.fixture(scope="module")
def photos() -> list[Photo]:
    return build_corpus([0.05, 0.1])


def test_closed_loop_stops_at_request_budget_and_counts_every_answer(
    tiny_server: ServerProcess, photos: list[Photo]
) -> None:
    result = asyncio.run(
        run_concurrency(f"{tiny_server.base_url}/predict", photos, 4, duration_s=30, max_requests=24)
    )
    # The budget closes the window at the 24th start; every request started inside it is answered.
    assert result.ok == 24
    assert result.errors == 0
    assert result.img_per_s > 0
    assert result.latency_ms["p50_ms"] is not None
    assert result.latency_ms["p50_ms"] <= result.latency_ms["p99_ms"] <= result.latency_ms["max_ms"]


def test_server_errors_are_counted_by_status_not_as_successes(
    tiny_server: ServerProcess, photos: list[Photo]
) -> None:
    rejected = Photo(
        filename="reject.jpg", data=photos[0].data, width=photos[0].width, height=photos[0].height
    )
    result = asyncio.run(
        run_concurrency(
            f"{tiny_server.base_url}/predict", [photos[0], rejected], 1, duration_s=30, max_requests=10
        )
    )
    assert result.ok == 5
    assert result.error_kinds == {"http_503": 5}


def test_connection_refused_is_an_error_not_a_crash(photos: list[Photo]) -> None:
    url = f"http://127.0.0.1:{free_port()}/predict"
    result = asyncio.run(run_concurrency(url, photos, 2, duration_s=30, max_requests=4))
    assert result.ok == 0
    assert result.errors == 4
    assert result.latency_ms["p99_ms"] is None


def test_open_loop_sends_on_schedule_for_the_window(tiny_server: ServerProcess, photos: list[Photo]) -> None:
    result = asyncio.run(
        run_rate(f"{tiny_server.base_url}/predict", photos, 40.0, duration_s=1.0, warmup_s=0.25)
    )
    # 40 requests/s for a 1 s window; the first send may fall on either side of the window edge.
    assert 39 <= result.ok + result.errors <= 41
    assert result.errors == 0
    assert result.mode == "rate"


def test_metrics_deltas_give_the_mean_batch_size_of_the_window(
    tiny_server: ServerProcess, photos: list[Photo]
) -> None:
    async def measure() -> dict[str, float | None]:
        before = await scrape(tiny_server.base_url)
        await run_concurrency(f"{tiny_server.base_url}/predict", photos, 2, duration_s=30, max_requests=6)
        after = await scrape(tiny_server.base_url)
        return window_means(before, after)

    means = asyncio.run(measure())
    assert means["mean_batch_size"] == 2.0
    # The tiny server has no inference histogram: absent means None, never zero.
    assert means["mean_inference_s_per_batch"] is None


def test_sampler_reports_cpu_and_memory_of_the_server_under_load(
    tiny_server: ServerProcess, photos: list[Photo]
) -> None:
    # The kernel counts CPU time in clock ticks: load the server until it has visibly spent some (a
    # fast machine answers a few dozen tiny requests within one tick), then ask the sampler.
    async def measure() -> tuple[ResourceSampler, float]:
        start = cpu_seconds(tiny_server.pid)
        async with ResourceSampler(tiny_server.pid, interval_s=0.1) as sampler:
            for _ in range(50):
                await run_concurrency(
                    f"{tiny_server.base_url}/predict", photos, 4, duration_s=30, max_requests=40
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
