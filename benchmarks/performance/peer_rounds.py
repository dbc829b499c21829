"""The headline comparisons, interleaved: the service at its defaults, the service with one
single-threaded batch per core set explicitly, and the BentoML peer, each started fresh in turn and
measured at 1 and 32 clients, round after round, the order rotated by one each round.

A small VM's speed drifts by 15-20 % within minutes. Measured one after the other, minutes apart, a
ratio between two servers would say as much about the drift as about the servers; the BentoML
peer's lone-request figure moves with it more than the service's. Within a round the two sides of
every ratio are measured a minute or two apart, and the spread over the rounds shows what is left.
The order rotates (service, per-core, peer; then per-core, peer, service; ...) so that over as many
rounds as contestants each one starts first, second and last once: reversing it instead put the
service first in two rounds of three, which a first-place penalty would charge to it alone.
The ratios of record (`ratios`) are the medians over the rounds, with their range.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from benchmarks.common.corpus import Photo
from benchmarks.common.loadgen import Window
from benchmarks.common.processes import ServerProcess, ServerStartError
from benchmarks.performance.server_bench import ServerBench
from benchmarks.performance.targets import HEADLINE_CONCURRENCY, find_level

log = logging.getLogger(__name__)

CONTESTANTS = ("service", "instances", "bento")
"""The service at its defaults, the explicit batch-per-core configuration, and the peer."""
LEVELS = (1, HEADLINE_CONCURRENCY)
"""The lone request and the headline load."""
OTHERS = ("bento", "instances")
"""Whom the service is compared with: `ratios` keys are `service/<other>@c<level>`."""
FIGURES = ("img_per_s", "p50_ms", "p99_ms")


async def _levels(
    name: str, server: ServerProcess, photos: Sequence[Photo], window: Window
) -> list[dict[str, Any]]:
    with server:
        bench = ServerBench(name, server, photos)
        await bench.warm_up()  # every contestant gets the peer's warm-up, the service included
        await bench.concurrency_levels(LEVELS, window)
        return bench.rows


def measure(
    names: Sequence[str],
    start: Callable[[str, int], ServerProcess],
    photos: Sequence[Photo],
    *,
    rounds: int,
    window: Window,
    not_measured: dict[str, str],
) -> list[dict[str, Any]]:
    """`rounds` rounds of the contestants `names` (in the order given, rotated by one each round),
    each started fresh by `start(name, round)`; each row of a level carries its `round`. A contestant that
    does not start is left out of that round, and `not_measured` says why."""
    rows: list[dict[str, Any]] = []
    for number in range(rounds):
        shift = number % len(names) if names else 0
        for name in [*names[shift:], *names[:shift]]:
            try:
                measured = asyncio.run(_levels(name, start(name, number), photos, window))
            except ServerStartError as error:
                not_measured[f"peer rounds: {name}"] = str(error)[-300:]
                log.error("peer rounds: %s did not start: %s", name, error)
                continue
            rows.extend({**row, "round": number} for row in measured)
    return rows


def ratios(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The service over each of `OTHERS` at each level, per round, then the median over the rounds
    (`img_per_s`, `p50_ms`, `p99_ms`) with the range (`<figure>_range`) and the `rounds` counted."""
    by_round: dict[int, list[Mapping[str, Any]]] = {}
    for row in rows:
        by_round.setdefault(int(row["round"]), []).append(row)
    result: dict[str, dict[str, Any]] = {}
    for other in OTHERS:
        for level in LEVELS:
            per_round = []
            for round_rows in by_round.values():
                ours = find_level(round_rows, "service", "concurrency", level)
                theirs = find_level(round_rows, other, "concurrency", level)
                if ours and theirs and all(ours.get(k) and theirs.get(k) for k in FIGURES):
                    per_round.append({k: float(ours[k]) / float(theirs[k]) for k in FIGURES})
            if not per_round:
                continue
            entry: dict[str, Any] = {"rounds": len(per_round)}
            for figure in FIGURES:
                values = [r[figure] for r in per_round]
                entry[figure] = round(statistics.median(values), 3)
                entry[f"{figure}_range"] = [round(min(values), 3), round(max(values), 3)]
            result[f"service/{other}@c{level}"] = entry
    return result
