"""A benchmark run over the tiny model, for the tests of the scenarios that start their own services."""

from __future__ import annotations

from pathlib import Path

from benchmarks.performance.subjects import RunConfig
from tests.liveserver import REPO_ROOT
from tests.tinymodel import export_tiny_model


def tiny_run_config(tmp_path: Path, server: str) -> RunConfig:
    """A benchmark run of `server` over a repository holding the tiny model, on the CPU, one thread."""
    repository = tmp_path / "models"
    export_tiny_model(repository)
    return RunConfig(
        repo_root=REPO_ROOT,
        model_repository=repository,
        model_name=None,
        model_version=None,
        servers=(server,),
        service_env={"CONVSERVE_PROVIDERS": "cpu", "CONVSERVE_INTRA_OP_THREADS": "1"},
    )
