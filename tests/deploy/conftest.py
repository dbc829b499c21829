"""Fixtures for the deployment checks: the compose files as loaded YAML, and a live tiny service."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from deployfiles import COMPOSE_CPU_FILE, COMPOSE_FILE, load_compose
from dockerimage import FIGURES

from tests import liveserver
from tests.liveserver import LiveServer
from tests.tinymodel import export_tiny_model, tiny_settings


@pytest.fixture(scope="session")
def compose() -> dict[str, Any]:
    return load_compose(COMPOSE_FILE)


@pytest.fixture(scope="session")
def compose_cpu() -> dict[str, Any]:
    return load_compose(COMPOSE_CPU_FILE)


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The real service on a free loopback port, serving a tiny exported LeNet-5."""
    repository = tmp_path_factory.mktemp("models")
    export_tiny_model(repository)
    with liveserver.live_server(tiny_settings(repository)) as server:
        yield server


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The image test's figures (size, build and start times, `docker stop` under load), when it ran."""
    if FIGURES:
        terminalreporter.section("convserve image")
        for name, value in FIGURES.items():
            terminalreporter.write_line(f"{name}: {value}")
