"""One benchmark run: INT8 quantization, the in-process rows, then the service, batching off, one
batch per core (`instances`), the naive server, the BentoML peer and the service serving INT8, in
that order; then interleaved rounds of the service, one batch per core and the BentoML peer, whose
medians are the headline ratios (`peer_rounds`); then the service serving copies of the model
(`memory`, `budget`); then the results.

Servers run one at a time so they never compete with each other for the two cores; the load
generator runs in this process throughout, so every server pays the same client overhead. The
quantization and the in-process measurements run with no server alive.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.common.corpus import Photo, build_corpus, describe_corpus
from benchmarks.common.machine import describe_machine, other_processes_cpu
from benchmarks.common.processes import (
    ServerProcess,
    ServerStartError,
    rss_mb,
)
from benchmarks.peers import peer_venv
from benchmarks.performance import model_budget, model_memory, peer_rounds
from benchmarks.performance.in_process import in_worker_thread, run_in_process
from benchmarks.performance.int8 import (
    Int8Unavailable,
    Int8Variant,
)
from benchmarks.performance.plan import BenchPlan
from benchmarks.performance.profiling import py_spy_path
from benchmarks.performance.protocols import bench_protocols
from benchmarks.performance.report import peer_ratios
from benchmarks.performance.server_bench import ServerBench
from benchmarks.performance.subjects import (
    RunConfig,
    ServedModel,
    bento_process,
    int8_model,
    naive_process,
    prepare_int8,
    resolve_model,
    service_process,
)
from benchmarks.performance.targets import (
    HEADLINE_CONCURRENCY,
    ceiling_check,
    check_targets,
    cpu_per_image,
    find_level,
    headline,
    int8_figures,
)

log = logging.getLogger(__name__)


async def _bench_service(
    config: RunConfig, model: ServedModel, photos: Sequence[Photo], plan: BenchPlan, log_dir: Path
) -> tuple[ServerBench, dict[int, float]]:
    profile = config.profile and py_spy_path() is not None
    rss = await _soak_service(config, model, photos, plan, log_dir)
    # The levels start from a fresh server, as every other server's do: after the soak the service
    # would meet its 1-client level 20,000 requests in, the peers theirs after a few warm-up requests.
    with service_process(config, model, log_dir, "service") as server:
        bench = ServerBench("service", server, photos)
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


async def _soak_service(
    config: RunConfig, model: ServedModel, photos: Sequence[Photo], plan: BenchPlan, log_dir: Path
) -> dict[int, float]:
    """The leak check: the service's RSS at each of `plan.rss_checkpoints` requests, on a server of its
    own under one steady load (concurrency 32). Other levels (64 clients, open-loop bursts) hold more
    requests in flight, and the allocator keeps that high-water mark resident, which says nothing
    about growth per request."""
    rss: dict[int, float] = {}
    if not plan.rss_checkpoints:
        return rss
    with service_process(config, model, log_dir, "soak") as server:
        bench = ServerBench("soak", server, photos)
        for checkpoint in plan.rss_checkpoints:
            count, value = await bench.soak_until(checkpoint, plan.rss_soak_concurrency, plan.rss_soak_max_s)
            rss[count] = value
    return rss


async def _bench_baseline(
    name: str, server: ServerProcess, photos: Sequence[Photo], plan: BenchPlan, rates: Sequence[float]
) -> ServerBench:
    with server:
        bench = ServerBench(name, server, photos)
        await bench.concurrency_levels(plan.concurrency_levels, plan.baseline_levels)
        if rates:
            await bench.rates(rates, plan.rate_timing)
        return bench


async def _bench_bento(server: ServerProcess, photos: Sequence[Photo], plan: BenchPlan) -> ServerBench:
    with server:
        bench = ServerBench("bento", server, photos)
        await bench.warm_up()
        await bench.concurrency_levels(plan.concurrency_levels, plan.baseline_levels)
        return bench


def _measure_bento(
    model: ServedModel, photos: Sequence[Photo], plan: BenchPlan, log_dir: Path, not_measured: dict[str, str]
) -> ServerBench | None:
    """The BentoML peer's levels, its venv built first if missing; None (and why) when it cannot run."""
    try:
        peer_venv.ensure()
    except (OSError, subprocess.CalledProcessError) as error:
        not_measured["bento"] = f"could not build its venv ({error}); run `make peers` to see why"
        log.error("bento: %s", not_measured["bento"])
        return None
    try:
        return asyncio.run(_bench_bento(bento_process(model, log_dir, peer_venv.DEFAULT_VENV), photos, plan))
    except ServerStartError as error:
        not_measured["bento"] = f"the BentoML peer did not start: {str(error)[-300:]}"
        log.error("bento: %s", not_measured["bento"])
        return None


async def _bench_int8(
    config: RunConfig, model: ServedModel, photos: Sequence[Photo], plan: BenchPlan, log_dir: Path
) -> ServerBench:
    """The service with the FP32 run's settings, serving the INT8 variant: the headline levels only."""
    with service_process(config, model, log_dir, "int8") as server:
        bench = ServerBench("int8", server, photos)
        await bench.concurrency_levels(plan.int8_concurrency_levels, plan.service_levels)
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
    model = resolve_model(config)
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
                variant = prepare_int8(config, model, int8_repository, log_dir)
                int8 = variant.describe()
            except Int8Unavailable as error:
                not_measured["int8"] = f"no INT8 variant: {error}"
                log.error("int8: %s; the INT8 figures stay empty", not_measured["int8"])
        benches, in_process, int8_rows, rss = _measure(
            config, model, photos, plan, log_dir, variant=variant, not_measured=not_measured
        )
        rounds = _peer_rounds(
            config, model, photos, plan, log_dir, benches=benches, not_measured=not_measured
        )
        # Last, one service start per count: nothing else runs meanwhile, and the RSS is read idle.
        memory = (
            model_memory.measure(config, model, plan.model_counts, log_dir)
            if "memory" in config.servers
            else None
        )
        # Then one start per memory budget, serving many copies under a skewed mix of requests.
        budget = (
            model_budget.measure(config, model, photos, plan.budget, log_dir)
            if "budget" in config.servers
            else None
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
        **ceiling_check(levels, in_process),
        # The interleaved medians where measured; the one-after-the-other ratios otherwise (naive).
        "peer_ratios": {**peer_ratios(levels), **peer_rounds.ratios(rounds)},
        "peer_rounds": rounds,
        "levels": levels,  # the targets read rows of several servers
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
            "model_memory": memory,
            "model_budget": budget,
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


def _peer_rounds(
    config: RunConfig,
    model: ServedModel,
    photos: Sequence[Photo],
    plan: BenchPlan,
    log_dir: Path,
    *,
    benches: Sequence[ServerBench],
    not_measured: dict[str, str],
) -> list[dict[str, Any]]:
    """`peer_rounds.measure` of the contestants this run has: the service, one batch per core and the
    BentoML peer (once its own levels were measured: its venv exists and it starts)."""
    measured = {bench.server_name for bench in benches}
    if "service" not in measured or "bento" not in measured or plan.peer_rounds < 1:
        return []

    def start(name: str, number: int) -> ServerProcess:
        if name == "bento":
            server = bento_process(model, log_dir, peer_venv.DEFAULT_VENV)
        else:
            server = service_process(config, model, log_dir, name)
        return dataclasses.replace(server, log_path=log_dir / f"{name}-round{number}.log")

    names = [name for name in peer_rounds.CONTESTANTS if name in measured]
    return peer_rounds.measure(
        names, start, photos, rounds=plan.peer_rounds, window=plan.peer_window, not_measured=not_measured
    )


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
        in_process, int8_rows = in_worker_thread(
            functools.partial(
                run_in_process, config, model, photos, plan, int8=variant, not_measured=not_measured
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
        server = service_process(config, model, log_dir, "unbatched")
        unbatched_rates = rates if plan.rates_for_unbatched else []
        benches.append(asyncio.run(_bench_baseline("unbatched", server, photos, plan, unbatched_rates)))
    if "instances" in config.servers:
        server = service_process(config, model, log_dir, "instances")
        benches.append(asyncio.run(_bench_baseline("instances", server, photos, plan, [])))
    if "protocols" in config.servers:
        benches.append(asyncio.run(bench_protocols(config, model, photos, plan.baseline_levels, log_dir)))
    if "naive" in config.servers:
        benches.append(asyncio.run(_bench_baseline("naive", naive_process(model, log_dir), photos, plan, [])))
    if "bento" in config.servers:
        bento = _measure_bento(model, photos, plan, log_dir, not_measured)
        if bento is not None:
            benches.append(bento)
    if variant is not None:
        try:
            benches.append(
                asyncio.run(_bench_int8(config, int8_model(variant, model), photos, plan, log_dir))
            )
        except ServerStartError as error:
            not_measured["int8 service"] = str(error)[-300:]
            log.error("int8: the service did not start with the INT8 variant: %s", error)
    return benches, in_process, int8_rows, rss


def shell_command(argv: Sequence[str]) -> str:
    """The command line as a user would type it (for the results and the README)."""
    return "python -m benchmarks" + ("" if len(argv) <= 1 else " " + shlex.join(argv[1:]))
