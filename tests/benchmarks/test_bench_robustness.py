"""The robustness run's pieces against real processes and sockets: cost, overload, slow clients, SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time

import pytest

from benchmarks.common.corpus import Photo, build_corpus
from benchmarks.common.loadgen import Window, client_session, open_loop
from benchmarks.common.processes import LOOPBACK, free_port
from benchmarks.robustness.hostile_inputs import HostileCase, case_named
from benchmarks.robustness.input_cost import (
    Attempt,
    CpuClock,
    MemoryWatch,
    measure_attempt,
    peak_rss_mb,
    reset_peak_rss,
    tree_rss_mb,
)
from benchmarks.robustness.overload import HealthProbe, accept_queue_length, summarize_outcomes
from benchmarks.robustness.sigterm_drain import shell_exit_status
from benchmarks.robustness.slowloris import slow_clients
from tests.liveserver import ServiceProcess
from tests.waiting import wait_until

# Allocates and touches N MiB, frees it, says "ready" and waits for stdin to close.
ALLOCATE_THEN_WAIT = (
    "import sys\n"
    "block = bytearray(int(sys.argv[1]) * 2**20)\n"
    "for i in range(0, len(block), 4096): block[i] = 1\n"
    "del block\n"
    "print('ready', flush=True)\n"
    "sys.stdin.read()\n"
)


@pytest.fixture(scope="module")
def photos() -> list[Photo]:
    return build_corpus([0.05])


def _process(script: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", script, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )


def test_peak_rss_reset_forgets_an_earlier_peak() -> None:
    process = _process(ALLOCATE_THEN_WAIT, "200")
    try:
        assert process.stdout is not None and process.stdout.readline() == "ready\n"
        before_reset = peak_rss_mb(process.pid)
        assert before_reset is not None and before_reset > 200
        if not reset_peak_rss(process.pid):
            pytest.skip("this kernel does not allow resetting VmHWM through /proc/<pid>/clear_refs")
        after_reset = peak_rss_mb(process.pid)
        assert after_reset is not None and after_reset < 100
    finally:
        process.communicate("")


def test_cpu_clock_counts_the_cpu_a_process_burns_meanwhile() -> None:
    burn = (
        "import sys, time\n"
        "print('ready', flush=True)\n"
        "for line in sys.stdin:\n"
        "    end = time.process_time() + 0.3\n"
        "    while time.process_time() < end: pass\n"
        "    print('done', flush=True)\n"
    )
    process = _process(burn)
    try:
        assert process.stdin is not None and process.stdout is not None
        assert process.stdout.readline() == "ready\n"  # the interpreter's start-up is not counted
        clock = CpuClock(process.pid)
        process.stdin.write("go\n")
        process.stdin.flush()
        assert process.stdout.readline() == "done\n"
        # It burned 0.3 s of its own CPU time; the rest is reading a line and printing one (a few ms),
        # so 1 s is a margin no scheduler delay reaches: CPU time does not grow while a process waits.
        assert 0.29 <= clock.seconds() < 1.0
    finally:
        process.communicate("")


def test_memory_watch_kills_a_process_over_the_cap() -> None:
    grow = (
        "import time\nblocks = []\nwhile True:\n    blocks.append(bytearray(8 * 2**20)); time.sleep(0.005)\n"
    )
    process = _process(grow)

    async def watch() -> MemoryWatch:
        async with MemoryWatch(process.pid, kill_above_mb=150) as watcher:
            for _ in range(600):
                if watcher.killed:
                    break
                await asyncio.sleep(0.05)
        return watcher

    with process:  # closes its pipes
        watcher = asyncio.run(watch())
        assert process.wait(timeout=10) == -signal.SIGKILL
    assert watcher.killed and watcher.peak_mb > 150
    assert tree_rss_mb(process.pid) is None


def test_attempt_reports_status_cpu_and_memory_of_one_request(tiny_server: ServiceProcess) -> None:
    async def measure(case: HostileCase) -> Attempt:
        async with client_session(2, 30) as session:
            return await measure_attempt(
                session,
                f"{tiny_server.url}/predict",
                tiny_server.pid,
                case=case,
                timeout_s=30,
                kill_above_mb=4096,
            )

    attempt = asyncio.run(measure(case_named("hundred_files")))
    assert attempt.status == 200
    assert attempt.error is None and not attempt.server_died
    assert attempt.cpu_s is not None and attempt.cpu_s > 0
    assert attempt.rss_increase_mb is not None and attempt.rss_increase_mb >= 0


def test_open_loop_sorts_answers_from_refusals(tiny_server: ServiceProcess, photos: list[Photo]) -> None:
    rejected = Photo("reject.jpg", photos[0].data, photos[0].width, photos[0].height)
    run = asyncio.run(
        open_loop(f"{tiny_server.url}/predict", [photos[0], rejected], 40.0, Window(duration_s=0.5))
    )
    summary = summarize_outcomes(run.outcomes)
    assert summary["skipped_client_backlog"] == 0
    assert summary["requests"] == 20
    assert summary["answered"] == 10 and summary["refused"] == 10
    assert summary["lost_total"] == 0
    assert summary["by_status"] == {"200": 10, "503": 10}
    assert summary["refused_latency_ms"]["p99_ms"] is not None


def test_health_probe_times_each_answer_until_stopped(tiny_server: ServiceProcess) -> None:
    async def run() -> dict[str, object]:
        stop = asyncio.Event()
        probe = HealthProbe(tiny_server.url, interval_s=0.01)
        task = asyncio.create_task(probe.run(stop))
        await asyncio.to_thread(wait_until, lambda: len(probe.samples) >= 3, "three health probes")
        stop.set()
        await task
        return probe.summary()

    result = asyncio.run(run())
    assert isinstance(result["probes"], int) and result["probes"] >= 3
    assert result["ok"] == result["probes"]


def test_accept_queue_counts_connections_the_server_has_not_accepted() -> None:
    with socket.socket() as listener:
        listener.bind((LOOPBACK, 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        assert accept_queue_length(port) == 0
        clients = [socket.create_connection((LOOPBACK, port)) for _ in range(3)]
        try:
            # Handshakes done, none accepted (the kernel completes them apart from connect()).
            wait_until(lambda: accept_queue_length(port) == 3, "three connections in the accept queue")
            listener.accept()[0].close()
            assert accept_queue_length(port) == 2
        finally:
            for client in clients:
                client.close()
    assert accept_queue_length(port) is None  # nothing listens there any more


def test_connection_errors_count_as_lost(photos: list[Photo]) -> None:
    url = f"http://{LOOPBACK}:{free_port()}/predict"
    summary = summarize_outcomes(asyncio.run(open_loop(url, photos, 20.0, Window(duration_s=0.2))).outcomes)
    assert summary["connection_errors"] == summary["lost_total"] == summary["requests"] == 4
    assert summary["answered_latency_ms"]["p50_ms"] is None


def test_slow_clients_stay_open_on_a_server_without_header_timeouts(
    tiny_server: ServiceProcess, photos: list[Photo]
) -> None:
    result = asyncio.run(
        slow_clients(LOOPBACK, tiny_server.port, photos[0], connections=5, mode="head", wait_s=1.5)
    )
    assert result["opened"] == 5
    assert result["closed_by_server"] == 0 and result["still_open_at_end"] == 5
    assert result["normal_requests_meanwhile"] >= 1
    assert result["normal_requests_ok"] == result["normal_requests_meanwhile"]


def test_slow_clients_closed_by_the_server_are_timed(photos: list[Photo]) -> None:
    connections = 4

    async def run() -> tuple[dict[str, object], float]:
        arrived = 0
        all_arrived = asyncio.Event()

        async def close_once_all_have_sent(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            nonlocal arrived
            await reader.read(100)
            arrived += 1
            if arrived == connections:
                all_arrived.set()
            await all_arrived.wait()  # every connection is open and waiting before any is closed
            writer.write(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
            writer.close()

        server = await asyncio.start_server(close_once_all_have_sent, LOOPBACK, 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            started = time.monotonic()
            result = await slow_clients(
                LOOPBACK, port, photos[0], connections=connections, mode="body", wait_s=600
            )
            return result, time.monotonic() - started

    result, elapsed = asyncio.run(run())
    # It returns once the server has closed them all, not at the end of its 600 s wait.
    assert elapsed < 600
    assert result["closed_by_server"] == connections and result["still_open_at_end"] == 0
    assert result["server_answers"] == ["HTTP/1.1 408 Request Timeout"]
    closed_after = result["closed_after_s"]
    assert isinstance(closed_after, dict)
    assert 0 <= closed_after["p50_s"] <= closed_after["max_s"] <= elapsed


def test_exit_status_reads_like_a_shell() -> None:
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    process.send_signal(signal.SIGTERM)
    assert shell_exit_status(process.wait(timeout=10)) == 143
    assert shell_exit_status(0) == 0
