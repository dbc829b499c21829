"""The robustness targets ("safe to expose"), each checked from a robustness results JSON alone.

Where a target leaves a number open ("RSS bounded") the one chosen here says so. A target whose
phase did not run is simply absent.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

TARGET_REFUSAL_P99_MS = 50.0
TARGET_ACCEPTED_P99_S = 30.0
"""The service's default CONVSERVE_REQUEST_TIMEOUT_S."""
TARGET_COST_RATIO = 2.0
COST_CHECK_MAX_BYTES = 1_000_000
TARGET_RSS_GROWTH_FACTOR = 1.5
"""Our reading of "RSS bounded": the peak under 2× load stays within 1.5 × the RSS before it."""
TARGET_INTERFERENCE_P99_RATIO = 2.0
"""A normal photo's p99 beside one hostile client, as a multiple of its p99 on the idle server."""

Row = Mapping[str, Any]


def get(results: Row | None, *path: str) -> Any:
    value: Any = results
    for key in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


def small_file_rows(results: Row) -> list[Row]:
    """Per-case rows of single files under 1 MB (the cost rule), cost probes included."""
    return [
        row
        for row in get(results, "corpus", "cases") or []
        if row["upload_bytes"] < COST_CHECK_MAX_BYTES and row["files"] == 1
    ]


def worst(rows: list[Row], key: str) -> Row | None:
    measured = [row for row in rows if row.get(key) is not None]
    return max(measured, key=lambda row: row[key]) if measured else None


def _target(name: str, threshold: Any, measured: Any, met: bool | None) -> dict[str, Any]:
    return {"target": name, "threshold": threshold, "measured": measured, "met": met}


def _corpus_targets(results: Row) -> list[dict[str, Any]]:
    cases = [row for row in get(results, "corpus", "cases") or [] if not row.get("cost_probe")]
    if not cases:
        return []
    matching = sum(row["as_expected"] for row in cases)
    targets = [
        _target("hostile files get their expected status", len(cases), matching, matching == len(cases))
    ]
    small = small_file_rows(results)
    for key, label in (("cpu_ratio", "CPU time"), ("memory_ratio", "peak RSS increase")):
        row = worst(small, key)
        measured = None if row is None else f"{row[key]} ({row['name']})"
        met = None if row is None else row[key] <= TARGET_COST_RATIO
        targets.append(
            _target(f"files < 1 MB: {label} ≤ {TARGET_COST_RATIO:g} × 2-MP JPEG", 2.0, measured, met)
        )
    return targets


def _overload_targets(results: Row) -> list[dict[str, Any]]:
    overload = get(results, "overload")
    if not overload or "requests" not in overload:
        return []
    refused_p99 = get(overload, "refused_latency_ms", "p99_ms")
    answered_p99 = get(overload, "answered_latency_ms", "p99_ms")
    before, peak = overload.get("rss_before_mb"), overload.get("rss_max_mb")
    growth = round(peak / before, 2) if before and peak else None
    return [
        _target(
            f"503 p99 at 2× load ≤ {TARGET_REFUSAL_P99_MS:g} ms (in ms)",
            TARGET_REFUSAL_P99_MS,
            refused_p99,
            None if refused_p99 is None else refused_p99 <= TARGET_REFUSAL_P99_MS,
        ),
        _target(
            f"accepted p99 at 2× load ≤ {TARGET_ACCEPTED_P99_S:g} s (in s)",
            TARGET_ACCEPTED_P99_S,
            None if answered_p99 is None else round(answered_p99 / 1000, 2),
            None if answered_p99 is None else answered_p99 <= TARGET_ACCEPTED_P99_S * 1000,
        ),
        _target("no lost requests at 2× load", 0, overload["lost_total"], overload["lost_total"] == 0),
        _target(
            f"peak RSS at 2× load ≤ {TARGET_RSS_GROWTH_FACTOR:g} × RSS before",
            TARGET_RSS_GROWTH_FACTOR,
            growth,
            None if growth is None else growth <= TARGET_RSS_GROWTH_FACTOR,
        ),
    ]


def _slow_client_targets(results: Row) -> list[dict[str, Any]]:
    targets = []
    for mode, run in (get(results, "slowloris") or {}).items():
        if not isinstance(run, Mapping) or "opened" not in run:
            continue
        targets.append(
            _target(
                f"slow clients ({mode}): all closed within {run['wait_s']:g} s",
                run["opened"],
                run["closed_by_server"],
                run["closed_by_server"] == run["opened"],
            )
        )
        ok, sent = run["normal_requests_ok"], run["normal_requests_meanwhile"]
        targets.append(
            _target(f"slow clients ({mode}): normal requests still served", sent, ok, ok == sent > 0)
        )
    return targets


def _sigterm_targets(results: Row) -> list[dict[str, Any]]:
    targets = []
    for clients, run in (get(results, "sigterm") or {}).items():
        if not isinstance(run, Mapping) or "exit_status" not in run:
            continue
        measured = f"exit {run['exit_status']}, {run['lost']} lost"
        met = run["exit_status"] == 0 and run["lost"] == 0
        targets.append(
            _target(f"SIGTERM under {clients} clients: exit 0, nothing lost", "exit 0, 0", measured, met)
        )
    return targets


def normal_failures(row: Row) -> int:
    """Normal requests of an interference window that did not get a 200."""
    return int(row["normal_requests"]) - int(row["normal_statuses"].get("200", 0))


def _interference_targets(results: Row) -> list[dict[str, Any]]:
    targets = []
    for row in get(results, "interference", "classes") or []:
        ratio, failed = row.get("p99_ratio"), normal_failures(row)
        # A normal request that failed has no latency: the ratio alone would hide it.
        measured = (
            ratio if not failed else f"{ratio} ({failed} of {row['normal_requests']} normal requests failed)"
        )
        met = False if failed else None if ratio is None else ratio <= TARGET_INTERFERENCE_P99_RATIO
        targets.append(
            _target(
                f"normal p99 beside one hostile client ({row['name']}) "
                f"≤ {TARGET_INTERFERENCE_P99_RATIO:g} × idle",
                TARGET_INTERFERENCE_P99_RATIO,
                measured,
                met,
            )
        )
    return targets


def check_targets(results: Row) -> list[dict[str, Any]]:
    """Each target that this run measured: threshold, measured value, met."""
    return [
        *_corpus_targets(results),
        *_overload_targets(results),
        *_slow_client_targets(results),
        *_sigterm_targets(results),
        *_interference_targets(results),
    ]
