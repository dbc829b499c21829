"""Results files: JSON written whole or not at all."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def write_json(results: Mapping[str, Any], path: Path) -> None:
    """Write atomically (temp file + rename) so a crash never leaves half a results file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
    temporary.replace(path)


def read_json(path: Path) -> dict[str, Any]:
    """A results file written by `write_json`; says which file and why when it cannot be read."""
    try:
        loaded = json.loads(path.read_text())
    except FileNotFoundError:
        raise SystemExit(f"no results file at {path}: run the benchmark first, or pass --output") from None
    except json.JSONDecodeError as error:
        raise SystemExit(f"{path} is not a results JSON: {error}") from None
    if not isinstance(loaded, dict):
        raise SystemExit(f"{path} is not a results JSON: it holds a {type(loaded).__name__}")
    return loaded
