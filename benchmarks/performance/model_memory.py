"""What each extra model costs in memory: the service's RSS, ready, serving 1, 8 and 32 models.

The models are copies of the benchmark's model under other names (what a team with one fine-tuned
classifier per customer has), each a separate model with its own session, batcher and warmup, with
the default settings. The service is started afresh for each count and its RSS read once it is ready
and idle; the figure of record is the cost of one extra model, (RSS at the most models - RSS at one) /
(the difference in count).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks.common.processes import rss_mb
from benchmarks.performance.subjects import RunConfig, ServedModel, service_process

log = logging.getLogger(__name__)

SETTLE_S = 1.0
"""Pause after readiness before reading RSS: buffers of the warmup are released by then."""


def copy_models(model: ServedModel, count: int, root: Path) -> list[str]:
    """`count` copies of `model` as models `m00`, `m01`, ... (version 1 each) in the repository `root`."""
    names = [f"m{index:02d}" for index in range(count)]
    for name in names:
        version = root / name / "1"
        version.mkdir(parents=True)
        shutil.copyfile(model.path, version / model.path.name)
    return names


def measure(config: RunConfig, model: ServedModel, counts: Sequence[int], log_dir: Path) -> dict[str, Any]:
    """The service's ready RSS for each count of models, and the cost of one extra model."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="convserve-bench-models-") as scratch:
        root = Path(scratch)
        names = copy_models(model, max(counts), root)
        copies = replace(
            model, repository=root, name=names[0], version=1, path=root / names[0] / "1" / model.path.name
        )
        for count in sorted(set(counts)):
            models = {"CONVSERVE_MODELS": ",".join(names[:count])}
            served = replace(config, service_env={**config.service_env, **models})
            started = time.perf_counter()
            with service_process(served, copies, log_dir, "memory") as server:
                ready_s = time.perf_counter() - started
                time.sleep(SETTLE_S)
                rss = round(rss_mb(server.pid), 1)
                rows.append({"models": count, "rss_mb": rss, "ready_s": round(ready_s, 1)})
            log.info("memory: %d models, RSS %.0f MB, ready in %.1f s", count, rows[-1]["rss_mb"], ready_s)
    return {"levels": rows, "mb_per_extra_model": mb_per_extra_model(rows)}


def mb_per_extra_model(rows: Sequence[Mapping[str, Any]]) -> float | None:
    """(RSS at the most models - RSS at the fewest) / the difference in count; None with one count."""
    if len(rows) < 2:
        return None
    fewest, most = min(rows, key=lambda r: r["models"]), max(rows, key=lambda r: r["models"])
    return round((most["rss_mb"] - fewest["rss_mb"]) / (most["models"] - fewest["models"]), 1)


def memory_table(memory: Mapping[str, Any] | None) -> list[str]:
    """Markdown: RSS per count of models, and the cost of one more."""
    if not memory or not memory.get("levels"):
        return []
    lines = ["| Models served | RSS ready, MB | start to ready, s |", "|---|---|---|"]
    lines += [f"| {row['models']} | {row['rss_mb']:.0f} | {row['ready_s']:.1f} |" for row in memory["levels"]]
    if memory.get("mb_per_extra_model") is not None:
        lines += ["", f"Each extra model: {memory['mb_per_extra_model']:.1f} MB."]
    return lines
