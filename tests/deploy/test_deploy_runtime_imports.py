"""The runtime image installs only the `serve` extra and copies service/ and convserve/ (not training/):
both must import without any training-only package and without the training package itself."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from importlib import metadata

from deployfiles import REPO_ROOT

# Imports every service submodule (not __main__, which would start the server) with the given top-level
# modules made unimportable, then prints what it imported.
_IMPORT_SCRIPT = """
import importlib, importlib.abc, json, pkgutil, sys

blocked = set(json.loads(sys.argv[1]))

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ImportError(f"{name} is not installed in the runtime image (only the serve extra is)")
        return None

sys.meta_path.insert(0, Block())
import convserve, service
imported = []
for package in (service, convserve):
    for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if module.name.split(".")[-1] == "__main__":
            continue
        importlib.import_module(module.name)
        imported.append(module.name)
print(json.dumps(imported))
"""


def _requirement_name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9._-]+", requirement)
    assert match, requirement
    return match.group(0).lower().replace("_", "-")


def train_only_modules() -> set[str]:
    """Top-level modules of distributions in the `train` extra but in neither the base nor `serve`."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    runtime = {
        _requirement_name(r) for r in project["dependencies"] + project["optional-dependencies"]["serve"]
    }
    train_only = {_requirement_name(r) for r in project["optional-dependencies"]["train"]} - runtime
    modules = {"training"}
    for module, distributions in metadata.packages_distributions().items():
        if any(d.lower().replace("_", "-") in train_only for d in distributions):
            modules.add(module)
    return modules


def test_blocked_set_covers_torch_and_training() -> None:
    # onnx is a serving dependency (`convserve import` edits graphs), so it is not blocked.
    assert {"torch", "torchvision", "training"} <= train_only_modules()
    assert "onnx" not in train_only_modules()


def test_every_service_module_imports_without_training_only_packages() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_SCRIPT, json.dumps(sorted(train_only_modules()))],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"a service module needs a train-only package:\n{result.stderr}"
    imported = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"service.settings", "convserve.importer", "convserve.cli"} <= set(imported)
