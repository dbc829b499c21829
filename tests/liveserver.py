"""The one way tests start a real server: the service under real uvicorn, on a loopback port, ready.

Two modes, sharing the port, readiness and error reporting:

- `live_server(settings)` runs `create_app(settings)` in this process, on a uvicorn thread built
  from the production `service.transport.server.uvicorn_options(settings)` and `Server` (the guarded
  protocol class, header and body limits, connection cap, graceful-shutdown timeout, TLS). The test
  can reach into `LiveServer.app` (its state, its executors) and add routes before the start.
- `service_process(env)` runs `python -m service` (or another command) as a subprocess configured
  through `CONVSERVE_*` variables, for what only a whole process shows: exit statuses, signals,
  worker processes, the log.

A subprocess also serves the KServe V2 gRPC API on a free port of its own (`ServiceProcess.grpc_url`);
an in-process server does when the test asks (`live_server(settings, grpc=True)`, `LiveServer.grpc_url`),
beside the test's own `tritonclient.grpc`.

Both yield only once `GET /readyz` answers 200 (the model loaded and warmed up) and fail with the
reason (an exception from the app start, the process's exit status and log) when the server exits
or stays unready. Both stop the server at the end of the block and wait for it to have stopped.

    with live_server(make_settings(max_batch_size=8)) as live:
        httpx.post(f"{live.url}/predict", json=...)

    with service_process(service_env(repository, WORKERS="2"), log_path=tmp_path / "log") as server:
        server.process.send_signal(signal.SIGTERM)
        assert server.wait(timeout_s=30) == 0, server.log()
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from service.app import create_app
from service.settings import Settings
from service.transport.server import Server, uvicorn_options
from tests.waiting import wait_until

LOOPBACK = "127.0.0.1"
READY_TIMEOUT_S = 120.0
"""How long a start may take: the model load and warm-up, on a busy CI runner; a healthy start of the
tiny model takes well under a second, so only a broken start ever waits this long."""
STOP_TIMEOUT_S = 30.0
"""How long a subprocess may take to stop after SIGTERM before its process group is killed."""
_STOP_MARGIN_S = 10.0
"""Seconds an in-process server may take beyond its own graceful-shutdown timeout to stop."""
REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for servers that bind it themselves;
    `live_server` binds its socket before starting instead, so no other process can take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def wait_ready(client: httpx.Client, exited: Callable[[], str | None] = lambda: None) -> None:
    """Poll `GET /readyz` through `client` (a `TestClient` too) until it answers 200.

    `exited()` returns why the server has gone (the test fails at once with that reason), or None
    while it runs. Connection errors count as not ready yet: the server may still be binding.
    """

    def ready() -> bool:
        reason = exited()
        if reason is not None:
            raise RuntimeError(f"the server exited during start-up: {reason}")
        with suppress(httpx.TransportError):
            return client.get("/readyz").status_code == 200
        return False

    wait_until(ready, f"{client.base_url}readyz answering 200", timeout_s=READY_TIMEOUT_S)


@dataclass(frozen=True)
class LiveServer:
    """A running in-process server: where to reach it, and its app (`app.state.convserve` and all)."""

    url: str
    """`http://127.0.0.1:PORT`, or `https://…` when the settings configure TLS."""
    host: str
    port: int
    app: FastAPI
    thread: threading.Thread
    """The thread running the server's event loop (whose CPU clock a cost test reads, say)."""
    grpc_port: int = 0
    """The KServe V2 gRPC port (0: gRPC off, the default of `live_server`)."""

    @property
    def grpc_url(self) -> str:
        """`127.0.0.1:PORT`, the form `tritonclient.grpc.InferenceServerClient(url=...)` takes."""
        assert self.grpc_port, "this server serves no gRPC; start it with live_server(..., grpc=True)"
        return f"{self.host}:{self.grpc_port}"


@contextmanager
def live_server(
    settings: Settings,
    *,
    grpc: bool = False,
    customize: Callable[[FastAPI], None] | None = None,
    client_options: Mapping[str, Any] | None = None,
) -> Iterator[LiveServer]:
    """`create_app(settings)` (fresh metrics registry) under the production uvicorn options and
    `Server`, on a free loopback port, ready, until the block ends.

    `settings.host` and `.port` are replaced by the loopback port chosen here, and `.grpc_port` by
    another free port with `grpc=True` (gRPC then listens before the server is ready), else by 0:
    whatever port the settings name, tests never bind a fixed one. `customize(app)` runs before the
    start (to add a test route, say). `client_options` are httpx keyword arguments for the readiness
    poll, e.g. `verify` and `cert` for a TLS server.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn's own bind does
    listener.bind((LOOPBACK, 0))
    port = int(listener.getsockname()[1])
    grpc_port = free_port() if grpc else 0
    settings = settings.model_copy(update={"host": LOOPBACK, "port": port, "grpc_port": grpc_port})
    app = create_app(settings, CollectorRegistry())
    if customize is not None:
        customize(app)
    options = uvicorn_options(settings)
    server = Server(uvicorn.Config(app, **options, log_level="warning"))
    stop_timeout_s = float(options["timeout_graceful_shutdown"]) + _STOP_MARGIN_S
    failure: list[BaseException] = []

    def run() -> None:
        try:
            server.run(sockets=[listener])
        except BaseException as exc:  # SystemExit from a failed app start, too: reported, not lost
            failure.append(exc)

    thread = threading.Thread(target=run, name="convserve-live-server", daemon=True)
    scheme = "https" if settings.tls_certfile else "http"
    live = LiveServer(
        url=f"{scheme}://{LOOPBACK}:{port}",
        host=LOOPBACK,
        port=port,
        app=app,
        thread=thread,
        grpc_port=grpc_port,
    )

    def exited() -> str | None:
        if thread.is_alive():
            return None
        return repr(failure[0]) if failure else "uvicorn returned; see the captured log"

    with listener:
        thread.start()
        try:
            with httpx.Client(base_url=live.url, timeout=2, **(client_options or {})) as client:
                wait_ready(client, exited)
            yield live
        finally:
            server.should_exit = True
            thread.join(stop_timeout_s)
            # A server that does not stop would keep its port and threads for the rest of the session.
            assert not thread.is_alive(), f"the server at {live.url} did not stop within {stop_timeout_s} s"
            assert not failure, f"the server at {live.url} failed: {failure[0]!r}"


def service_env(model_repository: Path, **variables: str) -> dict[str, str]:
    """`CONVSERVE_*` variables for the models in `model_repository` on CPU; `variables` are added
    without the prefix (`WORKERS="2"` sets `CONVSERVE_WORKERS=2`)."""
    env = {"CONVSERVE_MODEL_REPOSITORY": str(model_repository), "CONVSERVE_PROVIDERS": "cpu"}
    env.update({f"CONVSERVE_{name}": value for name, value in variables.items()})
    return env


def process_env(env: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without its `CONVSERVE_*` variables (a developer's shell settings
    must not reach the server under test), plus `env`."""
    inherited = {name: value for name, value in os.environ.items() if not name.startswith("CONVSERVE_")}
    return {**inherited, **env}


def run_service(env: Mapping[str, str], timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    """`python -m service` with `env` (as in `service_process`) run to its end, output captured: for
    starts that must fail. A start that does not end within `timeout_s` raises
    `subprocess.TimeoutExpired`."""
    return subprocess.run(
        [sys.executable, "-m", "service"],
        cwd=REPO_ROOT,
        env=process_env(
            {
                "CONVSERVE_GRPC_PORT": str(free_port()),  # never the default port another server may hold
                **env,
                "CONVSERVE_HOST": LOOPBACK,
                "CONVSERVE_PORT": str(free_port()),
            }
        ),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


@dataclass(frozen=True)
class ServiceProcess:
    """A running server subprocess (the leader of its own process group) and its combined log."""

    process: subprocess.Popen[bytes]
    host: str
    port: int
    grpc_port: int
    """The KServe V2 gRPC port (0: gRPC off)."""
    log_path: Path
    """stdout and stderr of the process and its workers, as written so far."""
    scheme: str = "http"
    """`https` when the environment configures TLS."""

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    @property
    def grpc_url(self) -> str:
        """`127.0.0.1:PORT`, the form `tritonclient.grpc.InferenceServerClient(url=...)` takes."""
        return f"{self.host}:{self.grpc_port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout_s: float) -> int:
        """The exit status once the process has exited (negative: the signal that ended it); raises
        `subprocess.TimeoutExpired` if it is still running after `timeout_s`."""
        return self.process.wait(timeout=timeout_s)


def _stop_process_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the service's graceful stop) if still running; SIGKILL the whole group if that does not
    end it in time, and always reap the group, so no worker outlives the test."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            process.wait(timeout=STOP_TIMEOUT_S)
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@contextmanager
def service_process(
    env: Mapping[str, str],
    *,
    log_path: Path,
    command: Callable[[int], Sequence[str]] | None = None,
    cwd: Path = REPO_ROOT,
    client_options: Mapping[str, Any] | None = None,
) -> Iterator[ServiceProcess]:
    """`python -m service` in a subprocess on a free loopback port, ready, until the block ends.

    `env` is added to this process's environment minus its `CONVSERVE_*` variables (`service_env`
    builds one); `CONVSERVE_HOST` and `CONVSERVE_PORT` are set here, and `CONVSERVE_GRPC_PORT` to
    another free port unless `env` sets it. `command(port)` replaces
    `python -m service` with another server's argv (it must listen on 127.0.0.1:`port` and answer
    `/readyz`). stdout and stderr go to `log_path` (say `tmp_path / "service.log"`), which outlives
    the block for the assertions and post-mortems. At the end a still-running
    process gets SIGTERM, then its process group SIGKILL after `STOP_TIMEOUT_S`. With
    `CONVSERVE_TLS_CERTFILE` in `env` the server is polled over HTTPS; `client_options` are httpx
    keyword arguments for that poll (`verify`, `cert`), as in `live_server`.
    """
    port = free_port()
    grpc_port = int(env["CONVSERVE_GRPC_PORT"]) if "CONVSERVE_GRPC_PORT" in env else free_port()
    argv = list(command(port)) if command is not None else [sys.executable, "-m", "service"]
    full_env = process_env(
        {
            **env,
            "CONVSERVE_HOST": LOOPBACK,
            "CONVSERVE_PORT": str(port),
            "CONVSERVE_GRPC_PORT": str(grpc_port),
        }
    )
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            argv,
            cwd=cwd,
            env=full_env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the stop reaches its workers too
        )
    scheme = "https" if env.get("CONVSERVE_TLS_CERTFILE") else "http"
    server = ServiceProcess(
        process=process, host=LOOPBACK, port=port, grpc_port=grpc_port, log_path=log_path, scheme=scheme
    )

    def exited() -> str | None:
        if process.poll() is None:
            return None
        return f"exit status {process.returncode}; log:\n{server.log()}"

    try:
        with httpx.Client(base_url=server.url, timeout=2, **(client_options or {})) as client:
            wait_ready(client, exited)
        yield server
    finally:
        _stop_process_group(process)
