"""Fixtures for the service tests: a tiny real model exported with the training exporter, apps, servers.

The model is an untrained (seeded) LeNet-5 with 3 classes and 32x32 inputs, exported once per session
by `training.export.export_onnx` with real photos as parity inputs, so every test runs the real
ONNX Runtime on a real contract-conforming file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tritonclient.http as triton
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from service.app import create_app
from service.models.runtime import OnnxModel, load_model
from service.settings import Settings
from tests.liveserver import LiveServer, wait_ready
from tests.tinymodel import MODEL_NAME, export_tiny_model, tiny_settings


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with one model, `tiny`, version 1."""
    root = tmp_path_factory.mktemp("models")
    export_tiny_model(root)
    return root


@pytest.fixture(scope="session")
def tiny_model_path(model_repository: Path) -> Path:
    return model_repository / MODEL_NAME / "1" / "model.onnx"


@pytest.fixture(scope="session")
def tiny_model(tiny_model_path: Path) -> OnnxModel:
    return load_model(tiny_model_path, ["CPUExecutionProvider"], intra_op_threads=1)


@pytest.fixture
def make_settings(model_repository: Path) -> Callable[..., Settings]:
    """Settings for the session's tiny model on CPU; keyword arguments override fields."""

    def build(**overrides: Any) -> Settings:
        return tiny_settings(model_repository, **overrides)

    return build


@pytest.fixture
def client(make_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    """The real app (lifespan included) for the tiny model, ready, with a fresh metrics registry."""
    with TestClient(create_app(make_settings(), CollectorRegistry())) as test_client:
        wait_ready(test_client)
        yield test_client


@pytest.fixture
def triton_client() -> Iterator[Callable[[LiveServer], triton.InferenceServerClient]]:
    """`tritonclient.http` clients for live servers, closed when the test ends: a client left to the
    garbage collector leaves its sockets open, a `ResourceWarning` in whichever test runs next."""
    clients: list[triton.InferenceServerClient] = []

    def connect(live: LiveServer) -> triton.InferenceServerClient:
        clients.append(triton.InferenceServerClient(url=f"{live.host}:{live.port}"))
        return clients[-1]

    yield connect
    for client in clients:
        client.close()
