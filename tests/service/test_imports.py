"""The service runs from the `serve` extra alone: nothing in it may need torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

# `sys.modules[name] = None` makes any `import name` raise ImportError, as if it were not installed.
PROBE = """
import sys
for blocked in ("torch", "torchvision", "timm", "training"):
    sys.modules[blocked] = None
import service.__main__, service.app, service.inference.preprocessing, service.models.runtime
loaded = sorted(name for name, mod in sys.modules.items() if mod is not None and name.startswith("torch"))
print("torch modules loaded:", loaded)
assert not loaded
"""


def test_service_imports_with_torch_and_training_unavailable() -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "torch modules loaded: []" in result.stdout
