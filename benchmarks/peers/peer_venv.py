"""The BentoML peer's own virtualenv: built on demand, and how to start the peer from it.

BentoML pins its own pydantic, starlette, uvicorn and OpenTelemetry, which would fight the project's
lock, so the peer never shares the project's environment: it gets a venv of its own holding exactly
`bentoml-requirements.txt`, at `.venv/peers/bentoml`. Inside `.venv/`, everything that leaves the
project's venv alone (git, ruff, the docs tests' walk of the repository, `make clean`) treats the
peer's the same way, with no rule of its own. The venv is current when its stamp holds that file's
text; otherwise it is rebuilt from scratch, so a changed pin never leaves a mixed environment behind.
`make peers` (a prerequisite of `make bench`) and the benchmark itself, when run directly, call
`ensure`; `make test` never needs it.

Standard library only: this module runs before any of the peer's packages exist.

Run: `python -m benchmarks.peers.peer_venv [--venv DIR]`.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_VENV = REPO_ROOT / ".venv" / "peers" / "bentoml"
REQUIREMENTS = Path(__file__).with_name("bentoml-requirements.txt")
STAMP = ".stamp-requirements"
"""File in the venv holding the requirements text it was built from."""
MODEL_FILE_VARIABLE = "PEER_MODEL_FILE"
"""The variable naming the ONNX file the peer serves (a BentoML service class takes no arguments)."""
SERVICE = "benchmarks.peers.bento_service:ImageClassifier"
"""The peer as `bentoml serve` names it: module path from the repository root, then the class."""


def python_in(venv: Path) -> Path:
    return venv / "bin" / "python"


def is_current(venv: Path, requirements: Path = REQUIREMENTS) -> bool:
    """Whether `venv` was built from exactly the current `requirements` and still has its interpreter."""
    stamp = venv / STAMP
    return python_in(venv).exists() and stamp.exists() and stamp.read_text() == requirements.read_text()


def build_commands(
    venv: Path, requirements: Path = REQUIREMENTS, python: str = sys.executable
) -> list[list[str]]:
    """The commands that build `venv` from nothing: a venv, then every pin of `requirements` at once
    (one resolution, so pip refuses a set of pins that conflict instead of installing half of it)."""
    pip = [str(python_in(venv)), "-m", "pip"]
    return [
        [python, "-m", "venv", str(venv)],
        [*pip, "install", "--quiet", "--disable-pip-version-check", "-r", str(requirements)],
        [*pip, "check"],
    ]


def ensure(venv: Path = DEFAULT_VENV, requirements: Path = REQUIREMENTS) -> Path:
    """Build `venv` from `requirements` unless it is current; its interpreter.

    Raises `subprocess.CalledProcessError` when a step fails (pip's own message says which package);
    the half-built venv is removed so the next call starts clean."""
    if is_current(venv, requirements):
        return python_in(venv)
    log.info("building the BentoML peer's venv %s from %s (a few minutes, once)", venv, requirements)
    shutil.rmtree(venv, ignore_errors=True)
    try:
        for command in build_commands(venv, requirements):
            subprocess.run(command, check=True)
    except BaseException:
        shutil.rmtree(venv, ignore_errors=True)
        raise
    (venv / STAMP).write_text(requirements.read_text())
    return python_in(venv)


def serve_command(venv: Path, host: str, port: int) -> list[str]:
    """`bentoml serve` of the peer from `venv`, listening on `host:port`."""
    return [str(venv / "bin" / "bentoml"), "serve", SERVICE, "--host", host, "--port", str(port)]


def serve_env(model_file: Path, bentoml_home: Path, repo_root: Path = REPO_ROOT) -> Mapping[str, str]:
    """The peer's environment: its model, the repository on the import path, BentoML's state kept in
    `bentoml_home` (not the user's ~/bentoml) and no usage reports sent home."""
    return {
        MODEL_FILE_VARIABLE: str(model_file.resolve()),
        "PYTHONPATH": str(repo_root),
        "BENTOML_HOME": str(bentoml_home),
        "BENTOML_DO_NOT_TRACK": "true",
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--venv", type=Path, default=DEFAULT_VENV, help=f"where to build it (default: {DEFAULT_VENV})"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if is_current(args.venv):
        log.info("%s is current", args.venv)
        return
    try:
        ensure(args.venv)
    except subprocess.CalledProcessError as error:
        raise SystemExit(
            f"could not build {args.venv}: `{' '.join(error.cmd)}` failed (see above)"
        ) from error
    log.info("built %s", args.venv)


if __name__ == "__main__":
    main()
