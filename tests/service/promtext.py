"""Reading samples from a /metrics text in tests (light: spawned worker processes import it too)."""

from __future__ import annotations

import re

_LABEL = re.compile(r'(\w+)="([^"]*)"')


def metric(text: str, selector: str) -> float:
    """The sum of every sample of `selector`'s metric whose labels include the ones `selector` names.

    `metric(text, 'convserve_queue_depth')` sums over every model version;
    `metric(text, 'convserve_requests_total{status="200"}')` over every endpoint and model.
    """
    name, _, wanted_text = selector.partition("{")
    wanted = set(_LABEL.findall(wanted_text))
    total, found = 0.0, False
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        sample, _, value = line.rpartition(" ")
        sample_name, _, labels = sample.partition("{")
        if sample_name == name and wanted <= set(_LABEL.findall(labels)):
            total, found = total + float(value), True
    if not found:
        raise AssertionError(f"{selector} not in /metrics")
    return total
