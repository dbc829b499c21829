"""The protocol comparison of `make bench`: every API of one real service answers, and the rows say what
each cost the server."""

from __future__ import annotations

import asyncio
from pathlib import Path

from benchmarks.common.corpus import build_corpus
from benchmarks.common.loadgen import Window
from benchmarks.performance.protocols import PROTOCOL_LEVELS, PROTOCOL_TITLES, bench_protocols, protocol_table
from benchmarks.performance.subjects import resolve_model
from tests.benchmarks.tinyrun import tiny_run_config


def test_each_protocol_answers_every_level_and_the_table_lists_them(tmp_path: Path) -> None:
    config = tiny_run_config(tmp_path, "protocols")
    photos = build_corpus((0.05, 0.1))
    timing = Window(duration_s=1.0, warmup_s=0.2)

    bench = asyncio.run(bench_protocols(config, resolve_model(config), photos, timing, tmp_path / "logs"))

    measured = {(row["protocol"], row["level"]) for row in bench.rows}
    assert measured == {(protocol, level) for protocol in PROTOCOL_TITLES for level in PROTOCOL_LEVELS}
    for row in bench.rows:
        assert row["ok"] >= 6 and row["errors"] == 0, row
        assert row["server_cpu_ms_per_image"] is not None and row["server_cpu_ms_per_image"] > 0, row
    table = protocol_table(bench.rows)
    assert len(table) == 2 + len(PROTOCOL_TITLES)
    for title in PROTOCOL_TITLES.values():
        assert any(line.startswith(f"| {title} |") for line in table)
