"""Fixtures for the page tests: the tiny model's repository, and a headless Chromium per module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser

from tests.explainmodel import EXPLAIN_MODEL_NAME, export_explainable
from tests.liveserver import LiveServer, live_server
from tests.tinymodel import export_tiny_model, tiny_settings
from tests.ui.browser import INFERENCE_TOKEN, NO_CHROMIUM, chromium, find_chromium


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two models, version 1 each: `tiny`, which cannot be explained (LeNet flattens its feature map),
    and `seeing`, which can."""
    root = tmp_path_factory.mktemp("models")
    export_tiny_model(root)
    export_explainable(root / EXPLAIN_MODEL_NAME / "1")
    return root


@pytest.fixture(scope="module")
def server(model_repository: Path) -> Iterator[LiveServer]:
    """Both models, behind an inference token."""
    with live_server(tiny_settings(model_repository, inference_token=INFERENCE_TOKEN)) as live:
        yield live


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    # Per module, not per session: Playwright's sync API keeps an event loop running on this thread
    # while it is open, so tests collected after it that call asyncio.run would fail.
    executable = find_chromium()
    if executable is None:  # the browser modules skip before they ask for this
        pytest.fail(NO_CHROMIUM)
    with chromium(executable) as launched:
        yield launched
