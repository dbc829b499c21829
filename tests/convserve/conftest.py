"""Fixtures shared by the `convserve import` tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def labels(tmp_path: Path) -> Path:
    """Three labels (cat, dog, bird) as a text file, with a blank line and padding the reader ignores."""
    path = tmp_path / "labels.txt"
    path.write_text("cat\n\ndog\n  bird  \n")
    return path
