"""`python -m benchmarks --robustness`: the service against hostile files and clients, overload and SIGTERM.

Five phases, each against a fresh `python -m service` on loopback (so one phase's leftovers never
colour the next), run one after another on the shared cores:
1. corpus — every hostile case and cost probe, one request at a time: status vs expected, wall
   time, server CPU seconds and peak RSS increase, as ratios to a normal 2-MP JPEG;
2. overload — capacity at 32 clients, then an open loop at `overload_factor` × capacity;
3. slow clients — partial heads, then partial bodies, while a normal client keeps asking;
4. SIGTERM under load — for each client count, a fresh server is loaded and terminated;
5. interference — a normal client's p99 beside one hostile client of each class
   (`benchmarks.robustness.interference`), as a ratio to its p99 on the idle server.
A phase that fails is recorded with its error and the others still run. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from benchmarks.common.corpus import build_corpus
from benchmarks.common.loadgen import Window, client_session, closed_loop, open_loop
from benchmarks.common.machine import describe_machine, git_commit, other_processes_cpu
from benchmarks.common.processes import (
    LOOPBACK,
    ResourceSampler,
    ServerProcess,
    free_port,
    python_module_command,
)
from benchmarks.common.promtext import scrape_counter
from benchmarks.robustness.hostile_inputs import HostileCase, case_named, cost_probes, hostile_cases
from benchmarks.robustness.input_cost import Attempt, measure_attempt, summarize_case, tree_rss_mb
from benchmarks.robustness.interference import InterferencePlan, measure_interference
from benchmarks.robustness.overload import HealthProbe, sample_accept_queue, summarize_outcomes
from benchmarks.robustness.safety_targets import check_targets
from benchmarks.robustness.sigterm_drain import sigterm_under_load
from benchmarks.robustness.slowloris import slow_clients

log = logging.getLogger(__name__)

PHASES = ("corpus", "overload", "slowloris", "sigterm", "interference")
REFERENCE = "reference_jpeg_2mp"
REJECTED_COUNTER = "convserve_rejected_total"
RESTART_ABOVE_BASELINE_MB = 64.0
"""A corpus server whose RSS stays this far above its warmed-up baseline is replaced before the next case."""


@dataclass(frozen=True)
class RobustnessConfig:
    repo_root: Path
    model_repository: Path
    model_name: str | None = None
    model_version: int | None = None
    service_dir: Path | None = None
    """Checkout whose `service` package to run (working directory and PYTHONPATH); None = this one."""
    service_env: Mapping[str, str] = field(default_factory=dict)
    phases: tuple[str, ...] = PHASES
    soak_seconds: float = 30.0
    overload_factor: float = 2.0
    overload_rate: float | None = None
    """Fixed offered rate, requests/s (None: `overload_factor` × the capacity measured just before).
    A fixed rate offers two builds the very same load, whatever else the shared cores were doing."""
    capacity_seconds: float = 10.0
    slowloris_connections: int = 200
    slowloris_wait_s: float = 30.0
    sigterm_clients: tuple[int, ...] = (32, 256)
    sigterm_load_s: float = 8.0
    rss_kill_mb: float = 6144.0
    case_timeout_s: float = 60.0
    reference_repeats: int = 5
    interference_requests: int = 200
    """Normal requests per interference window at least (idle, then beside each hostile class)."""
    interference_min_window_s: float = 10.0
    interference_window_s: float = 60.0
    """Shortest and longest an interference window runs, in seconds, whatever its count."""
    command: str = "python -m benchmarks --robustness"


class ServerFactory:
    """Fresh service processes with the same model and settings, each on a new free port.

    `new()` returns the server unstarted: use it as a context manager, or `start()` and `stop()` it.
    """

    def __init__(self, config: RobustnessConfig, log_dir: Path) -> None:
        self.config = config
        self.log_dir = log_dir
        self.servers: list[ServerProcess] = []

    def new(self, label: str, extra_env: Mapping[str, str] | None = None) -> ServerProcess:
        config, port = self.config, free_port()
        env = {
            "CONVSERVE_MODEL_REPOSITORY": str(config.model_repository.resolve()),
            "CONVSERVE_HOST": LOOPBACK,
            "CONVSERVE_PORT": str(port),
            **({"CONVSERVE_MODEL_NAME": config.model_name} if config.model_name else {}),
            **({"CONVSERVE_MODEL_VERSION": str(config.model_version)} if config.model_version else {}),
            **config.service_env,
            **(extra_env or {}),
        }
        if config.service_dir is not None:
            env["PYTHONPATH"] = str(config.service_dir.resolve())
        server = ServerProcess(
            name=f"service-{label}",
            command=python_module_command("service"),
            env=env,
            port=port,
            log_path=self.log_dir / f"{label}-{len(self.servers)}.log",
            cwd=config.service_dir,
            stop_timeout_s=60.0,
        )
        self.servers.append(server)
        return server


async def _attempts(
    server: ServerProcess, case: HostileCase, repeats: int, config: RobustnessConfig
) -> list[Attempt]:
    url = f"{server.url}/predict"
    attempts: list[Attempt] = []
    async with client_session(4, config.case_timeout_s) as session:
        for _ in range(repeats):
            attempt = await measure_attempt(
                session,
                url,
                server.pid,
                case=case,
                timeout_s=config.case_timeout_s,
                kill_above_mb=config.rss_kill_mb,
            )
            attempts.append(attempt)
            # Expensive or fatal cases run once: repeating them would only spend the time budget.
            if attempt.server_died or attempt.error or attempt.seconds > 2.0:
                break
    return attempts


async def _fresh_corpus_server(
    factory: ServerFactory, config: RobustnessConfig
) -> tuple[ServerProcess, float]:
    """A started, warmed-up server and its RSS then (the baseline later cases are compared with)."""
    server = factory.new("corpus")
    server.start()
    await _attempts(server, case_named(REFERENCE), 3, config)  # first requests allocate pools
    return server, tree_rss_mb(server.pid) or 0.0


def _restart_reason(server: ServerProcess, row: dict[str, Any], baseline_mb: float) -> str | None:
    if row["server_died"] or row["errors"] or not server.alive():
        # A timed-out request may still be burning CPU: the next case needs an idle server.
        return "died or failed"
    kept = (tree_rss_mb(server.pid) or 0.0) - baseline_mb
    if kept > RESTART_ABOVE_BASELINE_MB:
        # The allocator keeps freed pages: the next case would reuse them and show no RSS increase.
        return f"kept {kept:.0f} MB"
    return None


async def corpus_phase(factory: ServerFactory, config: RobustnessConfig) -> dict[str, Any]:
    server, baseline = await _fresh_corpus_server(factory, config)
    restarts: dict[str, str] = {}
    try:
        reference_case = case_named(REFERENCE)
        reference_attempts = await _attempts(server, reference_case, config.reference_repeats, config)
        reference = summarize_case(reference_case, reference_attempts, None)
        rows = []
        probes = cost_probes()
        for case in [*hostile_cases(), *probes]:
            attempts = await _attempts(server, case, 3, config)
            row = summarize_case(case, attempts, reference)
            row["cost_probe"] = case in probes
            rows.append(row)
            log.info(
                "%-28s status %s (expected %s) %.3f s cpu %s s rss +%s MB%s",
                case.name,
                row["statuses"],
                case.expected_status,
                row["seconds"] or 0.0,
                row["cpu_s"],
                row["rss_increase_mb"],
                f" errors {row['errors']}" if row["errors"] else "",
            )
            reason = _restart_reason(server, row, baseline)
            if reason:
                log.info("restarting the server after %s (%s)", case.name, reason)
                restarts[case.name] = reason
                server.kill()
                server, baseline = await _fresh_corpus_server(factory, config)
        return {"reference": reference, "cases": rows, "server_restarted_after": restarts}
    finally:
        server.stop()


async def overload_phase(factory: ServerFactory, config: RobustnessConfig) -> dict[str, Any]:
    photos = build_corpus()
    with factory.new("overload") as server:
        url = f"{server.url}/predict"
        capacity = (
            await closed_loop(url, photos, 32, Window(duration_s=config.capacity_seconds, warmup_s=3.0))
        ).result()
        if capacity.img_per_s <= 0:
            raise RuntimeError(f"capacity measurement answered nothing: {capacity.error_kinds}")
        rate = config.overload_rate or round(capacity.img_per_s * config.overload_factor, 1)
        log.info("capacity %.1f img/s at 32 clients; open loop at %.1f req/s", capacity.img_per_s, rate)
        await asyncio.sleep(2.0)
        rss_before = tree_rss_mb(server.pid)
        rejected_before = await scrape_counter(server.url, REJECTED_COUNTER, "reason")
        client_cpu = psutil.Process().cpu_times()
        started = time.perf_counter()
        stop_probe = asyncio.Event()
        probe = HealthProbe(server.url)
        health = asyncio.create_task(probe.run(stop_probe))
        backlog = asyncio.create_task(sample_accept_queue(server.port, stop_probe))
        async with ResourceSampler(server.pid, interval_s=0.25) as sampler:
            # Up to 2,048 unanswered requests: a server at twice its capacity queues or refuses far
            # fewer, so sends are skipped only when it has stopped answering altogether.
            run = await open_loop(
                url, photos, rate, Window(duration_s=config.soak_seconds), max_outstanding=2048
            )
        stop_probe.set()
        await health
        client_cpu_percent = 100 * _cpu_since(client_cpu) / (time.perf_counter() - started)
        await asyncio.sleep(2.0)
        rss_after = tree_rss_mb(server.pid)
        rejected_after = await scrape_counter(server.url, REJECTED_COUNTER, "reason")
        assert sampler.result is not None
        return {
            "capacity_img_per_s_at_32": round(capacity.img_per_s, 2),
            "capacity_errors": capacity.error_kinds,
            "offered_req_per_s": rate,
            "overload_factor": config.overload_factor,
            "seconds": config.soak_seconds,
            **summarize_outcomes(run.outcomes),
            "rss_before_mb": None if rss_before is None else round(rss_before, 1),
            "rss_after_mb": None if rss_after is None else round(rss_after, 1),
            "rss_max_mb": sampler.result.rss_mb_peak,
            "server_cpu_percent": sampler.result.cpu_percent_mean,
            "client_cpu_percent": round(client_cpu_percent, 1),
            "healthz_meanwhile": probe.summary(),
            "accept_queue": await backlog,
            # The server's own count of refusals by reason, where it exports one (older builds do not).
            "server_rejected_by_reason": {
                reason: round(count - rejected_before.get(reason, 0.0))
                for reason, count in rejected_after.items()
                if count > rejected_before.get(reason, 0.0)
            },
        }


def _cpu_since(start: Any) -> float:
    """CPU seconds this process (the load generator) used since `start` (a psutil cpu_times)."""
    now = psutil.Process().cpu_times()
    return float(now.user + now.system - start.user - start.system)


async def slowloris_phase(factory: ServerFactory, config: RobustnessConfig) -> dict[str, Any]:
    photo = build_corpus([0.3])[0]
    results = {}
    with factory.new("slowloris") as server:
        for mode in ("head", "body"):
            results[mode] = await slow_clients(
                LOOPBACK,
                server.port,
                photo,
                connections=config.slowloris_connections,
                mode=mode,
                wait_s=config.slowloris_wait_s,
            )
            log.info(
                "slow clients (%s): %s", mode, {k: v for k, v in results[mode].items() if "latency" not in k}
            )
            await asyncio.sleep(1.0)
    return results


async def sigterm_phase(factory: ServerFactory, config: RobustnessConfig) -> dict[str, Any]:
    photos = build_corpus()
    results = {}
    for clients in config.sigterm_clients:
        with factory.new(f"sigterm-{clients}") as server:
            results[str(clients)] = await sigterm_under_load(
                server, photos, clients=clients, load_s=config.sigterm_load_s, exit_timeout_s=60.0
            )
            log.info("SIGTERM under %d clients: %s", clients, results[str(clients)])
    return results


async def interference_phase(factory: ServerFactory, config: RobustnessConfig) -> dict[str, Any]:
    # An admin token (in a file, so the recorded env shows no secret): the admin class then meets the
    # 401/403 of a deployment that exposes the repository API, not an open API doing real work.
    token_file = factory.log_dir / "interference-admin-token"
    token_file.write_text(secrets.token_hex(32))
    plan = InterferencePlan(
        normal_requests=config.interference_requests,
        min_window_s=config.interference_min_window_s,
        window_s=config.interference_window_s,
        request_timeout_s=config.case_timeout_s,
        rss_kill_mb=config.rss_kill_mb,
    )
    env = {"CONVSERVE_ADMIN_TOKEN_FILE": str(token_file)}
    return await measure_interference(lambda: factory.new("interference", env), case_named(REFERENCE), plan)


_PHASE_RUNNERS: dict[str, Callable[[ServerFactory, RobustnessConfig], Any]] = {
    "corpus": corpus_phase,
    "overload": overload_phase,
    "slowloris": slowloris_phase,
    "sigterm": sigterm_phase,
    "interference": interference_phase,
}


def run_robustness(config: RobustnessConfig, output: Path) -> dict[str, Any]:
    """Run the chosen phases and return the results dict (the caller writes the files)."""
    started = time.perf_counter()
    log_dir = Path(tempfile.mkdtemp(prefix="convserve-robustness-"))
    factory = ServerFactory(config, log_dir)
    service_dir = config.service_dir or config.repo_root
    results: dict[str, Any] = {
        "schema_version": 1,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": config.command,
        "output": str(output),
        "service_dir": str(service_dir),
        "service_commit": git_commit(service_dir),
        "config": {key: _jsonable(value) for key, value in asdict(config).items()},
        "machine": describe_machine(config.repo_root),
        "other_processes_cpu_before": other_processes_cpu(),
        "server_logs": str(log_dir),
    }
    try:
        for phase in config.phases:
            log.info("phase %s", phase)
            phase_started = time.perf_counter()
            try:
                results[phase] = asyncio.run(_PHASE_RUNNERS[phase](factory, config))
            except Exception as exc:  # one broken phase must not cost the others' figures
                log.exception("phase %s failed", phase)
                results[phase] = {"error": f"{type(exc).__name__}: {exc}"}
            results[phase]["phase_seconds"] = round(time.perf_counter() - phase_started, 1)
    finally:
        for server in factory.servers:  # none may outlive the run, whatever failed
            server.stop()
    results["servers"] = [server.describe() for server in factory.servers]
    results["targets"] = check_targets(results)
    results["other_processes_cpu_after"] = other_processes_cpu()
    results["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    results["duration_s"] = round(time.perf_counter() - started, 1)
    return results


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return dict(value)
    return value
