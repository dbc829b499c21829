"""The budget scenario of `make bench`: copies of a model served under CONVSERVE_MEMORY_BUDGET_MB with a
Zipf mix of requests, hits told from waits for an on-demand load, and the arithmetic of its figures.

The run uses the tiny model (a ~0.3 MB file; a version's measured cost, its two sessions, ~1 MiB), six
copies and a budget of 3 MiB, so only a few are loaded at a time and the mix keeps evicting and
loading.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.common.corpus import build_corpus
from benchmarks.performance.model_budget import (
    BudgetPlan,
    BudgetRequest,
    budget_table,
    load_duration_ms,
    measure,
    per_minute,
    summarize,
    zipf_cumulative,
    zipf_index,
)
from benchmarks.performance.subjects import resolve_model
from tests.benchmarks.tinyrun import tiny_run_config
from tests.tinymodel import MODEL_NAME


def test_a_budget_that_holds_a_few_tiny_models_evicts_and_loads_on_demand_without_failing(
    tmp_path: Path,
) -> None:
    config = tiny_run_config(tmp_path, "budget")
    # The model measured is at version 2: its copies are version 1 of each name, whatever its own.
    (config.model_repository / MODEL_NAME / "1").rename(config.model_repository / MODEL_NAME / "2")
    # ~1 MiB per tiny version (its two sessions: the lone-request one too): 3 MiB holds a few of the six.
    plan = BudgetPlan(models=6, budgets_mb=(3,), warmup_s=1.0, duration_s=4.0, concurrency=8)
    budget = measure(config, resolve_model(config), build_corpus([0.05, 0.1]), plan, tmp_path / "logs")

    (entry,) = budget["budgets"]
    server_log = (tmp_path / "logs" / "budget-3.log").read_text().splitlines()
    refused = [line for line in server_log if "path=/predict status=5" in line]
    assert "error" not in entry, entry
    assert entry["requests"] > 0
    assert entry["failed"] == 0 and entry["failed_outside_window"] == 0, (entry["error_kinds"], refused[:5])
    assert entry["waited"] > 0, entry
    assert 0.0 < entry["hit_rate"] < 1.0, entry
    assert entry["evictions"] > 0 and entry["on_demand_loads"] > 0, entry
    assert entry["load_wait_p50_ms"] is not None and entry["hit_p50_ms"] is not None
    assert entry["used_mb"] <= 3 and 0 < entry["loaded_at_end"] < 6, entry
    assert entry["rss_peak_mb"] >= entry["rss_ready_mb"] > 0
    json.dumps(budget)  # the results JSON holds it as it is
    table = budget_table(budget)
    assert table[2].startswith("| 3 | ") and f"| {entry['requests']} | 0 |" in table[2], table


def test_zipf_ranks_follow_inverse_powers_and_a_uniform_draw_picks_its_rank() -> None:
    cumulative = zipf_cumulative(3, exponent=1.0)
    # weights 1, 1/2, 1/3 of a total 11/6: 6/11, 3/11, 2/11
    assert cumulative == pytest.approx([6 / 11, 9 / 11, 1.0])
    assert [zipf_index(u, cumulative) for u in (0.0, 0.5, 0.6, 0.85, 0.999999)] == [0, 0, 1, 2, 2]
    assert zipf_cumulative(1) == [1.0]
    with pytest.raises(ValueError, match="at least one model"):
        zipf_cumulative(0)


def test_server_timing_load_duration_is_read_and_anything_else_is_a_hit() -> None:
    assert load_duration_ms("load;dur=12.5") == 12.5
    assert load_duration_ms("db;dur=3, load;desc=onnx;dur=40") == 40.0
    assert load_duration_ms(None) is None
    assert load_duration_ms("cache;dur=2") is None
    assert load_duration_ms("load;dur=soon") is None


def test_summary_splits_hits_from_waits_inside_the_window_only() -> None:
    def request(
        sent: float, latency: float, status: int | None = 200, load_ms: float | None = None
    ) -> BudgetRequest:
        error = None if status is not None else "ServerDisconnectedError"
        return BudgetRequest(sent, sent + latency, status, error, "m00", load_ms)

    requests = [
        request(0.5, 0.1, status=503),  # warm-up: counted apart
        request(1.0, 0.010),
        request(2.0, 0.030),
        request(3.0, 0.200, load_ms=150.0),
        request(4.0, 0.400, load_ms=350.0),
        request(5.0, 0.020, status=None),
        request(10.95, 0.1),  # sent inside the window, answered after it
        request(11.5, 0.1),  # after the window
    ]
    figures = summarize(requests, window_start=1.0, window_end=11.0)
    assert figures["requests"] == 6
    assert figures["failed"] == 1 and figures["error_kinds"] == {"ServerDisconnectedError": 1}
    assert figures["failed_outside_window"] == 1
    assert figures["waited"] == 2 and figures["hit_rate"] == 0.6
    assert figures["hit_p50_ms"] == pytest.approx(30.0)
    assert figures["waited_p50_ms"] == pytest.approx(300.0)
    assert figures["waited_p99_ms"] == pytest.approx(398.0)
    assert figures["load_wait_p50_ms"] == pytest.approx(250.0)
    # 200s answered inside the window: the four sent at 1-4 s
    assert figures["img_per_s"] == pytest.approx(4 / 10.0)
    assert per_minute(15, 30.0) == 30.0 and per_minute(None, 30.0) is None
