"""Reading the service's `/metrics` and turning two scrapes into per-window figures.

Histograms are cumulative, so what happened during one load level is the difference between a scrape
taken before it and one taken after: mean batch size = Δ`convserve_batch_size_sum` /
Δ`convserve_batch_size_count`, and likewise the mean time per batch in ONNX Runtime, the mean queue
wait and the mean preprocessing time per image — the breakdown that says where the time goes.
"""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

# Histograms whose per-window means the results record: metric name → key in the results.
WINDOW_HISTOGRAMS = {
    "convserve_batch_size": "mean_batch_size",
    "convserve_inference_duration_seconds": "mean_inference_s_per_batch",
    "convserve_queue_wait_seconds": "mean_queue_wait_s",
    "convserve_preprocess_duration_seconds": "mean_preprocess_s_per_image",
    "convserve_request_duration_seconds": "mean_request_s",
}


@dataclass(frozen=True)
class HistogramTotals:
    """A histogram's `_sum` and `_count`, summed over all label sets."""

    sum: float
    count: float


def parse_histogram_totals(text: str) -> dict[str, HistogramTotals]:
    """Every histogram in a Prometheus text exposition, by name, with sum and count over its labels."""
    totals: dict[str, HistogramTotals] = {}
    for family in text_string_to_metric_families(text):
        if family.type != "histogram":
            continue
        total_sum = sum(s.value for s in family.samples if s.name == f"{family.name}_sum")
        total_count = sum(s.value for s in family.samples if s.name == f"{family.name}_count")
        totals[family.name] = HistogramTotals(sum=total_sum, count=total_count)
    return totals


def window_means(
    before: dict[str, HistogramTotals], after: dict[str, HistogramTotals]
) -> dict[str, float | None]:
    """Per-window means of `WINDOW_HISTOGRAMS`; None when the histogram is absent or saw nothing."""
    means: dict[str, float | None] = {}
    for name, key in WINDOW_HISTOGRAMS.items():
        if name not in before or name not in after:
            means[key] = None
            continue
        count = after[name].count - before[name].count
        means[key] = round((after[name].sum - before[name].sum) / count, 6) if count > 0 else None
    return means


async def scrape(base_url: str, timeout_s: float = 10.0) -> dict[str, HistogramTotals]:
    """GET `base_url`/metrics and parse it; an empty dict when the server has no `/metrics` (naive)."""
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(f"{base_url}/metrics") as response,
    ):
        if response.status == 404:
            return {}
        response.raise_for_status()
        return parse_histogram_totals(await response.text())


def counter_by_label(text: str, name: str, label: str) -> dict[str, float]:
    """A counter's samples in a text exposition, keyed by one label's value (summed over the others)."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != name.removesuffix("_total"):
            continue
        for sample in family.samples:
            if sample.name.endswith("_total"):
                key = sample.labels.get(label, "")
                values[key] = values.get(key, 0.0) + sample.value
    return values


async def scrape_counter(base_url: str, name: str, label: str, timeout_s: float = 10.0) -> dict[str, float]:
    """GET `/metrics` and read one counter by label; {} when the server cannot be scraped."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session,
            session.get(f"{base_url}/metrics") as response,
        ):
            return counter_by_label(await response.text(), name, label) if response.status == 200 else {}
    except (aiohttp.ClientError, TimeoutError):
        return {}
