"""Servers under test as real subprocesses on loopback, and sampling of their CPU and memory.

Each server runs in its own process so that what is measured is what a user deploys: the real
`python -m service` (or the naive baseline) behind a real socket. The benchmark starts it on a free
127.0.0.1 port, waits for its readiness endpoint, and always stops it (SIGTERM, then SIGKILL after a
grace period) even when a measurement fails.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Protocol

import psutil

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port free on loopback right now (the OS picks it; the server binds it moments later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


class RunningServer(Protocol):
    """What the measurements need of a server that is up: where it listens and which process it is.

    `ServerProcess` is one; so is the test suite's shared launcher's, which the tests pass in."""

    @property
    def url(self) -> str:
        """`http://127.0.0.1:PORT`."""
        ...

    @property
    def port(self) -> int: ...

    @property
    def pid(self) -> int: ...


def process_alive(pid: int) -> bool:
    """Whether process `pid` still runs (an exited process its parent has not reaped yet does not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class ServerStartError(RuntimeError):
    """The server exited or never became ready; the message carries the tail of its log."""


@dataclass
class ServerProcess:
    """A server subprocess: `with ServerProcess(...) as server:` starts it and waits until ready."""

    name: str
    command: Sequence[str]
    env: Mapping[str, str]
    port: int
    log_path: Path
    ready_path: str = "/readyz"
    start_timeout_s: float = 300.0
    stop_timeout_s: float = 30.0
    cwd: Path | None = None
    """Working directory of the server (None: this process's), e.g. a worktree of an older commit."""
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    startup_s: float | None = field(default=None, init=False)
    """Seconds from launch until the readiness endpoint answered 200 (model load and warm-up)."""

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError(f"server {self.name} is not running")
        return self._process.pid

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log.info("starting %s on port %d (log: %s)", self.name, self.port, self.log_path)
        with self.log_path.open("wb") as log_file:
            self._process = subprocess.Popen(
                list(self.command),
                env={**os.environ, **self.env},
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.cwd,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        launched = time.monotonic()
        deadline = launched + self.start_timeout_s
        url = f"{self.url}{self.ready_path}"
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise ServerStartError(
                    f"{self.name} exited with code {self._process.returncode} before becoming ready; "
                    f"last log lines:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        self.startup_s = round(time.monotonic() - launched, 2)
                        log.info("%s is ready after %.1f s", self.name, self.startup_s)
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.25)
        raise ServerStartError(
            f"{self.name} was not ready at {url} after {self.start_timeout_s:.0f} s; "
            f"last log lines:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        """SIGTERM (graceful shutdown), then SIGKILL if it has not exited within the grace period."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("%s ignored SIGTERM for %.0f s; killing it", self.name, self.stop_timeout_s)
            process.kill()
            process.wait()

    def send_signal(self, signum: int) -> None:
        """Deliver a signal to the server process (not its children) without waiting."""
        if self._process is None:
            raise RuntimeError(f"server {self.name} is not running")
        self._process.send_signal(signum)

    def wait_exit(self, timeout_s: float) -> int | None:
        """The exit code once the process has exited (negative: killed by that signal), None on timeout."""
        if self._process is None:
            raise RuntimeError(f"server {self.name} was never started")
        try:
            return self._process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def kill(self) -> None:
        """SIGKILL the server and reap it (used when it runs away with memory or time)."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def describe(self) -> dict[str, object]:
        """How the server was run, for the results."""
        return {
            "command": " ".join(self.command),
            "cwd": str(self.cwd) if self.cwd else None,
            "env": dict(self.env),
            "startup_s": self.startup_s,
            "log": str(self.log_path),
        }

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def python_module_command(module: str, *args: str) -> list[str]:
    """`python -m module args…` with the interpreter running the benchmark (the project's venv)."""
    return [sys.executable, "-m", module, *args]


@dataclass(frozen=True)
class ResourceSample:
    """Mean CPU and peak/last memory of a process tree over a sampling period."""

    cpu_percent_mean: float | None
    """CPU use in percent of one core (200 = both cores of this machine busy)."""
    rss_mb_peak: float | None
    rss_mb_last: float | None

    def to_dict(self) -> dict[str, float | None]:
        return {
            "server_cpu_percent": self.cpu_percent_mean,
            "server_rss_mb_peak": self.rss_mb_peak,
            "server_rss_mb_last": self.rss_mb_last,
        }


def _tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def rss_mb(pid: int) -> float:
    """Resident memory of a process and all its children, in MiB."""
    total = 0
    for process in _tree(pid):
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return round(total / 2**20, 1)


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) so far of every thread of a process tree, by OS thread id."""
    times: dict[int, float] = {}
    for process in _tree(pid):
        try:
            threads = process.threads()
        except psutil.NoSuchProcess:
            continue
        for thread in threads:
            times[thread.id] = thread.user_time + thread.system_time
    return times


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) so far of a process and all its children."""
    total = 0.0
    for process in _tree(pid):
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


class ResourceSampler:
    """Samples a server's process tree while a load level runs (an asyncio task, every `interval_s`)."""

    def __init__(self, pid: int, interval_s: float = 0.5) -> None:
        self._pid = pid
        self._interval_s = interval_s
        self._rss: list[float] = []
        self._task: asyncio.Task[None] | None = None
        self._cpu_start = 0.0
        self._time_start = 0.0
        self.result: ResourceSample | None = None

    async def __aenter__(self) -> ResourceSampler:
        self._cpu_start = cpu_seconds(self._pid)
        self._time_start = time.perf_counter()
        self._task = asyncio.create_task(self._sample_forever())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._rss.append(rss_mb(self._pid))
        elapsed = time.perf_counter() - self._time_start
        cpu_used = cpu_seconds(self._pid) - self._cpu_start
        self.result = ResourceSample(
            cpu_percent_mean=round(100.0 * cpu_used / elapsed, 1) if elapsed > 0 else None,
            rss_mb_peak=max(self._rss),
            rss_mb_last=self._rss[-1],
        )

    async def _sample_forever(self) -> None:
        while True:
            self._rss.append(rss_mb(self._pid))
            await asyncio.sleep(self._interval_s)
