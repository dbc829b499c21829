"""One benchmark run: INT8 quantization, the in-process rows, then the service, batching off, one
batch per core (`instances`), the naive server and the service serving INT8, in that order; then
the results.

Servers run one at a time so they never compete with each other for the two cores; the load
generator runs in this process throughout, so every server pays the same client overhead. The
quantization and the in-process measurements run with no server alive.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import shlex
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from benchmarks.common.corpus import Photo, build_corpus, describe_corpus
from benchmarks.common.machine import describe_machine, other_processes_cpu
from benchmarks.common.processes import (
    LOOPBACK,
    ServerProcess,
    ServerStartError,
    free_port,
    python_module_command,
    rss_mb,
)
from benchmarks.peers import naive_server
from benchmarks.performance.ceiling import InferenceSession, measure_ceiling
from benchmarks.performance.int8 import (
    Int8Unavailable,
    Int8Variant,
    given_variant,
    measure_in_process,
    quantize_copy,
)
from benchmarks.performance.plan import BenchPlan
from benchmarks.performance.profiling import py_spy_path
from benchmarks.performance.server_bench import ServerBench
from benchmarks.performance.targets import (
    HEADLINE_CONCURRENCY,
    check_targets,
    cpu_per_image,
    find_level,
    headline,
    int8_figures,
)
from service.inference.preprocessing import ImagePreprocessor
from service.models.repository import ModelLocation, scan
from service.models.runtime import load_model
from service.settings import Settings
from training.modelfile import read_metadata

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
    int8_model: Path | None = None
    """An existing INT8 version directory to serve as the INT8 variant; None = quantize a copy."""


@dataclass(frozen=True)
class ServedModel:
    repository: Path
    name: str
    version: int
    path: Path
    """The ONNX file."""
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


def _resolve_model(config: RunConfig) -> ServedModel:
    """The one model version the benchmark serves: `--model-name`/`--model-version`, else the only
    model in the repository at its newest complete version (the service serves them all now)."""
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
        root,
        name,
        version,
        path,
        metadata.backbone,
        list(metadata.input_shape),
    )


# Every run of `python -m service` the benchmark makes, as the settings it overrides (`service` and
# `int8` run the defaults). `instances`: one single-threaded batch per core (Triton's instance count)
# instead of one batch on every core.
VARIANT_SETTINGS: dict[str, dict[str, str]] = {
    "service": {},
    "int8": {},
    "unbatched": {"CONVSERVE_MAX_BATCH_SIZE": "1"},
    "instances": {
        "CONVSERVE_INSTANCES": str(max(1, os.cpu_count() or 1)),
        "CONVSERVE_INTRA_OP_THREADS": "1",
    },
}


def _service_env(config: RunConfig, model: ServedModel, port: int, name: str) -> dict[str, str]:
    return {
        "CONVSERVE_MODEL_REPOSITORY": str(model.repository),
        "CONVSERVE_MODEL_NAME": model.name,
        "CONVSERVE_MODEL_VERSION": str(model.version),
        "CONVSERVE_HOST": LOOPBACK,
        "CONVSERVE_PORT": str(port),
        **config.service_env,
        **VARIANT_SETTINGS[name],
    }


def _run_in_process(
    config: RunConfig,
    model: ServedModel,
    photos: Sequence[Photo],
    plan: BenchPlan,
    *,
    int8: Int8Variant | None,
    not_measured: dict[str, str],
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The FP32 ceiling, then the INT8 rows at the configurations it chose (None without a variant)."""
    # Sessions are built exactly as the service builds them, from the same settings.
    overrides: dict[str, Any] = {
        key.removeprefix("CONVSERVE_").lower(): value for key, value in config.service_env.items()
    }
    settings = Settings(**overrides)

    def load(path: Path, intra_op_threads: int) -> InferenceSession:
        threads = intra_op_threads or settings.intra_op_threads
        return load_model(path, list(settings.providers), threads).session

    onnx_model = load_model(model.path, list(settings.providers), settings.intra_op_threads)
    preprocess = ImagePreprocessor.from_metadata(onnx_model.metadata)
    log.info("ceiling: in-process pipeline on %s (provider %s)", model.path, onnx_model.active_provider)
    result = measure_ceiling(
        lambda threads: load(model.path, threads), onnx_model.input_name, preprocess, photos, plan.ceiling
    )
    result["provider"] = onnx_model.active_provider
    result["service_intra_op_threads"] = settings.intra_op_threads
    if int8 is None:
        return result, None
    try:
        rows = measure_in_process(
            load,
            model.path,
            int8.path / model.path.name,
            input_name=onnx_model.input_name,
            preprocess=preprocess,
            photos=photos,
            fp32_in_process=result,
            plan=plan.ceiling,
        )
    except Exception as error:  # whatever ONNX Runtime makes of the INT8 file, keep the FP32 figures
        log.exception("int8: the in-process measurement failed")
        not_measured["int8 in process"] = f"{type(error).__name__}: {error}"[:300]
        return result, None
    return result, rows


def _service_process(config: RunConfig, model: ServedModel, log_dir: Path, name: str) -> ServerProcess:
    port = free_port()
    return ServerProcess(
        name=name,
        command=python_module_command("service"),
        env=_service_env(config, model, port, name),
        port=port,
        log_path=log_dir / f"{name}.log",
    )


def _naive_process(model: ServedModel, log_dir: Path) -> ServerProcess:
    port = free_port()
    return ServerProcess(
        name="naive",
        command=python_module_command(
            naive_server.__name__,
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
    with _service_process(config, model, log_dir, "service") as server:
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


async def _bench_int8(
    config: RunConfig, model: ServedModel, photos: Sequence[Photo], plan: BenchPlan, log_dir: Path
) -> ServerBench:
    """The service with the FP32 run's settings, serving the INT8 variant: the headline levels only."""
    with _service_process(config, model, log_dir, "int8") as server:
        bench = ServerBench("int8", server, photos)
        await bench.concurrency_levels(plan.int8_concurrency_levels, plan.service_levels)
        return bench


def _prepare_int8(config: RunConfig, model: ServedModel, repository: Path, log_dir: Path) -> Int8Variant:
    if config.int8_model is not None:
        return given_variant(config.int8_model)
    return quantize_copy(
        model.path.parent, model.name, repository, log_dir / "quantize.log", cwd=config.repo_root
    )


def _int8_model(variant: Int8Variant, fp32: ServedModel) -> ServedModel:
    path = variant.path / fp32.path.name
    return ServedModel(
        variant.repository, variant.name, variant.version, path, fp32.backbone, fp32.input_shape
    )


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
    # The quantized copy lives only as long as the run; its quantize.json is kept in the results.
    int8_repository = Path(tempfile.mkdtemp(prefix="convserve-bench-int8-"))
    try:
        variant, int8 = None, None
        if "int8" in config.servers:
            try:
                variant = _prepare_int8(config, model, int8_repository, log_dir)
                int8 = variant.describe()
            except Int8Unavailable as error:
                not_measured["int8"] = f"no INT8 variant: {error}"
                log.error("int8: %s; the INT8 figures stay empty", not_measured["int8"])
        benches, in_process, int8_rows, rss = _measure(
            config, model, photos, plan, log_dir, variant=variant, not_measured=not_measured
        )
    finally:
        shutil.rmtree(int8_repository, ignore_errors=True)
    if int8 is not None:
        int8["in_process"] = int8_rows
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
        **int8_figures(levels, int8),
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
            "int8": int8,
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


def _measure(
    config: RunConfig,
    model: ServedModel,
    photos: Sequence[Photo],
    plan: BenchPlan,
    log_dir: Path,
    *,
    variant: Int8Variant | None,
    not_measured: dict[str, str],
) -> tuple[list[ServerBench], dict[str, Any], dict[str, Any] | None, dict[int, float]]:
    """In-process rows, then each server in turn: (benches, FP32 in-process, INT8 in-process, RSS)."""
    in_process: dict[str, Any] = {}
    int8_rows = None
    if "ceiling" in config.servers:
        in_process, int8_rows = _in_worker_thread(
            functools.partial(
                _run_in_process, config, model, photos, plan, int8=variant, not_measured=not_measured
            )
        )
    elif variant is not None:
        not_measured["int8 in process"] = "measured at the FP32 ceiling's configuration: needs `ceiling`"
    benches: list[ServerBench] = []
    rss: dict[int, float] = {}
    if "service" in config.servers:
        service_bench, rss = asyncio.run(_bench_service(config, model, photos, plan, log_dir))
        benches.append(service_bench)
    rates = [float(row["level"]) for bench in benches for row in bench.rows if row["mode"] == "rate"]
    if "unbatched" in config.servers:
        server = _service_process(config, model, log_dir, "unbatched")
        unbatched_rates = rates if plan.rates_for_unbatched else []
        benches.append(asyncio.run(_bench_baseline("unbatched", server, photos, plan, unbatched_rates)))
    if "instances" in config.servers:
        server = _service_process(config, model, log_dir, "instances")
        benches.append(asyncio.run(_bench_baseline("instances", server, photos, plan, [])))
    if "naive" in config.servers:
        benches.append(
            asyncio.run(_bench_baseline("naive", _naive_process(model, log_dir), photos, plan, []))
        )
    if variant is not None:
        try:
            benches.append(
                asyncio.run(_bench_int8(config, _int8_model(variant, model), photos, plan, log_dir))
            )
        except ServerStartError as error:
            not_measured["int8 service"] = str(error)[-300:]
            log.error("int8: the service did not start with the INT8 variant: %s", error)
    return benches, in_process, int8_rows, rss


def shell_command(argv: Sequence[str]) -> str:
    """The command line as a user would type it (for the results and the README)."""
    return "python -m benchmarks" + ("" if len(argv) <= 1 else " " + shlex.join(argv[1:]))
