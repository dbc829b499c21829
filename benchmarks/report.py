"""Turning measured levels into the results JSON, the Markdown performance table and the README block.

The JSON is the source of truth; the Markdown table (written next to it and, for full runs, between
the README markers) is generated from the JSON alone, so `python -m benchmarks.report` can regenerate
the README from a results file without measuring again.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

README_START = "<!-- perf-table:start -->"
README_END = "<!-- perf-table:end -->"

HEADLINE_CONCURRENCY = 32
SERVERS = ("service", "unbatched", "naive")
SERVER_TITLES = {
    "ceiling": "Ceiling: in-process decode + preprocess + ONNX Runtime, decode overlapped",
    "service": "convserve (dynamic batching)",
    "unbatched": "convserve, batching off (`MAX_BATCH_SIZE=1`)",
    "naive": "Hand-written FastAPI + PyTorch eager, one forward per request",
}
SHORT_TITLES = {"service": "convserve", "unbatched": "batching off", "naive": "naive"}

# The targets, each checked from the results JSON alone.
TARGET_SERVICE_CEILING = 0.90
TARGET_SERVICE_NAIVE = 4.0
TARGET_P99_C1_SLACK_MS = 10.0
TARGET_RSS_GROWTH = 0.10


def find_level(
    levels: Sequence[Mapping[str, Any]], server: str, mode: str, level: float
) -> Mapping[str, Any] | None:
    """The measured row for one server at one concurrency (mode "concurrency") or rate (mode "rate")."""
    for row in levels:
        if row["server"] == server and row["mode"] == mode and float(row["level"]) == float(level):
            return row
    return None


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 3)


def _throughput_at(levels: Sequence[Mapping[str, Any]], server: str, concurrency: int) -> float | None:
    row = find_level(levels, server, "concurrency", concurrency)
    return None if row is None else float(row["img_per_s"])


def headline(
    levels: Sequence[Mapping[str, Any]],
    ceiling_img_per_s: float | None,
    single_image_p99_ms: float | None,
    rss_mb_by_requests: Mapping[int, float],
) -> dict[str, Any]:
    """The issue's top-level keys, computed from the per-level table (concurrency 32 is the headline)."""
    service = _throughput_at(levels, "service", HEADLINE_CONCURRENCY)
    naive = _throughput_at(levels, "naive", HEADLINE_CONCURRENCY)
    unbatched = _throughput_at(levels, "unbatched", HEADLINE_CONCURRENCY)
    at_32 = find_level(levels, "service", "concurrency", HEADLINE_CONCURRENCY) or {}
    at_1 = find_level(levels, "service", "concurrency", 1) or {}
    checkpoints = sorted(rss_mb_by_requests)
    first_rss = rss_mb_by_requests[checkpoints[0]] if checkpoints else None
    last_rss = rss_mb_by_requests[checkpoints[-1]] if checkpoints else None
    growth = None
    if first_rss and last_rss is not None and len(checkpoints) > 1:
        growth = round(last_rss / first_rss - 1.0, 4)
    return {
        "ceiling_img_per_s": ceiling_img_per_s,
        "service_img_per_s": service,
        "naive_img_per_s": naive,
        "unbatched_img_per_s": unbatched,
        "ratio_service_ceiling": _ratio(service, ceiling_img_per_s),
        "ratio_service_naive": _ratio(service, naive),
        "ratio_service_unbatched": _ratio(service, unbatched),
        "p50_ms": at_32.get("p50_ms"),
        "p95_ms": at_32.get("p95_ms"),
        "p99_ms": at_32.get("p99_ms"),
        "p99_ms_at_concurrency_1": at_1.get("p99_ms"),
        "single_image_in_process_p99_ms": single_image_p99_ms,
        "rss_mb_after_1k": rss_mb_by_requests.get(1000),
        "rss_mb_after_20k": rss_mb_by_requests.get(20000),
        "rss_mb_by_requests": {str(count): rss_mb_by_requests[count] for count in checkpoints},
        "rss_growth": growth,
        "rss_growth_between_requests": [checkpoints[0], checkpoints[-1]] if len(checkpoints) > 1 else None,
    }


def check_targets(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each issue target: threshold, measured value, and whether it was met (None: not measured)."""

    def at_least(value: float | None, threshold: float) -> bool | None:
        return None if value is None else value >= threshold

    def at_most(value: float | None, threshold: float | None) -> bool | None:
        return None if value is None or threshold is None else value <= threshold

    p99_single = results.get("single_image_in_process_p99_ms")
    p99_limit = None if p99_single is None else round(p99_single + TARGET_P99_C1_SLACK_MS, 2)
    growth = results.get("rss_growth")
    growth_span = results.get("rss_growth_between_requests")
    growth_label = "RSS growth" + (f" {growth_span[0]} → {growth_span[1]} requests" if growth_span else "")
    return [
        {
            "target": f"service ≥ {TARGET_SERVICE_CEILING:.2f} × ceiling (c={HEADLINE_CONCURRENCY})",
            "threshold": TARGET_SERVICE_CEILING,
            "measured": results.get("ratio_service_ceiling"),
            "met": at_least(results.get("ratio_service_ceiling"), TARGET_SERVICE_CEILING),
        },
        {
            "target": f"service ≥ {TARGET_SERVICE_NAIVE:.0f} × naive (c={HEADLINE_CONCURRENCY})",
            "threshold": TARGET_SERVICE_NAIVE,
            "measured": results.get("ratio_service_naive"),
            "met": at_least(results.get("ratio_service_naive"), TARGET_SERVICE_NAIVE),
        },
        {
            "target": f"p99 at c=1 ≤ in-process single-image p99 + {TARGET_P99_C1_SLACK_MS:.0f} ms",
            "threshold": p99_limit,
            "measured": results.get("p99_ms_at_concurrency_1"),
            "met": at_most(results.get("p99_ms_at_concurrency_1"), p99_limit),
        },
        {
            "target": f"{growth_label} ≤ {TARGET_RSS_GROWTH:.0%}",
            "threshold": TARGET_RSS_GROWTH,
            "measured": growth,
            "met": None if growth is None else abs(growth) <= TARGET_RSS_GROWTH,
        },
    ]


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _met(flag: bool | None) -> str:
    return {True: "yes", False: "**no**", None: "not measured"}[flag]


def _summary_table(results: Mapping[str, Any]) -> list[str]:
    levels = results["levels"]
    lines = [
        f"| Server (concurrency {HEADLINE_CONCURRENCY}) | img/s | p50 ms | p95 ms | p99 ms | errors | "
        "mean batch | server CPU % |",
        "|---|---|---|---|---|---|---|---|",
        f"| {SERVER_TITLES['ceiling']} (batch {results['in_process'].get('best_batch_size', '–')}) | "
        f"{_fmt(results.get('ceiling_img_per_s'))} | – | – | – | – | – | – |",
    ]
    for server in SERVERS:
        row = find_level(levels, server, "concurrency", HEADLINE_CONCURRENCY)
        if row is None:
            continue
        lines.append(
            f"| {SERVER_TITLES[server]} | {_fmt(row['img_per_s'])} | {_fmt(row['p50_ms'])} | "
            f"{_fmt(row['p95_ms'])} | {_fmt(row['p99_ms'])} | {row['errors']} | "
            f"{_fmt(row.get('mean_batch_size'), 2)} | {_fmt(row.get('server_cpu_percent'), 0)} |"
        )
    return lines


def _concurrency_table(results: Mapping[str, Any]) -> list[str]:
    levels = results["levels"]
    concurrencies = sorted(
        {int(row["level"]) for row in levels if row["mode"] == "concurrency" and row["server"] == "service"}
    )
    lines = [
        "| Concurrency | " + " | ".join(f"{SHORT_TITLES[s]}: img/s (p99 ms)" for s in SERVERS) + " |",
        "|---" * (len(SERVERS) + 1) + "|",
    ]
    for concurrency in concurrencies:
        cells = []
        for server in SERVERS:
            row = find_level(levels, server, "concurrency", concurrency)
            cells.append("–" if row is None else f"{_fmt(row['img_per_s'])} ({_fmt(row['p99_ms'], 0)})")
        lines.append(f"| {concurrency} | " + " | ".join(cells) + " |")
    return lines


def _rate_table(results: Mapping[str, Any]) -> list[str]:
    rows = [row for row in results["levels"] if row["mode"] == "rate"]
    if not rows:
        return []
    lines = [
        "| Server | offered img/s | achieved img/s | p50 ms | p99 ms | errors | mean batch |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in sorted(rows, key=lambda r: (SERVERS.index(r["server"]), r["level"])):
        lines.append(
            f"| {row['server']} | {_fmt(float(row['level']))} | {_fmt(row['img_per_s'])} | "
            f"{_fmt(row['p50_ms'])} | {_fmt(row['p99_ms'])} | {row['errors']} | "
            f"{_fmt(row.get('mean_batch_size'), 2)} |"
        )
    return lines


def _targets_table(results: Mapping[str, Any]) -> list[str]:
    lines = ["| Target | threshold | measured | met |", "|---|---|---|---|"]
    for target in results["targets"]:
        lines.append(
            f"| {target['target']} | {_fmt(target['threshold'], 2)} | {_fmt(target['measured'], 3)} | "
            f"{_met(target['met'])} |"
        )
    return lines


def render_markdown(results: Mapping[str, Any]) -> str:
    """The performance section's body, generated from a results dict (as written to the JSON)."""
    machine = results["machine"]
    corpus = results["corpus"]
    in_process = results["in_process"]
    lines = [
        f"Measured {results['created'][:10]} with `{results['command']}` ({results['mode']} run, "
        f"{results['duration_s']:.0f} s) on {machine['cpu_model']}, {machine['logical_cpus']} logical CPUs, "
        f"ONNX Runtime provider {in_process.get('provider', '?')}; the load generator shares the same "
        f"cores. Model `{results['model']['name']}` "
        f"v{results['model']['version']} ({results['model'].get('backbone', '?')}, input "
        f"{results['model'].get('input_shape')}). Images: {corpus['count']} JPEGs of "
        f"{corpus['megapixels_min']:.1f}–{corpus['megapixels_max']:.1f} MP made from scikit-image "
        "sample photos, one per request.",
        "",
        *_summary_table(results),
        "",
        *_concurrency_table(results),
        "",
        "In process: single image (decode + preprocess + batch-1 run) p50 "
        f"{_fmt(in_process.get('single_image_p50_ms'))} ms, "
        f"p99 {_fmt(in_process.get('single_image_p99_ms'))} ms; "
        f"ONNX Runtime alone {_fmt(in_process.get('ort_only_best_img_per_s'))} img/s. "
        f"Service RSS: {_rss_sentence(results)}.",
        "",
    ]
    rate_lines = _rate_table(results)
    if rate_lines:
        lines += [
            "Fixed arrival rates (open loop, latency from the scheduled send time):",
            "",
            *rate_lines,
            "",
        ]
    lines += [*_targets_table(results), ""]
    lines += _profile_lines(results)
    for note in (results.get("plan") or {}).get("notes", []):
        lines += [f"Note: {note}.", ""]
    if results.get("plot"):
        lines += [f"![throughput and latency]({results['plot']})", ""]
    lines.append(f"Full results: `{results['output']}`.")
    return "\n".join(lines) + "\n"


def _profile_lines(results: Mapping[str, Any]) -> list[str]:
    profile = results.get("profile")
    if not profile:
        return []
    lines = [
        f"Where the service's CPU goes at concurrency {profile['concurrency']} (py-spy, "
        f"{profile['img_per_s_while_profiling']:.1f} img/s while sampled):",
        "",
        "| Activity | CPU ms per image | share |",
        "|---|---|---|",
    ]
    for name, bucket in profile["buckets"].items():
        lines.append(f"| {name} | {_fmt(bucket['cpu_ms_per_image'])} | {_fmt(bucket['share'] * 100, 0)} % |")
    return [*lines, ""]


def _rss_sentence(results: Mapping[str, Any]) -> str:
    by_requests = results.get("rss_mb_by_requests") or {}
    if not by_requests:
        return "not measured"
    return ", ".join(f"{value:.0f} MB after {int(count):,} requests" for count, value in by_requests.items())


def write_json(results: Mapping[str, Any], path: Path) -> None:
    """Write atomically (temp file + rename) so a crash never leaves half a results file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
    temporary.replace(path)


def update_readme(
    readme: Path, table_markdown: str, start: str = README_START, end: str = README_END
) -> bool:
    """Replace the text between two markers (the perf table's by default); False when they are missing."""
    try:
        text = readme.read_text()
    except FileNotFoundError:
        log.warning("%s does not exist; the performance table was not written into it", readme)
        return False
    begin, finish = text.find(start), text.find(end)
    if begin < 0 or finish < begin:
        log.warning("%s has no %s … %s block; add both markers where the table belongs", readme, start, end)
        return False
    updated = text[: begin + len(start)] + "\n" + table_markdown + text[finish:]
    if updated != text:
        readme.write_text(updated)
    return True
