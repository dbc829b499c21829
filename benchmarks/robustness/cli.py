"""The `--robustness` half of `python -m benchmarks`: arguments -> config, run, files, summary."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from benchmarks.common.docblock import MissingMarkersError, replace_block
from benchmarks.common.results import read_json, write_json
from benchmarks.robustness.phases import PHASES, RobustnessConfig, run_robustness
from benchmarks.robustness.safety_report import DOC_END, DOC_START, key_figures, render_markdown

log = logging.getLogger("benchmarks")

DEFAULT_OUTPUT = Path("benchmarks/results/robustness.json")
DEFAULT_BEFORE = Path("benchmarks/results/robustness-before.json")
"""The service as it was before its hardening against hostile clients, measured by this tool: the
docs' baseline."""
ROBUSTNESS_DOC = Path("docs/robustness.md")
"""Where a complete run regenerates the block between `DOC_START` and `DOC_END` (under the repo root)."""


def config_from_arguments(
    args: argparse.Namespace, command: str, repo_root: Path, service_env: dict[str, str]
) -> RobustnessConfig:
    phases = tuple(name.strip() for name in args.phases.split(",") if name.strip())
    unknown = sorted(set(phases) - set(PHASES))
    if unknown or not phases:
        raise SystemExit(f"--phases: unknown or empty {unknown or phases}; choose from {list(PHASES)}")
    try:
        clients = tuple(int(part) for part in args.sigterm_clients.split(",") if part.strip())
    except ValueError:
        raise SystemExit(
            f"--sigterm-clients expects integers like 32,256, got {args.sigterm_clients!r}"
        ) from None
    if args.soak_seconds <= 0 or args.slowloris_connections < 1 or args.slowloris_wait <= 0:
        raise SystemExit("--soak-seconds and --slowloris-wait must be > 0, --slowloris-connections >= 1")
    if args.service_dir is not None and not (args.service_dir / "service" / "__main__.py").is_file():
        raise SystemExit(f"--service-dir {args.service_dir} holds no service/__main__.py; pass a checkout")
    return RobustnessConfig(
        repo_root=repo_root,
        model_repository=args.model_repository,
        model_name=args.model_name,
        model_version=args.model_version,
        service_dir=args.service_dir,
        service_env=service_env,
        phases=phases,
        soak_seconds=args.soak_seconds,
        overload_rate=args.overload_rate,
        slowloris_connections=args.slowloris_connections,
        slowloris_wait_s=args.slowloris_wait,
        sigterm_clients=clients,
        rss_kill_mb=args.rss_kill_mb,
        command=command,
    )


def print_summary(results: dict[str, Any], stream: Any = sys.stdout) -> None:
    """The key figures and targets as plain text, for the person watching the terminal."""
    print("\nRobustness figures:", file=stream)
    for label, value in key_figures(results):
        print(f"  {label:<52} {value}", file=stream)
    print("\nTargets:", file=stream)
    for target in results.get("targets", []):
        met = {True: "met", False: "NOT MET", None: "not measured"}[target["met"]]
        print(f"  {target['target']:<58} {target['measured']!s:<28} {met}", file=stream)


def _complete(results: dict[str, Any]) -> bool:
    """Every phase, against this checkout: the only kind of run whose figures go into the docs."""
    config = results.get("config") or {}
    return set(config.get("phases") or ()) == set(PHASES) and config.get("service_dir") is None


def _before(args: argparse.Namespace, repo_root: Path) -> dict[str, Any] | None:
    compare_with: Path | None = args.compare_with
    if compare_with is None and (repo_root / DEFAULT_BEFORE).is_file():
        compare_with = repo_root / DEFAULT_BEFORE
    return read_json(compare_with) if compare_with else None


def write_reports(results: dict[str, Any], output: Path, args: argparse.Namespace, repo_root: Path) -> None:
    """The Markdown next to the JSON and, for a complete run (or `--update-docs yes`), the docs block."""
    markdown = render_markdown(results, _before(args, repo_root))
    output.with_suffix(".md").write_text(markdown)
    log.info("wrote %s", output.with_suffix(".md"))
    doc: Path = args.doc or repo_root / ROBUSTNESS_DOC
    if args.update_docs == "yes" or (args.update_docs == "auto" and _complete(results)):
        try:
            changed = replace_block(doc, markdown, DOC_START, DOC_END)
        except MissingMarkersError as error:
            raise SystemExit(f"the results are written, but not the docs block: {error}") from None
        log.info("%s the robustness block in %s", "regenerated" if changed else "no change to", doc)
    else:
        log.info("%s not touched (partial run or another checkout); --update-docs yes writes it", doc)


def run_from_arguments(
    args: argparse.Namespace, command: str, repo_root: Path, service_env: dict[str, str]
) -> int:
    config = config_from_arguments(args, command, repo_root, service_env)
    output: Path = args.output or DEFAULT_OUTPUT
    _before(args, repo_root)  # a bad --compare-with fails now, not after a five-minute run
    results = run_robustness(config, output)
    write_json(results, output)
    log.info("wrote %s", output)
    write_reports(results, output, args, repo_root)
    print_summary(results)
    return 0


def report_from_arguments(args: argparse.Namespace, repo_root: Path) -> int:
    """`--robustness --report-only`: the Markdown and the docs block from the results JSON alone."""
    output: Path = args.output or DEFAULT_OUTPUT
    write_reports(read_json(output), output, args, repo_root)
    return 0
