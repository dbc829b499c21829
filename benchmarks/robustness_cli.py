"""The `--robustness` half of `python -m benchmarks`: arguments -> config, run, files, summary."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from benchmarks.report import update_readme, write_json
from benchmarks.robustness import PHASES, RobustnessConfig, run_robustness
from benchmarks.robustness_report import DOC_END, DOC_START, key_figures, render_markdown

log = logging.getLogger("benchmarks")

DEFAULT_OUTPUT = Path("benchmarks/results/robustness.json")
DEFAULT_BEFORE = Path("benchmarks/results/robustness-before.json")
"""The service as it was before issue 8 ("Safe to expose"), measured by this tool: the docs' baseline."""
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


def run_from_arguments(
    args: argparse.Namespace, command: str, repo_root: Path, service_env: dict[str, str]
) -> int:
    config = config_from_arguments(args, command, repo_root, service_env)
    compare_with: Path | None = args.compare_with
    if compare_with is None and (repo_root / DEFAULT_BEFORE).is_file():
        compare_with = repo_root / DEFAULT_BEFORE
    before = json.loads(compare_with.read_text()) if compare_with else None
    output: Path = args.output or DEFAULT_OUTPUT
    results = run_robustness(config, output)
    write_json(results, output)
    markdown = render_markdown(results, before)
    output.with_suffix(".md").write_text(markdown)
    log.info("wrote %s and %s", output, output.with_suffix(".md"))
    complete = set(config.phases) == set(PHASES) and config.service_dir is None
    doc = repo_root / ROBUSTNESS_DOC
    if args.update_readme == "yes" or (args.update_readme == "auto" and complete):
        if update_readme(doc, markdown, start=DOC_START, end=DOC_END):
            log.info("regenerated the robustness block in %s", doc)
    else:
        log.info("%s not touched (partial run or another checkout); --update-readme yes writes it", doc)
    print_summary(results)
    return 0
