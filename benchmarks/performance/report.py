"""The performance results as Markdown: the file next to the results JSON and the block of
docs/performance.md.

The JSON is the source of truth; the Markdown is generated from it alone, so
`python -m benchmarks --report-only` regenerates both from a results file without measuring again.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.common.docblock import block_between, cell, replace_block
from benchmarks.performance.model_budget import budget_table
from benchmarks.performance.model_memory import memory_table
from benchmarks.performance.protocols import protocol_table
from benchmarks.performance.targets import HEADLINE_CONCURRENCY, find_level

PERFORMANCE_DOC = Path("docs/performance.md")
"""The document whose generated block holds the figures (under the repository root)."""
DOC_START = "<!-- generated: performance -->"
DOC_END = "<!-- end generated: performance -->"

SERVERS = ("service", "unbatched", "instances", "naive", "bento", "int8")
"""The servers of the tables and the plot, in order (benchmarks/performance/plot.py has a colour for each)."""
PEERS = ("bento", "naive")
"""Servers a user would pick instead of convserve: the headline ratios are the service's against them."""
PEER_RATIO_LEVELS = (1, HEADLINE_CONCURRENCY)
"""The lone request and the headline load."""
SERVER_TITLES = {
    "ceiling": "Ceiling: in-process decode + preprocess + ONNX Runtime, decode overlapped",
    "service": "convserve (dynamic batching)",
    "unbatched": "convserve, batching off (`MAX_BATCH_SIZE=1`)",
    "instances": "convserve, one single-threaded batch per core (`INSTANCES`=cores, `INTRA_OP_THREADS=1`)",
    "naive": "Hand-written FastAPI + PyTorch eager, one forward per request",
    "bento": "BentoML 1.4 with adaptive batching, same ONNX file and preprocessing",
    "int8": "convserve serving the INT8 variant (dynamic batching)",
}
SHORT_TITLES = {
    "service": "convserve",
    "unbatched": "batching off",
    "instances": "batch per core",
    "naive": "naive",
    "bento": "BentoML",
    "int8": "INT8",
}


def _met(target: Mapping[str, Any]) -> str:
    if target.get("invalid"):
        return "**INVALID** (ceiling below a server)"
    return {True: "yes", False: "**no**", None: "not measured"}[target["met"]]


def _summary_table(results: Mapping[str, Any]) -> list[str]:
    levels = results["levels"]
    lines = [
        f"| Server (concurrency {HEADLINE_CONCURRENCY}) | img/s | p50 ms | p95 ms | p99 ms | errors | "
        "mean batch | server CPU % |",
        "|---|---|---|---|---|---|---|---|",
        f"| {SERVER_TITLES['ceiling']} (batch {results['in_process'].get('best_batch_size', '–')}) | "
        f"{cell(results.get('ceiling_img_per_s'))} | – | – | – | – | – | – |",
    ]
    if results.get("int8_ceiling_img_per_s") is not None:
        lines.append(
            "| Ceiling with the INT8 variant (same batch, ONNX Runtime and decode threads) | "
            f"{cell(results['int8_ceiling_img_per_s'])} | – | – | – | – | – | – |"
        )
    for server in SERVERS:
        row = find_level(levels, server, "concurrency", HEADLINE_CONCURRENCY)
        if row is None:
            continue
        lines.append(
            f"| {SERVER_TITLES[server]} | {cell(row['img_per_s'])} | {cell(row['p50_ms'])} | "
            f"{cell(row['p95_ms'])} | {cell(row['p99_ms'])} | {row['errors']} | "
            f"{cell(row.get('mean_batch_size'), 2)} | {cell(row.get('server_cpu_percent'), 0)} |"
        )
    return lines


def peer_ratios(levels: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float | None]]:
    """convserve / each peer measured in the run, at concurrency 1 and 32: img/s (above 1 = convserve
    serves more) and p50, p99 (below 1 = convserve answers sooner). Keyed `service/bento@c32`."""
    ratios: dict[str, dict[str, float | None]] = {}
    for peer in PEERS:
        for concurrency in PEER_RATIO_LEVELS:
            ours = find_level(levels, "service", "concurrency", concurrency)
            theirs = find_level(levels, peer, "concurrency", concurrency)
            if ours is None or theirs is None:
                continue
            ratios[f"service/{peer}@c{concurrency}"] = {
                key: _ratio(ours.get(key), theirs.get(key)) for key in ("img_per_s", "p50_ms", "p99_ms")
            }
    return ratios


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return round(float(numerator) / float(denominator), 3)


def _peer_table(results: Mapping[str, Any]) -> list[str]:
    """The headline: convserve against the servers a user would pick instead, and against one batch per
    core set explicitly; with interleaved rounds, their median and range.

    Only for runs that measured the BentoML peer, the reference of the headline: results from before it
    existed render as they always did."""
    ratios = results.get("peer_ratios") or peer_ratios(results["levels"])
    if not any(key.startswith("service/bento@") for key in ratios):
        return []
    rounds = len({row["round"] for row in results.get("peer_rounds") or []})
    how = (
        f"median over {rounds} interleaved rounds, range in brackets; the naive server: one run"
        if rounds
        else "same run"
    )
    per_core = (
        ", and against one batch per core set explicitly" if any("instances@" in k for k in ratios) else ""
    )
    lines = [
        f"convserve against the servers a user would pick instead{per_core} (same photos; {how}; img/s "
        "above 1 and latency below 1 favour convserve):",
        "",
        "| convserve / | concurrency | img/s | p50 | p99 |",
        "|---|---|---|---|---|",
    ]
    for key, ratio in sorted(ratios.items(), key=lambda item: _PEER_ORDER.index(item[0].split("@")[0])):
        peer, concurrency = key.removeprefix("service/").split("@c")
        figures = [_ratio_cell(ratio, figure) for figure in ("img_per_s", "p50_ms", "p99_ms")]
        lines.append(f"| {SHORT_TITLES[peer]} | {concurrency} | " + " | ".join(figures) + " |")
    return [*lines, ""]


_PEER_ORDER = ("service/bento", "service/instances", "service/naive")


def _ratio_cell(ratio: Mapping[str, Any], figure: str) -> str:
    spread = ratio.get(f"{figure}_range")
    text = cell(ratio.get(figure), 2)
    return f"{text} ({cell(spread[0], 2)}–{cell(spread[1], 2)})" if spread else text


def _concurrency_table(results: Mapping[str, Any]) -> list[str]:
    levels = results["levels"]
    concurrencies = sorted(
        {int(row["level"]) for row in levels if row["mode"] == "concurrency" and row["server"] == "service"}
    )
    servers = [
        s for s in SERVERS if any(row["server"] == s and row["mode"] == "concurrency" for row in levels)
    ]
    lines = [
        "| Concurrency | " + " | ".join(f"{SHORT_TITLES[s]}: img/s (p99 ms)" for s in servers) + " |",
        "|---" * (len(servers) + 1) + "|",
    ]
    for concurrency in concurrencies:
        cells = []
        for server in servers:
            row = find_level(levels, server, "concurrency", concurrency)
            cells.append("–" if row is None else f"{cell(row['img_per_s'])} ({cell(row['p99_ms'], 0)})")
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
            f"| {row['server']} | {cell(float(row['level']))} | {cell(row['img_per_s'])} | "
            f"{cell(row['p50_ms'])} | {cell(row['p99_ms'])} | {row['errors']} | "
            f"{cell(row.get('mean_batch_size'), 2)} |"
        )
    return lines


def _targets_table(results: Mapping[str, Any]) -> list[str]:
    lines = ["| Target | threshold | measured | met |", "|---|---|---|---|"]
    for target in results["targets"]:
        lines.append(
            f"| {target['target']} | {cell(target['threshold'], 2)} | {cell(target['measured'], 3)} | "
            f"{_met(target)} |"
        )
    return lines


def _ceiling_lines(results: Mapping[str, Any]) -> list[str]:
    """How the ceiling was taken and how far its windows spread; first of all, whether it is valid."""
    lines = []
    if results.get("ceiling_valid") is False:
        lines += [
            f"**INVALID run: {results.get('ceiling_invalid_reason')}.** The ceiling did not bound the "
            "service, so every ratio to it is meaningless and its target is not judged; measure again "
            "on quiet cores.",
            "",
        ]
    spread = results.get("ceiling_spread")
    if spread and spread.get("windows"):
        lines += [
            f"Ceiling: the best of every in-process pipeline window ({spread['windows']} of its "
            f"configuration: {cell(spread['min_img_per_s'])}–{cell(spread['max_img_per_s'])} img/s, "
            f"spread {cell(100 * spread['relative_spread'], 0)} %).",
            "",
        ]
    return lines


def render_markdown(results: Mapping[str, Any], plot_link: str | None = None) -> str:
    """The performance figures, generated from a results dict (as written to the JSON).

    `plot_link` is where the plot is from the Markdown's folder (default: the JSON's `plot`)."""
    machine = results["machine"]
    corpus = results["corpus"]
    in_process = results["in_process"]
    lines = [
        *_ceiling_lines(results),
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
        *_peer_table(results),
        *_concurrency_table(results),
        "",
        "In process: single image (decode + preprocess + batch-1 run) p50 "
        f"{cell(in_process.get('single_image_p50_ms'))} ms, "
        f"p99 {cell(in_process.get('single_image_p99_ms'))} ms; "
        f"ONNX Runtime alone {cell(in_process.get('ort_only_best_img_per_s'))} img/s. "
        f"Service RSS: {_rss_sentence(results)}.",
        "",
        f"CPU per image and the INT8 variant (concurrency {HEADLINE_CONCURRENCY}; the key of each figure "
        "in the results JSON):",
        "",
        *_figures_table(results),
        "",
    ]
    protocol_lines = protocol_table(results["levels"])
    if protocol_lines:
        lines += [
            "Protocols: the same photos through each API of one service (default settings, top 5 answered; "
            "the FP32 tensor is preprocessed by the client before the run):",
            "",
            *protocol_lines,
            "",
        ]
    memory_lines = memory_table(results.get("model_memory"))
    if memory_lines:
        lines += [
            "Memory per model: the service's RSS once ready, serving copies of the model as separate "
            "models (default settings, one start per count):",
            "",
            *memory_lines,
            "",
        ]
    lines += _budget_lines(results.get("model_budget"))
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
    for what, reason in (results.get("not_measured") or {}).items():
        lines += [f"Not measured: {what} — {reason}.", ""]
    for note in (results.get("plan") or {}).get("notes", []):
        lines += [f"Note: {note}.", ""]
    plot = plot_link or results.get("plot")
    if plot:
        lines += [f"![throughput and latency]({plot})", ""]
    lines.append(f"Full results: `{results['output']}`.")
    return "\n".join(lines) + "\n"


def _budget_lines(budget: Mapping[str, Any] | None) -> list[str]:
    table = budget_table(budget)
    if not budget or not table:
        return []
    return [
        f"Many models under a memory budget: {budget['models']} copies of the model in one process "
        f"(default settings plus `CONVSERVE_MEMORY_BUDGET_MB`, one start per budget), "
        f"{budget['concurrency']} clients, each request to a model drawn from Zipf "
        f"(s = {budget['zipf_exponent']}) over the copies, {budget['budgets'][0].get('window_s', '–')} s "
        "measured after a warm-up; *waited* = the request waited for its model to load on demand "
        "(`Server-Timing: load`), *load wait* = how long it waited, as the service reports it "
        "(how to read it: [Many models per process](#many-models-per-process))"
        + _measured_apart(budget)
        + ":",
        "",
        *table,
        "",
    ]


def _measured_apart(budget: Mapping[str, Any]) -> str:
    """Where the scenario was run on its own and merged into the results: when, and with what command."""
    if not budget.get("command"):
        return ""
    return f"; measured {str(budget.get('created', '?'))[:10]} in a run of its own, `{budget['command']}`"


def _figures_table(results: Mapping[str, Any]) -> list[str]:
    """ONNX Runtime alone, CPU per image outside the model, and the INT8 variant."""
    int8 = results.get("int8") or {}
    in_process = int8.get("in_process") or {}
    quantize = int8.get("quantize") or {}
    views = (quantize.get("comparison") or {}).get("images", "?")
    checked_on = (
        "photo views"
        if (quantize.get("calibration") or {}).get("source") == "skimage:photos"
        else "validation images"
    )
    threads = in_process.get("intra_op_threads")
    int8_config = (
        f"batch {in_process.get('batch_size', '–')}, intra-op threads "
        f"{'as the service' if threads == 0 else threads}; FP32 at the same: "
        f"{cell(in_process.get('fp32_ort_alone_img_per_s'))} img/s"
    )
    rows: list[tuple[str, str, int]] = [
        ("ONNX Runtime alone in process, FP32, best batch and threads, img/s", "ort_alone_img_per_s", 1),
        ("convserve / ONNX Runtime alone", "ratio_service_ort_alone", 3),
        ("image decode + preprocess, CPU ms per image (profile)", "decode_ms_per_image", 1),
        (
            "HTTP + framework + JSON, CPU ms per image (profile): the sum of "
            + ", ".join(results.get("http_ms_buckets") or []),
            "http_ms_per_image",
            1,
        ),
        ("INT8 service, img/s", "int8_service_img_per_s", 1),
        ("INT8 service / FP32 service", "ratio_int8_fp32", 3),
        ("INT8 service / naive", "ratio_int8_naive", 3),
        (f"INT8 top-1 agreement with FP32, % of {views} {checked_on}", "int8_top1_agreement", 1),
        (f"ONNX Runtime alone in process, INT8 ({int8_config}), img/s", "int8_ort_alone_img_per_s", 1),
    ]
    if results.get("int8_accuracy_drop") is not None:
        rows.append(("FP32 − INT8 top-1 accuracy, points", "int8_accuracy_drop", 2))
    lines = ["| Figure | key | value |", "|---|---|---|"]
    for label, key, digits in rows:
        lines.append(f"| {label} | `{key}` | {cell(results.get(key), digits)} |")
    return lines


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
        lines.append(f"| {name} | {cell(bucket['cpu_ms_per_image'])} | {cell(bucket['share'] * 100, 0)} % |")
    return [*lines, ""]


def _rss_sentence(results: Mapping[str, Any]) -> str:
    by_requests = results.get("rss_mb_by_requests") or {}
    if not by_requests:
        return "not measured"
    return ", ".join(f"{value:.0f} MB after {int(count):,} requests" for count, value in by_requests.items())


def plot_link(plot: Path, markdown: Path) -> str:
    """The plot's path as a link from `markdown`'s folder (both relative to the same directory)."""
    return Path(os.path.relpath(plot.resolve(), markdown.resolve().parent)).as_posix()


def docs_block(results: Mapping[str, Any], results_path: Path, doc: Path) -> str:
    """The generated block of `doc` for the results at `results_path` (the plot is the PNG beside it)."""
    return render_markdown(results, plot_link(results_path.with_suffix(".png"), doc))


def committed_block(doc: Path) -> str:
    """The generated block as it stands in `doc` (raises, naming the markers, if they are missing)."""
    return block_between(doc.read_text(), DOC_START, DOC_END, source=str(doc))


def write_docs_block(results: Mapping[str, Any], results_path: Path, doc: Path) -> bool:
    """Regenerate `doc`'s block between `DOC_START` and `DOC_END`; True when it changed."""
    return replace_block(doc, docs_block(results, results_path, doc), DOC_START, DOC_END)
