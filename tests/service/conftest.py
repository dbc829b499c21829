"""Fixtures for the service tests: a tiny real model exported with the training exporter, apps, servers.

The model is an untrained (seeded) LeNet-5 with 3 classes and 32x32 inputs, exported once per session
by `training.export.export_onnx` with real photos as parity inputs, so every test runs the real
ONNX Runtime on a real contract-conforming file.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from service.app import create_app
from service.models.runtime import OnnxModel, load_model
from service.settings import Settings
from service.transport.server import uvicorn_options
from tests.service.photos import TINY_LABELS
from tests.tinymodel import export_tiny, free_port

MODEL_NAME = "tiny"
READY_TIMEOUT_S = 60.0


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with one model, `tiny`, version 1."""
    root = tmp_path_factory.mktemp("models")
    export_tiny(root / MODEL_NAME / "1", TINY_LABELS)
    return root


@pytest.fixture(scope="session")
def tiny_model_path(model_repository: Path) -> Path:
    return model_repository / MODEL_NAME / "1" / "model.onnx"


@pytest.fixture(scope="session")
def tiny_model(tiny_model_path: Path) -> OnnxModel:
    return load_model(tiny_model_path, ["CPUExecutionProvider"], intra_op_threads=1)


def tiny_settings(repository: Path, **overrides: Any) -> Settings:
    """Settings for tiny models in `repository` on CPU: small batches and limits; `overrides` win."""
    fields: dict[str, Any] = {
        "model_repository": repository,
        "providers": ["cpu"],
        "max_batch_size": 4,
        "max_queue_size": 16,
        "max_queue_delay_ms": 2.0,
        "intra_op_threads": 1,
        "max_upload_bytes": 2 * 1024 * 1024,
    }
    return Settings(**{**fields, **overrides})


@pytest.fixture
def make_settings(model_repository: Path) -> Callable[..., Settings]:
    """Settings for the session's tiny model on CPU; keyword arguments override fields."""

    def build(**overrides: Any) -> Settings:
        return tiny_settings(model_repository, **overrides)

    return build


def wait_ready(client: Any, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Poll /readyz until 200 (warmup runs in the background after start-up)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if client.get("/readyz").status_code == 200:
            return
        time.sleep(0.02)
    raise TimeoutError(f"/readyz did not turn 200 within {timeout_s:.0f} s")


@pytest.fixture
def client(make_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    """The real app (lifespan included) for the tiny model, ready, with a fresh metrics registry."""
    with TestClient(create_app(make_settings(), CollectorRegistry())) as test_client:
        wait_ready(test_client)
        yield test_client


@dataclass(frozen=True)
class LiveServer:
    url: str
    host: str
    port: int
    app: FastAPI


@contextmanager
def live_server(
    settings: Settings,
    customize: Callable[[FastAPI], None] | None = None,
    client_options: dict[str, Any] | None = None,
) -> Iterator[LiveServer]:
    """`create_app(settings)` under a real uvicorn with the service's own options (protocol, limits,
    TLS) on a free loopback port, ready, until the block ends; `customize` may add routes to the app
    first; `client_options` (httpx: `verify`, `cert`) reach the readiness poll of a TLS server."""
    port = free_port()
    settings = settings.model_copy(update={"host": "127.0.0.1", "port": port})
    app = create_app(settings, CollectorRegistry())
    if customize is not None:
        customize(app)
    config = uvicorn.Config(app, **uvicorn_options(settings), log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="convserve-test-server", daemon=True)
    thread.start()
    scheme = "https" if settings.tls_certfile else "http"
    live = LiveServer(url=f"{scheme}://127.0.0.1:{port}", host="127.0.0.1", port=port, app=app)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if not thread.is_alive():
                raise RuntimeError("the server exited during start-up")
            with suppress(httpx.TransportError):
                if httpx.get(f"{live.url}/readyz", timeout=2, **(client_options or {})).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{live.url}/readyz never turned 200")
            time.sleep(0.05)
        yield live
    finally:
        server.should_exit = True
        thread.join(timeout=30)
