"""Latency summaries: percentiles in milliseconds from raw durations in seconds."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PERCENTILES = (50, 95, 99)


def latency_summary_ms(durations_s: Sequence[float]) -> dict[str, float | None]:
    """p50/p95/p99/mean/max in ms; None everywhere when nothing completed (never a fake zero)."""
    keys = [f"p{p}_ms" for p in PERCENTILES] + ["mean_ms", "max_ms"]
    if not durations_s:
        return dict.fromkeys(keys)
    values = np.asarray(durations_s, dtype=np.float64) * 1000.0
    # "linear" interpolation matches numpy's default and most load tools (wrk, hey).
    result = {f"p{p}_ms": float(np.percentile(values, p)) for p in PERCENTILES}
    result["mean_ms"] = float(values.mean())
    result["max_ms"] = float(values.max())
    return {key: round(value, 2) for key, value in result.items()}
