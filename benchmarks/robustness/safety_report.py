"""The robustness run's key figures and docs/robustness.md block, computed from its results JSON alone.

`render_markdown(after, before)` writes the block: the key figures before → after, the targets,
the interference table and the per-file table of the latest run. Anything a run did not measure
shows as "–".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from benchmarks.robustness.safety_targets import (
    TARGET_INTERFERENCE_P99_RATIO,
    Row,
    get,
    normal_failures,
    small_file_rows,
    worst,
)

DOC_START = "<!-- robustness:start -->"
DOC_END = "<!-- robustness:end -->"


def _fmt(value: Any, digits: int = 0, unit: str = "") -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}{unit}"
    return f"{value}{unit}"


def _seconds(ms: Any) -> str:
    return "–" if ms is None else f"{ms / 1000:.2f} s" if ms >= 1000 else f"{ms:.0f} ms"


def _case_figure(results: Row, name: str) -> str:
    row = next((r for r in get(results, "corpus", "cases") or [] if r["name"] == name), None)
    if row is None:
        return "–"
    status = row["status"] if row["status"] is not None else ", ".join(row["errors"]) or "no answer"
    return (
        f"{status} in {_seconds(row['seconds'] * 1000 if row['seconds'] is not None else None)}, "
        f"CPU {_fmt(row['cpu_s'], 2, ' s')}, RSS +{_fmt(row['rss_increase_mb'], 0, ' MB')}"
    )


def _worst_figure(results: Row, key: str) -> str:
    row = worst(small_file_rows(results), key)
    if row is None:
        return "–"
    absolute = f"{row['cpu_s']:.3f} s" if key == "cpu_ratio" else f"+{row['rss_increase_mb']:.1f} MB"
    return f"{row[key]:g} × (`{row['name']}`, {absolute})"


def _overload_figures(results: Row) -> list[tuple[str, str]]:
    o = get(results, "overload") or {}
    if "requests" not in o:
        return [("2× load", "–" if not o.get("error") else f"failed: {o['error']}")]
    refused, answered = o["refused_latency_ms"], o["answered_latency_ms"]
    return [
        (
            "capacity at 32 clients → offered rate",
            f"{o['capacity_img_per_s_at_32']:.1f} img/s → {o['offered_req_per_s']:.1f} req/s "
            f"for {o['seconds']:g} s",
        ),
        ("2× load: answered per second", _fmt(o.get("answered_per_s"), 1, " img/s")),
        (
            "2× load: answered / 503 / lost",
            f"{o['answered']:,} / {o['refused']:,} / {o['lost_total']:,} of {o['requests']:,} sent"
            + (
                f" ({o['skipped_client_backlog']:,} unsent: too many outstanding)"
                if o.get("skipped_client_backlog")
                else ""
            ),
        ),
        ("2× load: 503 latency p50 / p99", f"{_seconds(refused['p50_ms'])} / {_seconds(refused['p99_ms'])}"),
        (
            "2× load: accepted latency p50 / p99",
            f"{_seconds(answered['p50_ms'])} / {_seconds(answered['p99_ms'])}",
        ),
        ("2× load: /healthz latency p50 / max", _health_figure(o.get("healthz_meanwhile"))),
        ("2× load: connections waiting to be accepted, max", _fmt(get(o, "accept_queue", "max"))),
        (
            "2× load: RSS before → after (max)",
            f"{_fmt(o['rss_before_mb'])} → {_fmt(o['rss_after_mb'])} MB ({_fmt(o['rss_max_mb'])})",
        ),
    ]


def _health_figure(health: Row | None) -> str:
    if not health or not health.get("probes"):
        return "–"
    latency = health["latency_ms"]
    answered = f"{health['ok']}/{health['probes']} OK"
    return f"{_seconds(latency['p50_ms'])} / {_seconds(latency['max_ms'])} ({answered})"


def _slow_figure(run: Row | None) -> str:
    if not run or "opened" not in run:
        return "–"
    closed = run["closed_by_server"]
    when = (
        ""
        if not closed
        else f" after {run['closed_after_s']['p50_s']:g} s median, {run['closed_after_s']['max_s']:g} s max"
    )
    refused = f", {run['refused_at_connect']} refused at connect" if run["refused_at_connect"] else ""
    return (
        f"{closed} of {run['opened']} closed{when}{refused}; normal requests "
        f"{run['normal_requests_ok']}/{run['normal_requests_meanwhile']} OK"
    )


def _sigterm_figure(run: Row | None) -> str:
    if not run or "exit_status" not in run:
        return "–"
    exited = (
        "killed (no exit)"
        if run["exit_status"] is None
        else f"exit {run['exit_status']} after {run['exited_after_s']:g} s"
    )
    return (
        f"{exited}; in flight {run['in_flight_at_sigterm']}: {run['answered_200']} answered, "
        f"{run['refused_503']} 503, {run['lost']} lost"
    )


def _outcomes(counts: Mapping[str, int]) -> str:
    """{"431": 60, "ClientOSError": 2} -> "431 × 60, ClientOSError × 2"."""
    return ", ".join(f"{outcome} × {count:,}" for outcome, count in counts.items()) or "none sent"


def _idle_figure(interference: Row) -> str:
    idle = get(interference, "idle", "normal_latency_ms")
    if idle:
        return f"{_seconds(idle['p50_ms'])} / {_seconds(idle['p99_ms'])}"
    return f"failed: {interference['error']}" if interference.get("error") else "–"


def _interference_figures(results: Row) -> list[tuple[str, str]]:
    interference = get(results, "interference") or {}
    figures = [("normal 2-MP JPEG p50 / p99, idle server", _idle_figure(interference))]
    for row in interference.get("classes") or []:
        latency = row["normal_latency_ms"]
        failed = normal_failures(row)
        figures.append(
            (
                f"normal p99 beside one hostile client: {row['name']}",
                f"{_seconds(latency['p99_ms'])} ({_fmt(row['p99_ratio'], 2, ' × idle')}"
                + (f", {failed} failed" if failed else "")
                + f"); hostile: {_outcomes(row.get('hostile_statuses') or {})}",
            )
        )
    return figures


def _expected_count(corpus: list[Row]) -> str:
    cases = [row for row in corpus if not row.get("cost_probe")]
    return f"{sum(row['as_expected'] for row in cases)} of {len(cases)}" if cases else "–"


def key_figures(results: Row) -> list[tuple[str, str]]:
    """The key figures as (label, value) pairs, in a fixed order, "–" where not measured."""
    corpus = get(results, "corpus", "cases") or []
    figures = [
        ("hostile files with the expected status", _expected_count(corpus)),
        ("normal 2-MP JPEG (the reference)", _case_figure(results, "reference_jpeg_2mp")),
        ("4000×1 PNG", _case_figure(results, "png_4000x1")),
        ("40000×1 PNG", _case_figure(results, "png_40000x1")),
        ("1×39000000 PNG (77 KB)", _case_figure(results, "png_1x39000000")),
        ("worst file < 1 MB: CPU vs reference", _worst_figure(results, "cpu_ratio")),
        ("worst file < 1 MB: peak RSS increase vs reference", _worst_figure(results, "memory_ratio")),
        *_overload_figures(results),
    ]
    slow = get(results, "slowloris") or {}
    figures += [
        (
            f"{get(slow, mode, 'connections') or ''} slow clients, partial {mode}",
            _slow_figure(slow.get(mode)),
        )
        for mode in ("head", "body")
    ]
    sigterm = get(results, "sigterm") or {}
    figures += [
        (f"SIGTERM under {clients} clients", _sigterm_figure(run))
        for clients, run in sigterm.items()
        if isinstance(run, Mapping)
    ]
    return figures + _interference_figures(results)


def _describe_run(results: Row) -> str:
    machine = results.get("machine") or {}
    others = sum(entry["cpu_percent"] for entry in results.get("other_processes_cpu_before") or [])
    # The commit stays in the results JSON (`service_commit`); the docs name the run by date and machine.
    return (
        f"{results.get('created', '?')[:16].replace('T', ' ')} UTC, {machine.get('cpu_model', '?')} × "
        f"{machine.get('logical_cpus', '?')}, other processes using {others:.0f} % CPU at the start"
    )


def _figures_table(after: Row, before: Row | None) -> list[str]:
    if before is None:
        return ["| Figure | measured |", "|---|---|", *(f"| {k} | {v} |" for k, v in key_figures(after))]
    earlier = dict(key_figures(before))
    lines = ["| Figure | before | after |", "|---|---|---|"]
    lines += [f"| {label} | {earlier.get(label, '–')} | {value} |" for label, value in key_figures(after)]
    return lines


def _number(value: Any) -> str:
    return "–" if value is None else f"{value:,.4g}" if isinstance(value, float) else str(value)


def _met(flag: bool | None) -> str:
    return {True: "yes", False: "**no**", None: "not measured"}[flag]


def _cases_table(results: Row) -> list[str]:
    reference = get(results, "corpus", "reference") or {}
    lines = [
        "Per file (one request at a time; ratios to the 2-MP JPEG, which took "
        f"{_fmt(reference.get('cpu_s'), 3, ' s')} CPU and "
        f"+{_fmt(reference.get('rss_increase_mb'), 1, ' MB')} peak RSS; "
        "memory ratios floor the reference at 1 MB):",
        "",
        "| File | bytes | expected | got | time | CPU s (× ref) | peak RSS +MB (× ref) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in get(results, "corpus", "cases") or []:
        got = (
            "/".join(str(s) for s in dict.fromkeys(row["statuses"]))
            if row["status"]
            else ", ".join(row["errors"])
        )
        mark = "" if row["as_expected"] else " ✗"
        name = f"{row['name']} (probe)" if row.get("cost_probe") else row["name"]
        lines.append(
            f"| `{name}` | {row['upload_bytes']:,} | {row['expected_status']} | {got}{mark} | "
            f"{_seconds(None if row['seconds'] is None else row['seconds'] * 1000)} | "
            f"{_fmt(row['cpu_s'], 3)} ({_fmt(row.get('cpu_ratio'), 1)}) | "
            f"{_fmt(row['rss_increase_mb'], 1)} ({_fmt(row.get('memory_ratio'), 1)}) |"
        )
    return lines


def _by_request(row: Row) -> str:
    return "; ".join(f"`{label}` {_outcomes(counts)}" for label, counts in row["hostile_by_request"].items())


def _normal_cells(row: Row, ratio: Any, failed: int) -> str:
    """normal p50 / p99 | p99 × idle | server CPU s | peak RSS +MB, of one interference window."""
    latency = row["normal_latency_ms"]
    missed = ratio is None or ratio > TARGET_INTERFERENCE_P99_RATIO or failed
    return (
        f"{_seconds(latency['p50_ms'])} / {_seconds(latency['p99_ms'])}"
        + (f", {failed} failed" if failed else "")
        + f" | {_fmt(ratio, 2)}{' ✗' if missed else ''} | {_fmt(row['server_cpu_s'], 2)} in "
        f"{_fmt(row['seconds'], 1)} s | {_fmt(row['rss_growth_mb'], 1)}"
    )


def _interference_table(results: Row) -> list[str]:
    """The interference phase's table and a blank line; nothing when the run did not include it."""
    if "interference" not in results:
        return []
    interference = results["interference"]
    if "idle" not in interference:
        return [f"Beside one hostile client: failed ({interference.get('error')}).", ""]
    plan = interference.get("plan") or {}
    lines = [
        "Beside one hostile client: a normal client sends the 2-MP JPEG one request at a time "
        f"({plan.get('normal_requests')} requests and at least {plan.get('min_window_s')} s per window), "
        "first to the idle server, then beside one hostile client of each class, which sends its next "
        "request as soon as the last is answered, from a process of its own. Server CPU and peak RSS "
        "growth cover the whole window, the normal client's share included (the idle row is that share "
        f"alone). Target: p99 ≤ {TARGET_INTERFERENCE_P99_RATIO:g} × idle.",
        "",
        "| Hostile client | its requests: statuses | normal p50 / p99 | p99 × idle | server CPU s "
        "| peak RSS +MB |",
        "|---|---|---|---|---|---|",
        f"| none (idle) | – | {_normal_cells(interference['idle'], 1.0, 0)} |",
    ]
    for row in interference.get("classes") or []:
        lines.append(
            f"| `{row['name']}`: {row['description']} | {row['hostile_requests']:,}: {_by_request(row)} "
            f"| {_normal_cells(row, row.get('p99_ratio'), normal_failures(row))} |"
        )
    if interference.get("image_cases_missing"):
        lines += ["", f"Image cases not in the corpus yet: {', '.join(interference['image_cases_missing'])}."]
    return [*lines, ""]


def render_markdown(after: Row, before: Row | None = None) -> str:
    """The docs block: key figures (before → after when given), targets, interference, per-file table."""
    lines = [
        f"Measured with `{after.get('command')}` against a real `python -m service` on loopback "
        f"(default settings, model from `models/`): after = {_describe_run(after)}"
        + (f"; before = {_describe_run(before)}" if before else "")
        + ".",
        "",
        *_figures_table(after, before),
        "",
        "| Target | threshold | measured | met |",
        "|---|---|---|---|",
        *(
            f"| {t['target']} | {_number(t['threshold'])} | {_number(t['measured'])} | {_met(t['met'])} |"
            for t in after.get("targets", [])
        ),
        "",
        *_interference_table(after),
        "<details><summary>Every hostile file</summary>",
        "",
        *_cases_table(after),
        "",
        "</details>",
        "",
        f"Full results: `{after.get('output')}`.",
    ]
    return "\n".join(lines) + "\n"
