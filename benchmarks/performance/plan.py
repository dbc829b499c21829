"""What a benchmark run measures and for how long: the quick and the full plan.

The durations are chosen so `--quick` stays under 7 minutes and the full run under 25 on a 2-core
machine (both include ~1 minute of INT8 quantization), with the expected throughputs of the default
model (~50–100 img/s for the service, ~20 for the naive server; the BentoML peer adds ~1 minute,
more the first time its venv is built). Every phase is also bounded in requests, so a fast machine
does not run longer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from benchmarks.common.loadgen import Window
from benchmarks.performance.ceiling import CeilingPlan
from benchmarks.performance.model_budget import BudgetPlan

CONCURRENCY_LEVELS = (1, 8, 32, 64)
INT8_CONCURRENCY_LEVELS = (1, 32)
"""The headline level and the latency floor: enough to compare INT8 with FP32 at little cost."""
# 2 GiB (the figure) holds all 50 copies (~19 MiB each) and evicts nothing; 384 MiB holds ~40 %
# of them, so the long tail of the mix is loaded on demand and evicted.
FULL_PEER_WINDOW = Window(warmup_s=2.0, duration_s=12.0, max_requests=5_000)
FULL_BUDGET = BudgetPlan(models=50, budgets_mb=(2048, 384), warmup_s=5.0, duration_s=60.0)


@dataclass(frozen=True)
class BenchPlan:
    mode: str
    """"quick" or "full"."""
    concurrency_levels: tuple[int, ...]
    service_levels: Window
    """Timing of the service's concurrency levels (the headline figures)."""
    baseline_levels: Window
    """Timing of the concurrency levels of the other servers (batching off, the naive and BentoML peers)."""
    rate_fractions: tuple[float, ...]
    """Open-loop offered loads as fractions of the service's measured throughput at concurrency 32."""
    rate_timing: Window
    rates_for_unbatched: bool
    """Also offer the same rates to the batching-off service (equal load, batching on vs off)."""
    rss_checkpoints: tuple[int, ...]
    """Service lifetime request counts after which its RSS is read (first and last are compared).

    Reached first, at `rss_soak_concurrency`, before any other level: one steady load, so allocator
    high-water marks from heavier levels are not mistaken for growth."""
    rss_soak_concurrency: int
    rss_soak_max_s: float
    """Bound on the time spent reaching the last checkpoint; if hit, the RSS is read where it stopped."""
    ceiling: CeilingPlan
    int8_concurrency_levels: tuple[int, ...] = INT8_CONCURRENCY_LEVELS
    """Levels of the service serving the INT8 variant (timed like the FP32 service's levels)."""
    model_counts: tuple[int, ...] = (1, 8, 32)
    """How many copies of the model the memory scenario serves, one service start each."""
    budget: BudgetPlan = FULL_BUDGET
    """The budget scenario: copies served by one process, the memory budgets tried, the Zipf mix's timing."""
    peer_rounds: int = 3
    """Interleaved rounds of the service, the batch-per-core setting and the BentoML peer at 1 and 32
    clients (`benchmarks.performance.peer_rounds`): the headline ratios are their medians."""
    peer_window: Window = FULL_PEER_WINDOW
    """Timing of each level of each round."""
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def quick_plan() -> BenchPlan:
    return BenchPlan(
        mode="quick",
        concurrency_levels=CONCURRENCY_LEVELS,
        service_levels=Window(warmup_s=1.0, duration_s=6.0, max_requests=2_000),
        baseline_levels=Window(warmup_s=1.0, duration_s=5.0, max_requests=1_000),
        rate_fractions=(0.5, 0.9),
        rate_timing=Window(warmup_s=1.0, duration_s=5.0, max_requests=2_000),
        rates_for_unbatched=False,
        model_counts=(1, 4),
        # 64 MiB holds 3 of the 8 copies: evictions and on-demand loads in a short window.
        budget=BudgetPlan(models=8, budgets_mb=(64,), warmup_s=2.0, duration_s=10.0),
        peer_rounds=1,
        peer_window=Window(warmup_s=1.0, duration_s=5.0, max_requests=1_000),
        rss_checkpoints=(1_000, 2_500),
        rss_soak_concurrency=32,
        rss_soak_max_s=60.0,
        ceiling=CeilingPlan(
            batch_sizes=(8, 32),
            intra_op_threads=(0, 1),
            decode_threads=(2,),
            single_image_runs=24,
            seconds_per_measurement=2.5,
            confirm_seconds=4.0,
            confirm_configurations=2,
            confirm_repeats=2,
        ),
        notes=[
            "quick run: short windows (6 s service, 5 s baselines) and RSS compared after 1,000 and "
            "2,500 requests instead of 1,000 and 20,000; use `make bench` for the figures of record"
        ],
    )


def full_plan() -> BenchPlan:
    return BenchPlan(
        mode="full",
        concurrency_levels=CONCURRENCY_LEVELS,
        service_levels=Window(warmup_s=3.0, duration_s=20.0, max_requests=10_000),
        baseline_levels=Window(warmup_s=3.0, duration_s=15.0, max_requests=5_000),
        rate_fractions=(0.25, 0.5, 0.75, 0.9),
        rate_timing=Window(warmup_s=2.0, duration_s=12.0, max_requests=5_000),
        rates_for_unbatched=True,
        rss_checkpoints=(1_000, 20_000),
        rss_soak_concurrency=32,
        rss_soak_max_s=420.0,
        ceiling=CeilingPlan(
            batch_sizes=(1, 8, 16, 32),
            intra_op_threads=(0, 1),
            decode_threads=(1, 2),
            single_image_runs=80,
            seconds_per_measurement=4.0,
            confirm_seconds=10.0,
            confirm_configurations=2,
            confirm_repeats=3,
        ),
    )
