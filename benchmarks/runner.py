"""One benchmark run: ceiling, service, batching off, naive server, in that order, then the reports.

Servers run one at a time so they never compete with each other for the two cores; the load
generator runs in this process throughout, so every server pays the same client overhead. The
in-process ceiling runs with no server alive.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import shlex
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import psutil

from benchmarks.ceiling import measure_ceiling
from benchmarks.corpus import Photo, build_corpus, describe_corpus
from benchmarks.machine import describe_machine
from benchmarks.plan import BenchPlan
from benchmarks.processes import LOOPBACK, ServerProcess, free_port, python_module_command, rss_mb
from benchmarks.profiling import py_spy_path
from benchmarks.server_bench import ServerBench
from benchmarks.targets import HEADLINE_CONCURRENCY, check_targets, cpu_per_image, find_level, headline

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunConfig:
    """Where the model is and what to run; built by the command line."""

    repo_root: Path
    model_repository: Path
    model_name: str | None
    model_version: int | None
    servers: tuple[str, ...]
    service_env: Mapping[str, str] = field(default_factory=dict)
    """Extra `CONVSERVE_*` variables for both service runs (e.g. to try another setting)."""
    command: str = "python -m benchmarks"
    profile: bool = True
    """Also profile the service with py-spy at concurrency 32 (an extra, unrecorded level)."""


@dataclass(frozen=True)
class ServedModel:
    name: str
    version: int
    path: Path
    backbone: str
    input_shape: list[int]


T = TypeVar("T")


def _in_worker_thread(function: Callable[[], T]) -> T:
    """Run `function` in a thread of its own and return its result.

    The service's `load_model` lowers the calling thread's priority (nice 10, for its compute
    threads); called from the main thread it would leave the load generator of every later level
    at that priority.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="in-process") as pool:
        return pool.submit(function).result()


def other_processes_cpu(sample_s: float = 1.0, min_percent: float = 5.0) -> list[dict[str, Any]]:
    """Processes outside this benchmark using CPU right now (what else competed for the cores)."""
    own = {os.getpid(), *(child.pid for child in psutil.Process().children(recursive=True))}
    processes = [p for p in psutil.process_iter(["name", "cmdline"]) if p.pid not in own]
    for process in processes:
        try:
            process.cpu_percent(None)
        except psutil.Error:
            continue
    time.sleep(sample_s)
    busy = []
    for process in processes:
        try:
            percent = process.cpu_percent(None)
        except psutil.Error:
            continue
        if percent >= min_percent:
            command = " ".join(process.info["cmdline"] or [process.info["name"] or "?"])
            busy.append({"pid": process.pid, "cpu_percent": round(percent, 1), "command": command[:120]})
    return sorted(busy, key=lambda entry: -entry["cpu_percent"])[:8]


def _resolve_model(config: RunConfig) -> ServedModel:
    """The one model version the benchmark serves: `--model-name`/`--model-version`, else the only
    model in the repository at its newest complete version (the service serves them all now)."""
    from benchmarks.naive_server import read_metadata
    from service.repository import ModelLocation, scan

    root = config.model_repository
    found = {
        name: versions
        for name, versions in scan(root, [config.model_name] if config.model_name else None).items()
        if versions
    }
    if not found:
        raise SystemExit(f"no model with a complete version in {root}/ (run `make model`)")
    if len(found) > 1:
        raise SystemExit(f"{root}/ holds several models {sorted(found)}; choose one with --model-name")
    name, versions = next(iter(found.items()))
    version = config.model_version or versions[-1]
    if version not in versions:
        raise SystemExit(f"{name} has no complete version {version}; it has {versions}")
    path = ModelLocation(name, version).path(root)
    metadata = read_metadata(path)
    return ServedModel(
        name,
        version,
        path,
        str(metadata.get("backbone", "unknown")),
        list(metadata["input_shape"]),
    )


def _service_env(config: RunConfig, model: ServedModel, port: int, batching: bool) -> dict[str, str]:
    env = {
        "CONVSERVE_MODEL_REPOSITORY": str(config.model_repository),
        "CONVSERVE_MODEL_NAME": model.name,
        "CONVSERVE_MODEL_VERSION": str(model.version),
        "CONVSERVE_HOST": LOOPBACK,
        "CONVSERVE_PORT": str(port),
        **config.service_env,
    }
    if not batching:
        env["CONVSERVE_MAX_BATCH_SIZE"] = "1"
    return env


def _run_ceiling(
    config: RunConfig, model: ServedModel, photos: Sequence[Photo], plan: BenchPlan
) -> dict[str, Any]:
    from service.preprocessing import ImagePreprocessor
    from service.runtime import OnnxModel, load_model
    from service.settings import Settings

    # Sessions are built exactly as the service builds them, from the same settings.
    overrides: dict[str, Any] = {
        key.removeprefix("CONVSERVE_").lower(): value for key, value in config.service_env.items()
    }
    settings = Settings(**overrides)

    def load(intra_op_threads: int) -> OnnxModel:
        return load_model(model.path, list(settings.providers), intra_op_threads or settings.intra_op_threads)

    onnx_model = load(0)
    preprocess = ImagePreprocessor.from_metadata(onnx_model.metadata)
    log.info("ceiling: in-process pipeline on %s (provider %s)", model.path, onnx_model.active_provider)
    result = measure_ceiling(
        lambda threads: load(threads).session, onnx_model.input_name, preprocess, photos, plan.ceiling
    )
    result["provider"] = onnx_model.active_provider
    result["service_intra_op_threads"] = settings.intra_op_threads
    return result


def _service_process(config: RunConfig, model: ServedModel, log_dir: Path, batching: bool) -> ServerProcess:
    port = free_port()
    name = "service" if batching else "unbatched"
    return ServerProcess(
        name=name,
        command=python_module_command("service"),
        env=_service_env(config, model, port, batching),
        port=port,
        log_path=log_dir / f"{name}.log",
    )


def _naive_process(model: ServedModel, log_dir: Path) -> ServerProcess:
    port = free_port()
    return ServerProcess(
        name="naive",
        command=python_module_command(
            "benchmarks.naive_server",
            "--model-file",
            str(model.path),
            "--host",
            LOOPBACK,
            "--port",
            str(port),
        ),
        env={},
        port=port,
        log_path=log_dir / "naive.log",
        ready_path="/health",
    )


async def _bench_service(
    config: RunConfig, model: ServedModel, photos: Sequence[Photo], plan: BenchPlan, log_dir: Path
) -> tuple[ServerBench, dict[int, float]]:
    profile = config.profile and py_spy_path() is not None
    with _service_process(config, model, log_dir, batching=True) as server:
        bench = ServerBench("service", server, photos)
        # The leak check comes first and under one steady load (concurrency 32): later levels (64
        # clients, open-loop bursts) hold more requests in flight, and the allocator keeps that
        # high-water mark resident, which says nothing about growth per request.
        rss: dict[int, float] = {}
        for checkpoint in plan.rss_checkpoints:
            count, value = await bench.soak_until(checkpoint, plan.rss_soak_concurrency, plan.rss_soak_max_s)
            rss[count] = value
        await bench.concurrency_levels(plan.concurrency_levels, plan.service_levels)
        if profile:
            bench.profile_result = await bench.profile(
                HEADLINE_CONCURRENCY, plan.service_levels, log_dir / "service-py-spy.txt"
            )
        capacity = find_level(bench.rows, "service", "concurrency", HEADLINE_CONCURRENCY)
        if capacity and capacity["img_per_s"] > 0:
            rates = [round(capacity["img_per_s"] * fraction, 1) for fraction in plan.rate_fractions]
            await bench.rates(rates, plan.rate_timing)
        bench.rss_after_all = {"requests": bench.requests_sent, "rss_mb": rss_mb(server.pid)}
        return bench, rss


async def _bench_baseline(
    name: str, server: ServerProcess, photos: Sequence[Photo], plan: BenchPlan, rates: Sequence[float]
) -> ServerBench:
    with server:
        bench = ServerBench(name, server, photos)
        await bench.concurrency_levels(plan.concurrency_levels, plan.baseline_levels)
        if rates:
            await bench.rates(rates, plan.rate_timing)
        return bench


def run(config: RunConfig, plan: BenchPlan, output: Path) -> dict[str, Any]:
    """Measure everything in `plan` and return the results dict (the caller writes the files)."""
    started = time.perf_counter()
    created = datetime.now(UTC).isoformat(timespec="seconds")
    machine = describe_machine(config.repo_root)
    inherited = sorted(key for key in os.environ if key.startswith("CONVSERVE_"))
    if inherited:
        log.warning("the servers inherit %s from this environment", inherited)
    busy_before = other_processes_cpu()
    if busy_before:
        log.warning("other processes are using CPU and will skew the figures: %s", busy_before)
    model = _resolve_model(config)
    photos = build_corpus()
    log_dir = Path(tempfile.mkdtemp(prefix="convserve-bench-"))
    log.info("model %s v%d; %d photos; server logs in %s", model.name, model.version, len(photos), log_dir)
    not_measured: dict[str, str] = {}
    if config.profile and "service" in config.servers and py_spy_path() is None:
        not_measured["profile"] = "py-spy is not installed (`.venv/bin/pip install py-spy`)"
        log.warning("no profile: %s", not_measured["profile"])

    in_process: dict[str, Any] = {}
    if "ceiling" in config.servers:
        in_process = _in_worker_thread(functools.partial(_run_ceiling, config, model, photos, plan))
    benches: list[ServerBench] = []
    rss: dict[int, float] = {}
    if "service" in config.servers:
        service_bench, rss = asyncio.run(_bench_service(config, model, photos, plan, log_dir))
        benches.append(service_bench)
    rates = [float(row["level"]) for bench in benches for row in bench.rows if row["mode"] == "rate"]
    if "unbatched" in config.servers:
        server = _service_process(config, model, log_dir, batching=False)
        unbatched_rates = rates if plan.rates_for_unbatched else []
        benches.append(asyncio.run(_bench_baseline("unbatched", server, photos, plan, unbatched_rates)))
    if "naive" in config.servers:
        benches.append(
            asyncio.run(_bench_baseline("naive", _naive_process(model, log_dir), photos, plan, []))
        )
    levels = [row for bench in benches for row in bench.rows]
    profile = next((bench.profile_result for bench in benches if bench.profile_result), None)

    results: dict[str, Any] = {
        "schema_version": 1,
        "created": created,
        "mode": plan.mode,
        "command": config.command,
        "output": str(output),
        **headline(
            levels,
            in_process.get("ceiling_img_per_s"),
            in_process.get("single_image_p99_ms"),
            rss,
            in_process.get("ort_only_best_img_per_s"),
        ),
        **cpu_per_image(profile),
    }
    results["targets"] = check_targets(results)
    results.update(
        {
            "not_measured": not_measured,
            "in_process": in_process,
            "levels": levels,
            "model": {
                "name": model.name,
                "version": model.version,
                "path": str(model.path),
                "backbone": model.backbone,
                "input_shape": model.input_shape,
                "onnx_mb": round(model.path.stat().st_size / 2**20, 1),
            },
            "corpus": describe_corpus(photos),
            "servers": {bench.server_name: bench.description for bench in benches},
            "profile": profile,
            "service_rss_after_all_levels": next(
                (bench.rss_after_all for bench in benches if bench.rss_after_all), None
            ),
            "plan": plan.to_dict(),
            "machine": machine,
            "other_processes_cpu_before": busy_before,
            "other_processes_cpu_after": other_processes_cpu(),
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "server_logs": str(log_dir),
            "duration_s": round(time.perf_counter() - started, 1),
        }
    )
    return results


def shell_command(argv: Sequence[str]) -> str:
    """The command line as a user would type it (for the results and the README)."""
    return "python -m benchmarks" + ("" if len(argv) <= 1 else " " + shlex.join(argv[1:]))
