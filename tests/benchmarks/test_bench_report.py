"""Results JSON, target checks, Markdown table, README block and plot, from a small results set."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.plot import write_plot
from benchmarks.report import (
    README_END,
    README_START,
    check_targets,
    headline,
    render_markdown,
    update_readme,
    write_json,
)


def _row(
    server: str, mode: str, level: float, img_per_s: float, *, p99: float, batch: float | None
) -> dict[str, Any]:
    return {
        "server": server,
        "mode": mode,
        "level": level,
        "img_per_s": img_per_s,
        "ok": 100,
        "errors": 0,
        "error_kinds": {},
        "p50_ms": p99 / 2,
        "p95_ms": p99 * 0.9,
        "p99_ms": p99,
        "mean_ms": p99 / 2,
        "max_ms": p99 * 1.1,
        "mean_batch_size": batch,
        "server_cpu_percent": 150.0,
    }


LEVELS = [
    _row("service", "concurrency", 1, 30.0, p99=45.0, batch=1.0),
    _row("service", "concurrency", 32, 90.0, p99=400.0, batch=12.0),
    _row("service", "rate", 45.0, 45.0, p99=60.0, batch=2.0),
    _row("unbatched", "concurrency", 1, 28.0, p99=44.0, batch=1.0),
    _row("unbatched", "concurrency", 32, 60.0, p99=700.0, batch=1.0),
    _row("naive", "concurrency", 1, 15.0, p99=70.0, batch=None),
    _row("naive", "concurrency", 32, 20.0, p99=2300.0, batch=None),
]


def _results(rss: dict[int, float]) -> dict[str, Any]:
    results: dict[str, Any] = {
        "created": "2025-01-02T03:04:05+00:00",
        "mode": "full",
        "command": "python -m benchmarks",
        "output": "benchmarks/results/latest.json",
        "duration_s": 600.0,
        **headline(LEVELS, 100.0, 40.0, rss),
        "in_process": {"best_batch_size": 16, "single_image_p50_ms": 30.0, "single_image_p99_ms": 40.0},
        "levels": LEVELS,
        "model": {
            "name": "imagenet",
            "version": 1,
            "backbone": "efficientnet_lite0",
            "input_shape": [3, 224, 224],
        },
        "corpus": {"count": 8, "megapixels_min": 0.3, "megapixels_max": 2.0},
        "machine": {"cpu_model": "Test CPU", "logical_cpus": 2},
    }
    results["targets"] = check_targets(results)
    return results


def test_headline_takes_concurrency_32_and_computes_ratios() -> None:
    results = _results({1000: 500.0, 20000: 520.0})
    assert results["service_img_per_s"] == 90.0
    assert results["naive_img_per_s"] == 20.0
    assert results["ratio_service_ceiling"] == 0.9
    assert results["ratio_service_naive"] == 4.5
    assert results["ratio_service_unbatched"] == 1.5
    assert results["p99_ms"] == 400.0
    assert results["rss_mb_after_1k"] == 500.0
    assert results["rss_mb_after_20k"] == 520.0
    assert results["rss_growth"] == 0.04


def test_targets_are_met_or_missed_by_their_thresholds() -> None:
    ceiling, naive, p99, rss = _results({1000: 500.0, 20000: 560.0})["targets"]
    assert ceiling["met"] is True  # 90 / 100 = 0.90, on the threshold
    assert naive["met"] is True  # 90 / 20 = 4.5
    assert p99["threshold"] == 50.0  # in-process p99 40 ms + 10 ms
    assert p99["met"] is True  # 45 ms
    assert rss["met"] is False  # 500 -> 560 MB is 12 % growth


def test_quick_run_rss_checkpoints_are_named_by_their_real_counts() -> None:
    results = _results({1000: 500.0, 3000: 505.0})
    assert results["rss_mb_after_20k"] is None
    assert results["rss_growth_between_requests"] == [1000, 3000]
    rss_target = results["targets"][3]
    assert "1000 → 3000" in rss_target["target"]
    assert rss_target["met"] is True


def test_markdown_lists_every_server_and_target() -> None:
    markdown = render_markdown(_results({1000: 500.0, 20000: 520.0}))
    assert "| convserve (dynamic batching) | 90.0 |" in markdown
    assert "batching off" in markdown and "PyTorch eager" in markdown
    assert "| 32 | 90.0 (400) | 60.0 (700) | 20.0 (2300) |" in markdown
    assert "Fixed arrival rates" in markdown
    assert markdown.count("| yes |") == 4


def test_readme_block_between_markers_is_replaced_and_the_rest_kept(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\n## Performance\n\n{README_START}\nold table\n{README_END}\n\n## After\n")
    assert update_readme(readme, "new table\n")
    text = readme.read_text()
    assert "old table" not in text
    assert f"{README_START}\nnew table\n{README_END}" in text
    assert text.startswith("# Title\n") and text.endswith("## After\n")


def test_readme_without_markers_is_left_untouched(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# Title\nno markers here\n")
    assert not update_readme(readme, "new table\n")
    assert readme.read_text() == "# Title\nno markers here\n"


def test_json_and_plot_files_are_written(tmp_path: Path) -> None:
    results = _results({1000: 500.0, 20000: 520.0})
    output = tmp_path / "results" / "latest.json"
    write_json(results, output)
    assert json.loads(output.read_text())["ratio_service_naive"] == 4.5
    assert list(output.parent.iterdir()) == [output]  # no temporary file left behind
    plot = tmp_path / "results" / "latest.png"
    write_plot(results, plot)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
