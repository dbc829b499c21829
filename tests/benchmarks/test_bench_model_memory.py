"""The memory scenario of `make bench`: the service's RSS serving several copies of a model, one start
per count, and the cost of one more."""

from __future__ import annotations

from pathlib import Path

from benchmarks.performance.model_memory import mb_per_extra_model, measure, memory_table
from benchmarks.performance.subjects import resolve_model
from tests.benchmarks.tinyrun import tiny_run_config
from tests.tinymodel import MODEL_NAME


def test_each_count_starts_a_service_serving_that_many_models(tmp_path: Path) -> None:
    config = tiny_run_config(tmp_path, "memory")
    # The model measured is at version 2: its copies are version 1 of each name, whatever its own.
    (config.model_repository / MODEL_NAME / "1").rename(config.model_repository / MODEL_NAME / "2")
    memory = measure(config, resolve_model(config), (1, 3), tmp_path / "logs")
    assert [row["models"] for row in memory["levels"]] == [1, 3]
    serving_three = (tmp_path / "logs" / "memory.log").read_text()
    assert "m00" in serving_three and "m02" in serving_three, serving_three[-2000:]
    assert all(row["rss_mb"] > 0 for row in memory["levels"])
    assert memory["mb_per_extra_model"] == mb_per_extra_model(memory["levels"])
    table = memory_table(memory)
    assert table[2].startswith("| 1 |") and table[3].startswith("| 3 |")


def test_cost_per_extra_model_is_the_slope_between_the_fewest_and_the_most() -> None:
    rows = [{"models": 8, "rss_mb": 570.0}, {"models": 1, "rss_mb": 402.0}, {"models": 32, "rss_mb": 1146.0}]
    assert mb_per_extra_model(rows) == round((1146.0 - 402.0) / 31, 1)
    assert mb_per_extra_model(rows[:1]) is None
