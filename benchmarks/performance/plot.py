"""The results plot: throughput and latency against concurrency for every server measured."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display

import matplotlib.pyplot as plt

from benchmarks.performance.report import SERVERS, SHORT_TITLES

_COLOURS = {
    "service": "tab:blue",
    "unbatched": "tab:orange",
    "instances": "tab:purple",
    "naive": "tab:red",
    "bento": "tab:brown",
    "int8": "tab:green",
}


def _rows(levels: Sequence[Mapping[str, Any]], server: str, mode: str) -> list[Mapping[str, Any]]:
    rows = [row for row in levels if row["server"] == server and row["mode"] == mode]
    return sorted(rows, key=lambda row: float(row["level"]))


def _concurrency_axis(axes: Any, results: Mapping[str, Any]) -> None:
    levels = sorted({int(row["level"]) for row in results["levels"] if row["mode"] == "concurrency"})
    axes.set_xscale("log", base=2)
    if levels:
        axes.set_xticks(levels, [str(level) for level in levels])
    axes.set_xlabel("concurrent clients")


def _throughput_panel(axes: Any, results: Mapping[str, Any]) -> None:
    for server in SERVERS:
        rows = _rows(results["levels"], server, "concurrency")
        if rows:
            axes.plot(
                [row["level"] for row in rows],
                [row["img_per_s"] for row in rows],
                marker="o",
                color=_COLOURS[server],
                label=SHORT_TITLES[server],
            )
    if results.get("ceiling_img_per_s"):
        axes.axhline(results["ceiling_img_per_s"], color="black", linestyle="--", label="in-process ceiling")
    _concurrency_axis(axes, results)
    axes.set_ylabel("images / s")
    axes.set_title("Throughput")
    axes.set_ylim(bottom=0)
    axes.legend()


def _latency_panel(axes: Any, results: Mapping[str, Any]) -> None:
    for server in SERVERS:
        rows = _rows(results["levels"], server, "concurrency")
        if not rows:
            continue
        levels = [row["level"] for row in rows]
        for key, style in (("p50_ms", ":"), ("p95_ms", "--"), ("p99_ms", "-")):
            axes.plot(
                levels,
                [row[key] for row in rows],
                linestyle=style,
                marker=".",
                color=_COLOURS[server],
                label=f"{SHORT_TITLES[server]} {key.removesuffix('_ms')}",
            )
    _concurrency_axis(axes, results)
    axes.set_yscale("log")
    axes.set_ylabel("latency (ms)")
    axes.set_title("Latency percentiles")
    axes.legend(fontsize="small", ncol=2)


def _rate_panel(axes: Any, results: Mapping[str, Any]) -> None:
    for server in SERVERS:
        rows = _rows(results["levels"], server, "rate")
        if not rows:
            continue
        offered = [float(row["level"]) for row in rows]
        axes.plot(
            offered,
            [row["p99_ms"] for row in rows],
            marker="o",
            color=_COLOURS[server],
            label=f"{SHORT_TITLES[server]} p99",
        )
        axes.plot(
            offered,
            [row["p50_ms"] for row in rows],
            marker=".",
            linestyle=":",
            color=_COLOURS[server],
            label=f"{SHORT_TITLES[server]} p50",
        )
    axes.set_yscale("log")
    axes.set_xlabel("offered load (images / s, open loop)")
    axes.set_ylabel("latency (ms)")
    axes.set_title("Latency at fixed arrival rates")
    axes.legend(fontsize="small")


def write_plot(results: Mapping[str, Any], path: Path) -> None:
    """A PNG with throughput and latency vs concurrency, and latency vs offered rate when measured."""
    has_rates = any(row["mode"] == "rate" for row in results["levels"])
    figure, axes = plt.subplots(1, 3 if has_rates else 2, figsize=(17 if has_rates else 12, 5))
    _throughput_panel(axes[0], results)
    _latency_panel(axes[1], results)
    if has_rates:
        _rate_panel(axes[2], results)
    figure.suptitle(f"convserve benchmark ({results['mode']} run, {results['created'][:10]})")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
