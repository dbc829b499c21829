"""Robustness targets, key figures and the docs/robustness.md block, from small dicts shaped like the JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks.__main__ import build_parser
from benchmarks.common.docblock import MissingMarkersError, block_between, replace_block
from benchmarks.common.results import read_json
from benchmarks.robustness.cli import DEFAULT_BEFORE, DEFAULT_OUTPUT, ROBUSTNESS_DOC, config_from_arguments
from benchmarks.robustness.safety_report import DOC_END, DOC_START, key_figures, render_markdown
from benchmarks.robustness.safety_targets import check_targets


def _case(
    name: str, expected: int, status: int | None, *, cpu: float, memory: float, size: int = 1000
) -> dict[str, Any]:
    return {
        "name": name,
        "files": 1,
        "upload_bytes": size,
        "expected_status": expected,
        "status": status,
        "statuses": [status],
        "as_expected": status == expected,
        "errors": [] if status else ["killed_over_6144_mb"],
        "seconds": cpu * 1.5,
        "cpu_s": cpu,
        "rss_increase_mb": memory,
        "cpu_ratio": round(cpu / 0.03, 2),
        "memory_ratio": round(memory / 1.0, 2),
    }


def _latency(p50: float | None, p99: float | None) -> dict[str, float | None]:
    return {"p50_ms": p50, "p95_ms": p99, "p99_ms": p99, "mean_ms": p50, "max_ms": p99}


def _results(*, refused_p99: float, exit_status: int, png_status: int | None) -> dict[str, Any]:
    return {
        "created": "2026-12-01T04:00:00+00:00",
        "command": "python -m benchmarks --robustness",
        "service_commit": "abc123",
        "output": "benchmarks/results/robustness.json",
        "machine": {"cpu_model": "AMD EPYC", "logical_cpus": 2},
        "corpus": {
            "reference": {"cpu_s": 0.03, "rss_increase_mb": 0.5},
            "cases": [
                _case("reference_jpeg_2mp", 200, 200, cpu=0.03, memory=0.5, size=235_000),
                _case("png_4000x1", 422, png_status, cpu=0.002 if png_status == 422 else 3.8, memory=0.0),
                {**_case("hundred_files", 200, 200, cpu=2.9, memory=140.0, size=2_783_300), "files": 100},
            ],
        },
        "overload": {
            "capacity_img_per_s_at_32": 55.0,
            "offered_req_per_s": 110.0,
            "seconds": 30.0,
            "requests": 3300,
            "answered_per_s": 54.0,
            "answered": 1700,
            "refused": 1600,
            "lost_total": 0,
            "refused_latency_ms": _latency(3.0, refused_p99),
            "answered_latency_ms": _latency(900.0, 2500.0),
            "rss_before_mb": 600.0,
            "rss_after_mb": 640.0,
            "rss_max_mb": 700.0,
        },
        "slowloris": {
            "head": {
                "connections": 200,
                "opened": 200,
                "refused_at_connect": 0,
                "closed_by_server": 200,
                "wait_s": 30.0,
                "closed_after_s": {"p50_s": 10.1, "max_s": 10.4},
                "normal_requests_meanwhile": 12,
                "normal_requests_ok": 12,
            },
            "phase_seconds": 25.0,
        },
        "sigterm": {
            "32": {
                "exit_status": exit_status,
                "exited_after_s": 1.5,
                "in_flight_at_sigterm": 32,
                "answered_200": 32,
                "refused_503": 0,
                "lost": 0,
            },
            "phase_seconds": 60.0,
        },
    }


def _met(results: dict[str, Any]) -> dict[str, bool | None]:
    return {target["target"]: target["met"] for target in check_targets(results)}


def test_targets_met_by_a_safe_server() -> None:
    met = _met(_results(refused_p99=20.0, exit_status=0, png_status=422))
    assert met["hostile files get their expected status"] is True
    assert met["503 p99 at 2× load ≤ 50 ms (in ms)"] is True
    assert met["no lost requests at 2× load"] is True
    assert met["slow clients (head): all closed within 30 s"] is True
    assert met["SIGTERM under 32 clients: exit 0, nothing lost"] is True
    # The 100-file request is over 1 MB, so its 97 × CPU is outside the small-file rule.
    assert met["files < 1 MB: CPU time ≤ 2 × 2-MP JPEG"] is True


def test_targets_missed_by_the_old_server() -> None:
    met = _met(_results(refused_p99=12_800.0, exit_status=143, png_status=200))
    assert met["hostile files get their expected status"] is False
    assert met["503 p99 at 2× load ≤ 50 ms (in ms)"] is False
    assert met["SIGTERM under 32 clients: exit 0, nothing lost"] is False
    assert met["files < 1 MB: CPU time ≤ 2 × 2-MP JPEG"] is False


def test_figures_and_markdown_show_before_and_after() -> None:
    before = _results(refused_p99=12_800.0, exit_status=143, png_status=None)
    after = _results(refused_p99=20.0, exit_status=0, png_status=422)
    figures = dict(key_figures(before))
    assert figures["4000×1 PNG"].startswith("killed_over_6144_mb")
    assert figures["SIGTERM under 32 clients"].startswith("exit 143 after 1.5 s")
    assert figures["2× load: 503 latency p50 / p99"] == "3 ms / 12.80 s"
    markdown = render_markdown(after, before)
    assert "| Figure | before | after |" in markdown
    assert "| 4000×1 PNG | killed_over_6144_mb" in markdown
    assert "| 2× load: 503 latency p50 / p99 | 3 ms / 12.80 s | 3 ms / 20 ms |" in markdown
    assert "`png_4000x1`" in markdown


def test_docs_block_between_robustness_markers_is_replaced(tmp_path: Path) -> None:
    doc = tmp_path / "robustness.md"
    doc.write_text(f"# x\n{DOC_START}\nstale figures\n{DOC_END}\nafter\n")
    markdown = render_markdown(_results(refused_p99=20.0, exit_status=0, png_status=422))
    assert replace_block(doc, markdown, DOC_START, DOC_END)
    text = doc.read_text()
    assert (
        "stale figures" not in text
        and "| Figure | measured |" in text
        and text.endswith(f"{DOC_END}\nafter\n")
    )
    json.dumps(check_targets(_results(refused_p99=20.0, exit_status=0, png_status=422)))  # JSON-safe


def _window(p50: float, p99: float, *, failed: int = 0, cpu: float = 0.5) -> dict[str, Any]:
    return {
        "seconds": 10.0,
        "normal_requests": 200,
        "normal_statuses": {"200": 200 - failed, **({"ClientOSError": failed} if failed else {})},
        "normal_latency_ms": _latency(p50, p99),
        "server_cpu_s": cpu,
        "rss_before_mb": 450.0,
        "rss_growth_mb": 2.0,
        "server_died": False,
    }


def _hostile(name: str, statuses: dict[str, dict[str, int]], p99: float, **window: Any) -> dict[str, Any]:
    total: dict[str, int] = {}
    for counts in statuses.values():
        for status, count in counts.items():
            total[status] = total.get(status, 0) + count
    return {
        "name": name,
        "description": f"what {name} sends",
        **_window(30.0, p99, **window),
        "hostile_requests": sum(total.values()),
        "hostile_statuses": total,
        "hostile_by_request": statuses,
        "hostile_latency_ms": _latency(60.0, 300.0),
        "hostile_error": None,
        "p99_ratio": round(p99 / 40.0, 2),
    }


def _with_interference(results: dict[str, Any]) -> dict[str, Any]:
    return {
        **results,
        "interference": {
            "reference": "reference_jpeg_2mp",
            "plan": {"normal_requests": 200, "min_window_s": 10.0},
            "image_cases_missing": ["jpeg_progressive_scans"],
            "idle": _window(30.0, 40.0, cpu=6.0),
            "classes": [
                _hostile("request_head", {"header_2048_kib": {"431": 60}, "headers_5000": {"431": 61}}, 48.0),
                _hostile("parse_amplification", {"v2_gzip_numbers": {"413": 9}}, 124.0, cpu=19.5),
                _hostile("admin_refusal", {"index_no_token": {"401": 900}}, 60.0, failed=2),
            ],
        },
    }


def test_interference_targets_count_failed_normal_requests_as_missed() -> None:
    met = _met(_with_interference(_results(refused_p99=20.0, exit_status=0, png_status=422)))
    assert met["normal p99 beside one hostile client (request_head) ≤ 2 × idle"] is True
    assert met["normal p99 beside one hostile client (parse_amplification) ≤ 2 × idle"] is False
    # Within 2 × idle, but two normal requests got no answer at all.
    assert met["normal p99 beside one hostile client (admin_refusal) ≤ 2 × idle"] is False


def test_markdown_has_the_interference_table_and_before_after_figures() -> None:
    before = _results(refused_p99=12_800.0, exit_status=143, png_status=None)
    after = _with_interference(_results(refused_p99=20.0, exit_status=0, png_status=422))
    after["targets"] = check_targets(after)
    markdown = render_markdown(after, before)
    assert "| Hostile client | its requests: statuses | normal p50 / p99 | p99 × idle |" in markdown
    assert "| none (idle) | – | 30 ms / 40 ms | 1.00 | 6.00 in 10.0 s | 2.0 |" in markdown
    assert (
        "| `request_head`: what request_head sends | 121: `header_2048_kib` 431 × 60; "
        "`headers_5000` 431 × 61 | 30 ms / 48 ms | 1.20 | 0.50 in 10.0 s | 2.0 |"
    ) in markdown
    assert "| 30 ms / 124 ms | 3.10 ✗ | 19.50 in 10.0 s |" in markdown
    assert "| 30 ms / 60 ms, 2 failed | 1.50 ✗ |" in markdown
    assert "Image cases not in the corpus yet: jpeg_progressive_scans." in markdown
    # The run before measured no interference: its column says so, the comparison stays.
    assert "| normal 2-MP JPEG p50 / p99, idle server | – | 30 ms / 40 ms |" in markdown
    assert (
        "| normal p99 beside one hostile client: parse_amplification | – | "
        "124 ms (3.10 × idle); hostile: 413 × 9 |"
    ) in markdown
    assert "| 4000×1 PNG | killed_over_6144_mb" in markdown
    assert "Hostile client" not in render_markdown(before)  # a run without the phase has no table


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["--robustness", *argv])


def test_cli_builds_the_config_and_refuses_bad_phases(tmp_path: Path) -> None:
    config = config_from_arguments(
        _args("--phases", "corpus,sigterm", "--sigterm-clients", "8,64", "--overload-rate", "90"),
        "python -m benchmarks --robustness",
        tmp_path,
        {},
    )
    assert config.phases == ("corpus", "sigterm")
    assert config_from_arguments(_args(), "x", tmp_path, {}).phases[-1] == "interference"
    assert config_from_arguments(_args("--phases", "interference"), "x", tmp_path, {}).phases == (
        "interference",
    )
    assert config.sigterm_clients == (8, 64)
    assert config.overload_rate == 90.0
    with pytest.raises(SystemExit, match="--phases"):
        config_from_arguments(_args("--phases", "corpus,bogus"), "x", tmp_path, {})
    with pytest.raises(SystemExit, match="--service-dir"):
        config_from_arguments(_args("--service-dir", str(tmp_path)), "x", tmp_path, {})


REPO_ROOT = Path(__file__).resolve().parents[2]


def test_committed_docs_block_is_what_the_committed_results_generate() -> None:
    doc = REPO_ROOT / ROBUSTNESS_DOC
    try:
        committed = block_between(doc.read_text(), DOC_START, DOC_END, source=str(doc))
    except MissingMarkersError:
        pytest.skip(f"{ROBUSTNESS_DOC} has no {DOC_START} … {DOC_END} block yet")
    expected = render_markdown(read_json(REPO_ROOT / DEFAULT_OUTPUT), read_json(REPO_ROOT / DEFAULT_BEFORE))
    assert committed == expected, (
        "regenerate it: python -m benchmarks --robustness --report-only --update-docs yes"
    )
