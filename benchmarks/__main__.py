"""`python -m benchmarks [--quick] [--output PATH]`: measure the service against its ceiling and baselines.

Also quantizes a copy of the model to INT8 and serves that, and profiles the service with py-spy
(`--servers` without `int8`, `--no-profile` to skip them).

Writes the results JSON (`--output`), a Markdown table and a PNG plot next to it, and — for full runs —
regenerates the generated block of docs/performance.md. `--report-only` rewrites the Markdown and the
docs block from an existing results JSON without measuring.

`python -m benchmarks --robustness` (`make soak`) instead sends the service hostile files, twice its
capacity, slow clients, SIGTERM under load and one hostile client beside a normal one, and writes
benchmarks/results/robustness.{json,md} and the block of docs/robustness.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from benchmarks.common.docblock import MissingMarkersError
from benchmarks.common.results import read_json, write_json
from benchmarks.performance.plan import full_plan, quick_plan
from benchmarks.performance.plot import write_plot
from benchmarks.performance.report import PERFORMANCE_DOC, plot_link, render_markdown, write_docs_block
from benchmarks.performance.runner import run, shell_command
from benchmarks.performance.subjects import RunConfig
from benchmarks.robustness.cli import report_from_arguments, run_from_arguments
from benchmarks.robustness.phases import PHASES

log = logging.getLogger("benchmarks")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = Path("benchmarks/results/latest.json")
ALL_SERVERS = (
    "ceiling",
    "service",
    "unbatched",
    "instances",
    "protocols",
    "memory",
    "budget",
    "naive",
    "bento",
    "int8",
)


def _parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.startswith("CONVSERVE_"):
            raise SystemExit(f"--set expects CONVSERVE_NAME=VALUE, got {pair!r}")
        env[key] = value
    return env


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    run_group = parser.add_argument_group("run")
    run_group.add_argument(
        "--quick",
        action="store_true",
        help="short windows and RSS after 1k/2.5k requests instead of 1k/20k (under 7 min on 2 cores; "
        "the full run takes under 25)",
    )
    run_group.add_argument(
        "--servers",
        default=",".join(ALL_SERVERS),
        help=f"comma-separated subset of {','.join(ALL_SERVERS)} to measure; instances = the service "
        "with one single-threaded batch per core; protocols = the service answering /predict, V2 REST "
        "and V2 gRPC (JPEG bytes and FP32 tensors) at concurrency 1 and 32; memory = its RSS serving 1, "
        "8 and 32 copies of the model; budget = 50 copies under CONVSERVE_MEMORY_BUDGET_MB (2048 and "
        "384 MiB) with a Zipf mix of 32 clients; bento = a BentoML service with adaptive batching "
        "serving the same ONNX file (its venv .venv/peers/bentoml is built first if missing: `make "
        "peers`); int8 = the service serving "
        "an INT8 variant (quantized from a temporary copy of the model) and its in-process rows "
        "(default: all)",
    )
    run_group.add_argument(
        "--profile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="sample the service with py-spy at concurrency 32 (an extra level, not in the table) and "
        "report CPU ms per image by activity; without py-spy the run says so and skips it "
        "(default: on; --no-profile skips it)",
    )
    _add_robustness_arguments(parser)
    model_group = parser.add_argument_group("model")
    model_group.add_argument(
        "--model-repository", type=Path, default=Path("models"), help="model repository (default: models)"
    )
    model_group.add_argument("--model-name", help="model to serve (default: the only one in the repository)")
    model_group.add_argument("--model-version", type=int, help="version to serve (default: the latest)")
    model_group.add_argument(
        "--int8-model",
        type=Path,
        metavar="DIR",
        help="an existing INT8 version directory (e.g. models/<name>/2, from `python -m training "
        "quantize`) to serve as the INT8 variant (default: quantize a temporary copy of the model)",
    )
    model_group.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="CONVSERVE_NAME=VALUE",
        help="extra service setting for both service runs and the ceiling's session (repeatable)",
    )
    output_group = parser.add_argument_group("output")
    output_group.add_argument(
        "--output",
        type=Path,
        help="results JSON; the .md table and .png plot are written next to it "
        "(default: benchmarks/results/latest.json, or robustness.json with --robustness)",
    )
    output_group.add_argument(
        "--doc",
        "--readme",
        type=Path,
        help="document whose generated block to regenerate (default: docs/performance.md, or "
        "docs/robustness.md with --robustness)",
    )
    output_group.add_argument(
        "--update-docs",
        "--update-readme",
        choices=("auto", "yes", "no"),
        default="auto",
        help="regenerate the document's generated block: auto = for full runs only, so a quick run "
        "never replaces the figures of record; with --robustness, for runs of every phase against this "
        "checkout (default: auto)",
    )
    output_group.add_argument(
        "--report-only",
        action="store_true",
        help="measure nothing: rewrite the Markdown next to the results JSON (--output) and the "
        "document's generated block from that JSON (with --robustness: the robustness JSON)",
    )
    return parser


def _add_robustness_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("robustness: what a hostile client can cost")
    group.add_argument(
        "--robustness",
        action="store_true",
        help="measure hostile files, 2x overload, slow clients, SIGTERM under load and hostile-client "
        "interference instead (~5 min)",
    )
    group.add_argument(
        "--phases",
        default=",".join(PHASES),
        help=f"comma-separated subset of {','.join(PHASES)} (default: all)",
    )
    group.add_argument(
        "--soak-seconds",
        type=float,
        default=30.0,
        help="open-loop window at 2x capacity, seconds (default: 30)",
    )
    group.add_argument(
        "--overload-rate",
        type=float,
        help="offer this many requests/s instead of 2x the capacity measured just before (to give two "
        "builds the same load on a shared machine)",
    )
    group.add_argument(
        "--slowloris-connections", type=int, default=200, help="slow connections per mode (default: 200)"
    )
    group.add_argument(
        "--slowloris-wait",
        type=float,
        default=30.0,
        help="how long slow connections wait, seconds (default: 30)",
    )
    group.add_argument(
        "--sigterm-clients",
        default="32,256",
        help="client counts for SIGTERM under load, comma-separated (default: 32,256)",
    )
    group.add_argument(
        "--rss-kill-mb",
        type=float,
        default=6144.0,
        help="SIGKILL the server if its RSS passes this while decoding one hostile file, MiB (default: 6144)",
    )
    group.add_argument(
        "--service-dir",
        type=Path,
        help="run `python -m service` from this checkout (e.g. a git worktree of an older commit) to "
        "measure it; the model repository path is made absolute (default: this checkout)",
    )
    group.add_argument(
        "--compare-with",
        type=Path,
        help="an earlier robustness JSON whose figures go in the Markdown's `before` column "
        "(default: benchmarks/results/robustness-before.json, the service before its hardening, if present)",
    )


def _write_reports(results: dict[str, Any], output: Path, args: argparse.Namespace) -> None:
    """The Markdown next to the JSON and, for a full run (or `--update-docs yes`), the docs block."""
    markdown_path = output.with_suffix(".md")
    markdown_path.write_text(render_markdown(results, plot_link(output.with_suffix(".png"), markdown_path)))
    log.info("wrote %s", markdown_path)
    doc: Path = args.doc or REPO_ROOT / PERFORMANCE_DOC
    if args.update_docs == "yes" or (args.update_docs == "auto" and results.get("mode") == "full"):
        try:
            changed = write_docs_block(results, output, doc)
        except MissingMarkersError as error:
            raise SystemExit(f"the results are written, but not the docs block: {error}") from None
        log.info("%s the performance block in %s", "regenerated" if changed else "no change to", doc)
    else:
        log.info("%s not touched (quick run); pass --update-docs yes to write it anyway", doc)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv if argv is None else argv
    args = build_parser().parse_args(argv[1:])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.robustness:
        if args.report_only:
            return report_from_arguments(args, REPO_ROOT)
        return run_from_arguments(args, shell_command(argv), REPO_ROOT, _parse_env(args.set))
    output: Path = args.output or DEFAULT_OUTPUT
    if args.report_only:
        _write_reports(read_json(output), output, args)
        return 0
    servers = tuple(name.strip() for name in args.servers.split(",") if name.strip())
    unknown = sorted(set(servers) - set(ALL_SERVERS))
    if unknown:
        raise SystemExit(f"--servers: unknown {unknown}; choose from {list(ALL_SERVERS)}")
    if args.int8_model is not None and "int8" not in servers:
        raise SystemExit("--int8-model serves an INT8 variant: keep int8 in --servers")
    config = RunConfig(
        repo_root=REPO_ROOT,
        model_repository=args.model_repository,
        model_name=args.model_name,
        model_version=args.model_version,
        servers=servers,
        service_env=_parse_env(args.set),
        command=shell_command(argv),
        profile=args.profile,
        int8_model=args.int8_model,
    )
    plan = quick_plan() if args.quick else full_plan()
    results = run(config, plan, output)
    plot_path = output.with_suffix(".png")
    write_plot(results, plot_path)
    results["plot"] = str(plot_path)
    write_json(results, output)
    log.info("wrote %s and %s", output, plot_path)
    if results.get("ceiling_valid") is False:
        log.error("INVALID run: %s", results["ceiling_invalid_reason"])
    _write_reports(results, output, args)
    for target in results["targets"]:
        met = "INVALID" if target.get("invalid") else target["met"]
        log.info("target %-55s measured %-8s met %s", target["target"], target["measured"], met)
    return 0


if __name__ == "__main__":
    sys.exit(main())
