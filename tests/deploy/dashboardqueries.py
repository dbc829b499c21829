"""The PromQL of the Grafana dashboard: every query, the metric names and label names it uses.

A deliberately small reader for the PromQL this dashboard writes (selectors, `by (...)`, functions,
arithmetic), not a general parser; `promtool check rules` separately proves each query is valid PromQL.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Grafana's macros and this dashboard's variables, replaced by values that make plain PromQL.
# A variable becomes `.*`, every value (what "All" sends for $model and $version, their allValue).
GRAFANA_SUBSTITUTIONS = {
    "$__rate_interval": "20s",
    "$__range": "1h",
    "$endpoint": ".*",
    "$model": ".*",
    "$version": ".*",
}

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")
_MATCHERS = re.compile(r"\{([^}]*)\}")
_MATCHER_LABEL = re.compile(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)")
_IDENTIFIER = re.compile(r"(?<![\w.])([a-zA-Z_:][\w:]*)(\s*\()?")
# Grafana's `label_values(metric{matchers}, label)` variable query (not PromQL).
_LABEL_VALUES = re.compile(r"^label_values\(\s*([a-zA-Z_:][\w:]*)\s*(\{[^}]*\})?\s*,\s*(\w+)\s*\)$")


@dataclass(frozen=True)
class Query:
    """One query of the dashboard and where it sits."""

    where: str
    expr: str

    def promql(self) -> str:
        """The query with Grafana's macros and variables replaced, as Prometheus would receive it.

        A `label_values(selector, label)` variable query becomes `count by (label) (selector)`, the PromQL
        with the same selector, so its syntax can be checked like the rest.
        """
        text = self.expr
        label_values = _LABEL_VALUES.match(text.strip())
        if label_values:
            metric, matchers, label = label_values.groups()
            text = f"count by ({label}) ({metric}{matchers or ''})"
        for macro, value in GRAFANA_SUBSTITUTIONS.items():
            text = text.replace(macro, value)
        return text


def dashboard_queries(path: Path) -> list[Query]:
    """Every panel target expression and every template-variable query, with a human location."""
    dashboard = json.loads(path.read_text(encoding="utf-8"))
    queries = list(_panel_queries(dashboard.get("panels", [])))
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        text = query.get("query") if isinstance(query, dict) else query
        if variable.get("type") == "query" and text:
            queries.append(Query(f"variable ${variable['name']}", text))
    return queries


def _panel_queries(panels: list[dict[str, Any]]) -> Iterator[Query]:
    for panel in panels:
        for target in panel.get("targets", []):
            if target.get("expr"):
                yield Query(f"panel {panel.get('title')!r} target {target.get('refId')}", target["expr"])
        yield from _panel_queries(panel.get("panels", []))


def _without_strings(expr: str) -> str:
    return _STRING.sub('""', expr)


def metric_names(expr: str) -> set[str]:
    """Series names the expression selects (for `label_values(m, l)`, the metric m)."""
    label_values = _LABEL_VALUES.match(expr.strip())
    if label_values:
        return {label_values.group(1)}
    text = _GROUPING.sub(" ", _MATCHERS.sub(" ", _without_strings(expr)))
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range durations such as [5m]
    names = set()
    for match in _IDENTIFIER.finditer(text):
        name, is_call = match.group(1), match.group(2)
        if not is_call and name not in _KEYWORDS:
            names.add(name)
    return names


def label_names(expr: str) -> set[str]:
    """Labels the expression groups by or matches on (for `label_values(m, l)`, the label l)."""
    label_values = _LABEL_VALUES.match(expr.strip())
    if label_values:
        metric, matchers, label = label_values.groups()
        return {label} | label_names(f"{metric}{matchers or ''}")
    text = _without_strings(expr)
    labels: set[str] = set()
    for grouping in _GROUPING.findall(text):
        labels.update(part.strip() for part in grouping.split(",") if part.strip())
    for matchers in _MATCHERS.findall(text):
        labels.update(_MATCHER_LABEL.findall(matchers))
    return labels


def selectors(expr: str) -> list[tuple[str, str]]:
    """Every series selector as (metric, matchers inside the braces, "" when none), in order of appearance."""
    found = []
    for name in metric_names(expr):
        pattern = re.compile(rf"(?<![\w:]){re.escape(name)}(?![\w:])\s*(?:\{{([^}}]*)\}})?")
        found += [(match.start(), name, match.group(1) or "") for match in pattern.finditer(expr)]
    return [(name, matchers) for _, name, matchers in sorted(found)]
