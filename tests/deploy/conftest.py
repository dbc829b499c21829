"""Fixtures for the deployment checks: the compose files as loaded YAML."""

from __future__ import annotations

from typing import Any

import pytest
from deployfiles import COMPOSE_CPU_FILE, COMPOSE_FILE, load_compose


@pytest.fixture(scope="session")
def compose() -> dict[str, Any]:
    return load_compose(COMPOSE_FILE)


@pytest.fixture(scope="session")
def compose_cpu() -> dict[str, Any]:
    return load_compose(COMPOSE_CPU_FILE)
