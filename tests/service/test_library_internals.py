"""The library internals the service relies on, each checked where an upgrade would move it.

pyproject.toml pins the ranges these passed on (requirements/*.txt, the exact versions). When one of
these fails after an upgrade, the message names the module that depends on the internal: adapt that
module, or keep the library below the failing release in pyproject.toml and run `make lock`.
Behaviour end to end is tested elsewhere (tests/service/test_request_heads.py for the protocol's limits,
tests/service/test_server.py for the exit status after SIGTERM, tests/service/test_metrics_multiprocess.py
for the worker aggregation); these checks point at the cause.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httptools
import pytest
from onnxruntime.capi.onnxruntime_pybind11_state import EPFail, Fail
from prometheus_client import multiprocess
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.errors import StartupError
from service.metrics import _LIVE_GAUGE_FILE, MULTIPROCESS_DIR_ENV
from service.transport.protocol import HTTPTOOLS_CALLBACKS, GuardedHttpToolsProtocol, uvicorn_hook_problems
from service.transport.server import check_uvicorn_hooks

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_uvicorn_still_has_every_method_the_guarded_protocol_overrides() -> None:
    problems = uvicorn_hook_problems()
    assert not problems, (
        "service/transport/protocol.py overrides HttpToolsProtocol methods uvicorn no longer calls: "
        f"{problems}. Their limits would not apply; `python -m service` refuses to start"
    )


def test_the_hook_check_reports_an_override_uvicorn_does_not_have() -> None:
    class Renamed(GuardedHttpToolsProtocol):
        def on_headers_done(self) -> None:  # what a renamed uvicorn callback would leave behind
            pass

        def on_body(self, chunk: bytes, more: bool = False) -> None:  # type: ignore[override]
            pass

    problems = uvicorn_hook_problems(Renamed)
    assert problems == [
        "HttpToolsProtocol.on_headers_done is gone",
        "HttpToolsProtocol.on_body(self, body: 'bytes') -> 'None' no longer takes ['self', 'chunk', 'more']",
    ]
    assert all(name in vars(GuardedHttpToolsProtocol) for name in HTTPTOOLS_CALLBACKS)
    assert not any(hasattr(HttpToolsProtocol, name) for name in HTTPTOOLS_CALLBACKS), (
        "uvicorn's HttpToolsProtocol now defines the chunk callbacks service/transport/protocol.py adds; "
        "call super() in them and drop them from HTTPTOOLS_CALLBACKS"
    )


def test_check_uvicorn_hooks_passes_on_the_installed_uvicorn() -> None:
    try:
        check_uvicorn_hooks()
    except StartupError as exc:
        pytest.fail(f"python -m service would refuse to start: {exc}")


def test_httptools_calls_the_chunk_callbacks_on_a_protocol_that_defines_them() -> None:
    # service/transport/protocol.py bounds chunk framing through on_chunk_header / on_chunk_complete;
    # httptools looks them up on the protocol when the parser is built.
    events: list[object] = []

    class Recorder:
        def on_chunk_header(self) -> None:
            events.append("header")

        def on_chunk_complete(self) -> None:
            events.append("complete")

        def on_body(self, body: bytes) -> None:
            events.append(body)

    parser = httptools.HttpRequestParser(Recorder())
    parser.feed_data(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    assert events == ["header", b"abc", "complete", "header", b"de", "complete", "header", "complete"], (
        "httptools no longer reports chunk boundaries as service/transport/protocol.py expects; its limit "
        f"on tiny chunks would not apply (events: {events})"
    )


# Run in a child process: if uvicorn re-raised the signal after all, only the child dies of it.
_SIGTERM_CHILD = """
import os, signal, uvicorn
from service.transport.server import Server

async def app(scope, receive, send):
    pass

server = Server(uvicorn.Config(app=app, log_config=None))
with server.capture_signals():
    os.kill(os.getpid(), signal.SIGTERM)
    assert server.should_exit, "uvicorn's signal handler did not ask the server to exit"
print("survived")
"""


def test_a_sigterm_captured_while_serving_is_not_re_raised_after_the_drain() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _SIGTERM_CHILD],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0 and result.stdout.strip() == "survived", (
        "service/transport/server.py clears uvicorn.Server._captured_signals so a drained SIGTERM exits 0; "
        f"with this uvicorn the process ended with {result.returncode} "
        f"({'killed by SIGTERM' if result.returncode == -signal.SIGTERM else result.stderr.strip()})"
    )


_GAUGE_CHILD = """
from prometheus_client import CollectorRegistry, Counter, Gauge
registry = CollectorRegistry()
Counter("c", "c", registry=registry).inc()
for mode in ("livesum", "livemax", "liveall", "sum"):
    Gauge("g_" + mode, "g", registry=registry, multiprocess_mode=mode).set(1)
import os
print(os.getpid())
"""


def test_prometheus_live_gauge_files_carry_the_pid_metrics_reads_and_mark_process_dead_removes(
    tmp_path: Path,
) -> None:
    # service/metrics.py finds a dead worker's live gauges by these file names (forget_dead_workers).
    # prometheus-client picks its multiprocess storage at import, so a child process writes the files.
    env = {**os.environ, MULTIPROCESS_DIR_ENV: str(tmp_path)}
    child = subprocess.run(
        [sys.executable, "-c", _GAUGE_CHILD], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    pid = int(child.stdout.strip())
    names = sorted(path.name for path in tmp_path.iterdir())
    live = {name for name in names if (match := _LIVE_GAUGE_FILE.match(name)) and int(match.group(1)) == pid}
    assert live == {f"gauge_{mode}_{pid}.db" for mode in ("livesum", "livemax", "liveall")}, (
        "prometheus-client's multiprocess file names changed; service/metrics.py (_LIVE_GAUGE_FILE) would "
        f"no longer find dead workers' live gauges. Files: {names}"
    )
    multiprocess.mark_process_dead(pid, str(tmp_path))
    assert not live & {path.name for path in tmp_path.iterdir()}, (
        "prometheus_client.multiprocess.mark_process_dead no longer removes a worker's live gauge files"
    )


def test_onnxruntime_still_names_a_provider_failure_during_a_run_as_runtime_catches_it() -> None:
    # service/models/runtime.py catches EPFail from a GPU session's run (its own fallback is disabled)
    # to log, count and decide; were the class gone, the runtime module would not even import.
    assert issubclass(EPFail, Exception) and EPFail is not Fail
