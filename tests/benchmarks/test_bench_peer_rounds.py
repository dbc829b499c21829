"""The interleaved rounds behind the headline ratios: real services started fresh in turn, the order
rotated every round, and ratios that are medians over the rounds with their range."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.common.corpus import build_corpus
from benchmarks.common.loadgen import Window
from benchmarks.common.processes import ServerProcess
from benchmarks.performance import peer_rounds
from benchmarks.performance.report import render_markdown
from benchmarks.performance.subjects import resolve_model, service_process
from benchmarks.performance.targets import check_targets
from tests.benchmarks.test_bench_bento_peer import LEVELS, _results, _row
from tests.benchmarks.tinyrun import tiny_run_config


def test_rounds_start_each_contestant_fresh_in_rotating_order(tmp_path: Path) -> None:
    config = tiny_run_config(tmp_path, "service")
    model = resolve_model(config)
    started: list[tuple[str, int]] = []

    def start(name: str, number: int) -> ServerProcess:
        started.append((name, number))
        return service_process(config, model, tmp_path / "logs", name)

    not_measured: dict[str, str] = {}
    rows = peer_rounds.measure(
        ["service", "instances", "unbatched"],
        start,
        build_corpus((0.05, 0.1)),
        rounds=3,
        window=Window(duration_s=0.5, warmup_s=0.1),
        not_measured=not_measured,
    )
    # Each starts first, second and last once.
    assert started == [
        *[("service", 0), ("instances", 0), ("unbatched", 0)],
        *[("instances", 1), ("unbatched", 1), ("service", 1)],
        *[("unbatched", 2), ("service", 2), ("instances", 2)],
    ]
    assert [(row["round"], row["server"], row["level"]) for row in rows] == [
        (number, name, level) for name, number in started for level in peer_rounds.LEVELS
    ]
    assert all(row["ok"] > 0 and row["errors"] == 0 for row in rows) and not not_measured
    ratios = peer_rounds.ratios(rows)
    assert set(ratios) == {f"service/instances@c{level}" for level in peer_rounds.LEVELS}
    assert all(entry["rounds"] == 3 for entry in ratios.values())


def _round(number: int, service: float, bento: float, instances: float) -> list[dict[str, Any]]:
    """One round's rows at 1 and 32 clients, img/s as given (latencies inversely)."""
    return [
        {**_row(name, level, img * (1 if level == 1 else 1.4), 1000 / img, 1300 / img), "round": number}
        for name, img in (("service", service), ("bento", bento), ("instances", instances))
        for level in peer_rounds.LEVELS
    ]


ROUNDS = [*_round(0, 90.0, 75.0, 81.0), *_round(1, 91.0, 88.0, 93.0), *_round(2, 90.0, 81.0, 92.0)]


def test_ratios_are_the_median_over_the_rounds_with_their_range() -> None:
    ratios = peer_rounds.ratios(ROUNDS)
    alone = ratios["service/bento@c1"]
    # 90/75, 91/88, 90/81 -> 1.2, 1.034, 1.111
    assert alone["img_per_s"] == 1.111 and alone["img_per_s_range"] == [1.034, 1.2]
    assert alone["p50_ms"] == 0.9 and alone["rounds"] == 3
    assert ratios["service/instances@c32"]["img_per_s"] == 0.978  # 90/81, 91/93, 90/92
    # A round without the peer is not counted.
    partial = [row for row in ROUNDS if not (row["round"] == 2 and row["server"] == "bento")]
    assert peer_rounds.ratios(partial)["service/bento@c1"]["rounds"] == 2


def test_the_targets_and_the_report_read_the_interleaved_ratios() -> None:
    ratios = peer_rounds.ratios(ROUNDS)
    # The one-after-the-other rows say the service beats the per-core setting; the rounds say it does not.
    levels = [*LEVELS, _row("instances", 32, 100.0, 240.0, 390.0)]
    targets = {t["key"]: t for t in check_targets({"peer_ratios": ratios, "levels": levels})}
    assert targets["ratio_service_per_core"]["measured"] == 0.978
    assert targets["ratio_service_per_core"]["met"] is False
    assert targets["peer_c1_img_per_s"]["met"] is True  # 1.111
    markdown = render_markdown({**_results(LEVELS), "peer_ratios": ratios, "peer_rounds": ROUNDS})
    assert "median over 3 interleaved rounds" in markdown
    assert "| BentoML | 1 | 1.11 (1.03–1.20) |" in markdown
    assert "| batch per core | 32 | 0.98 (0.98–1.11) |" in markdown
