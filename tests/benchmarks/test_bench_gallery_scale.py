"""The gallery scale benchmark end to end at tiny scale: real servers (`python -m service`) on the tiny
exported model with its embedding, galleries of 50 and 200 synthetic entries, real photos added
through the API under load; then the docs block rendered from the JSON it wrote."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from benchmarks.common.docblock import block_between
from benchmarks.common.results import read_json
from benchmarks.fewshot import DOC, SCALE_BLOCK_END, SCALE_BLOCK_START, SCALE_RESULTS
from benchmarks.fewshot.report import render_scale
from benchmarks.fewshot.scale import BASELINE_ENTRIES, main
from tests.tinymodel import MODEL_NAME, export_tiny_model

SIZES = (50, 200)
ADDS = 12


@pytest.fixture(scope="module")
def results_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny run of the benchmark; its results JSON."""
    root = tmp_path_factory.mktemp("gallery-scale")
    export_tiny_model(root / "repository")
    out = root / "gallery_scale.json"
    main(
        [
            *("--model-repository", str(root / "repository"), "--model-name", MODEL_NAME),
            *("--sizes", ",".join(map(str, SIZES)), "--requests", "6"),
            *("--clients", "2", "--adds", str(ADDS), "--add-batch", "5"),
            *("--workdir", str(root / "work"), "--out", str(out), "--no-doc"),
        ]
    )
    return out


def _sane(summary: dict[str, Any]) -> None:
    assert summary["p99_ms"] >= summary["p50_ms"] > 0, summary


def test_latency_and_memory_are_measured_at_every_size(results_path: Path) -> None:
    results = read_json(results_path)
    assert results["model"]["embedding_size"] > 0
    assert [size["entries"] for size in results["sizes"]] == list(SIZES)
    for size in results["sizes"]:
        for kind in ("gallery", "classifier"):
            assert size[kind]["ok"] == 6 and size[kind]["errors"] == 0
            _sane(size[kind])
        assert set(size["difference_ms"]) == {"p50_ms", "p99_ms", "mean_ms"}
        assert size["server_search_mean_ms"] > 0
        assert size["first_query_ms"] > 0 and size["rss_mb"] > 0
        memory = size["memory"]
        assert memory["embedding_bytes_per_entry"] == 4 * results["model"]["embedding_size"]
        # The store holds the rows and more (ids, labels, entry records) for every entry.
        assert memory["store_bytes_per_entry"] > memory["embedding_bytes_per_entry"]
        assert memory["spare_row_bytes_per_entry"] >= 0
    assert results["baseline"] == {"entries": BASELINE_ENTRIES, "rss_mb": results["baseline"]["rss_mb"]}


def test_an_empty_gallery_is_answered_with_a_conflict_saying_how_to_fill_it(results_path: Path) -> None:
    empty = read_json(results_path)["empty_gallery"]
    assert empty["status"] == 409
    assert "empty" in empty["error"] and "POST" in empty["error"]


def test_every_add_under_load_is_counted_afterwards(results_path: Path) -> None:
    adds = read_json(results_path)["adds"]
    assert adds["add_requests"]["errors"] == []
    assert adds["added_entries_counted"] == adds["images"] == ADDS
    assert adds["entries_after"] - adds["entries_before"] == ADDS
    assert adds["all_present"] is True
    assert adds["images_per_s"] > 0 and adds["window_s"] > 0
    for window in ("without_adds", "with_adds"):
        assert adds[window]["requests"] > 0 and adds[window]["errors"] == 0
        _sane(adds[window])
    assert adds["p99_ratio"] == pytest.approx(
        adds["with_adds"]["p99_ms"] / adds["without_adds"]["p99_ms"], abs=0.01
    )
    assert adds["within_target"] == (adds["p99_ratio"] <= adds["target_p99_ratio"])


def test_report_only_renders_the_block_from_the_json(
    results_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = tmp_path / "galleries.md"
    doc.write_text(f"# Galleries\n\nBefore.\n\n{SCALE_BLOCK_START}\nstale\n{SCALE_BLOCK_END}\n\nAfter.\n")
    capsys.readouterr()
    main(["--report-only", "--out", str(results_path), "--doc", str(doc)])
    printed = capsys.readouterr().out
    text = doc.read_text()
    block = text[text.index(SCALE_BLOCK_START) + len(SCALE_BLOCK_START) : text.index(SCALE_BLOCK_END)]
    assert "stale" not in text and text.startswith("# Galleries\n\nBefore.") and text.endswith("After.\n")
    assert block.strip() == printed.strip()
    for size in SIZES:
        assert f"\n| {size} | " in block
    assert "An empty gallery answers 409" in block
    assert f"added {ADDS} photos" in block and f"counted {ADDS} added entries: all there" in block


def test_the_docs_block_is_what_the_results_file_renders() -> None:
    block = block_between(DOC.read_text(), SCALE_BLOCK_START, SCALE_BLOCK_END, source=str(DOC))
    assert block == render_scale(read_json(SCALE_RESULTS)), (
        "docs/galleries.md's gallery-scale block differs from benchmarks/results/gallery_scale.json: run "
        "python -m benchmarks.fewshot.scale --report-only"
    )
