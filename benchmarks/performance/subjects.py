"""What one benchmark run serves and how each server under test is started.

`RunConfig` is what the command line asked for; `ServedModel` the model version it resolved to;
the `*_process` functions build the server processes (the service in each configuration the run
compares, the naive peer, the BentoML peer), each on a free loopback port with its log in the run's
log folder.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common.processes import LOOPBACK, ServerProcess, free_port, python_module_command
from benchmarks.peers import naive_server, peer_venv
from benchmarks.performance.int8 import Int8Variant, given_variant, quantize_copy
from service.models.repository import ModelLocation, scan
from training.modelfile import read_metadata


@dataclass(frozen=True)
class RunConfig:
    """Where the model is and what to run; built by the command line."""

    repo_root: Path
    model_repository: Path
    model_name: str | None
    model_version: int | None
    servers: tuple[str, ...]
    service_env: Mapping[str, str] = field(default_factory=dict)
    """Extra `CONVSERVE_*` variables for both service runs (e.g. to try another setting)."""
    command: str = "python -m benchmarks"
    profile: bool = True
    """Also profile the service with py-spy at concurrency 32 (an extra, unrecorded level)."""
    int8_model: Path | None = None
    """An existing INT8 version directory to serve as the INT8 variant; None = quantize a copy."""


@dataclass(frozen=True)
class ServedModel:
    repository: Path
    name: str
    version: int
    path: Path
    """The ONNX file."""
    backbone: str
    input_shape: list[int]


def resolve_model(config: RunConfig) -> ServedModel:
    """The one model version the benchmark serves: `--model-name`/`--model-version`, else the only
    model in the repository at its newest complete version (the service serves them all now)."""
    root = config.model_repository
    found = {
        name: versions
        for name, versions in scan(root, [config.model_name] if config.model_name else None).items()
        if versions
    }
    if not found:
        raise SystemExit(f"no model with a complete version in {root}/ (run `make model`)")
    if len(found) > 1:
        raise SystemExit(f"{root}/ holds several models {sorted(found)}; choose one with --model-name")
    name, versions = next(iter(found.items()))
    version = config.model_version or versions[-1]
    if version not in versions:
        raise SystemExit(f"{name} has no complete version {version}; it has {versions}")
    path = ModelLocation(name, version).path(root)
    metadata = read_metadata(path)
    return ServedModel(
        root,
        name,
        version,
        path,
        metadata.backbone,
        list(metadata.input_shape),
    )


# Every run of `python -m service` the benchmark makes, as the settings it overrides (`service` and
# `int8` run the defaults). `instances`: one single-threaded batch per core (Triton's instance count)
# instead of one batch on every core.
VARIANT_SETTINGS: dict[str, dict[str, str]] = {
    "service": {},
    "soak": {},  # the service's leak check, on a server of its own
    "int8": {},
    "unbatched": {"CONVSERVE_MAX_BATCH_SIZE": "1"},
    "instances": {
        "CONVSERVE_INSTANCES": str(max(1, os.cpu_count() or 1)),
        "CONVSERVE_INTRA_OP_THREADS": "1",
    },
    "protocols": {},
    "memory": {},
}


def service_env_for(config: RunConfig, model: ServedModel, port: int, name: str) -> dict[str, str]:
    return {
        "CONVSERVE_MODEL_REPOSITORY": str(model.repository),
        "CONVSERVE_MODEL_NAME": model.name,
        "CONVSERVE_MODEL_VERSION": str(model.version),
        "CONVSERVE_HOST": LOOPBACK,
        "CONVSERVE_PORT": str(port),
        # Every run serves gRPC too, as the defaults do, on a port of its own.
        "CONVSERVE_GRPC_PORT": str(free_port()),
        **config.service_env,
        **VARIANT_SETTINGS[name],
    }


def service_process(config: RunConfig, model: ServedModel, log_dir: Path, name: str) -> ServerProcess:
    port = free_port()
    return ServerProcess(
        name=name,
        command=python_module_command("service"),
        env=service_env_for(config, model, port, name),
        port=port,
        log_path=log_dir / f"{name}.log",
    )


def naive_process(model: ServedModel, log_dir: Path) -> ServerProcess:
    port = free_port()
    return ServerProcess(
        name="naive",
        command=python_module_command(
            naive_server.__name__,
            "--model-file",
            str(model.path),
            "--host",
            LOOPBACK,
            "--port",
            str(port),
        ),
        env={},
        port=port,
        log_path=log_dir / "naive.log",
        ready_path="/health",
    )


def bento_process(model: ServedModel, log_dir: Path, venv: Path) -> ServerProcess:
    """The BentoML peer (`benchmarks.peers.bento_service`) from its own venv, serving the same ONNX file."""
    port = free_port()
    return ServerProcess(
        name="bento",
        command=peer_venv.serve_command(venv, LOOPBACK, port),
        env=peer_venv.serve_env(model.path, log_dir / "bentoml-home"),
        port=port,
        log_path=log_dir / "bento.log",
        ready_path="/readyz",
        # `bentoml serve` resolves the service's module path from its working directory.
        cwd=peer_venv.REPO_ROOT,
    )


def prepare_int8(config: RunConfig, model: ServedModel, repository: Path, log_dir: Path) -> Int8Variant:
    if config.int8_model is not None:
        return given_variant(config.int8_model)
    return quantize_copy(
        model.path.parent, model.name, repository, log_dir / "quantize.log", cwd=config.repo_root
    )


def int8_model(variant: Int8Variant, fp32: ServedModel) -> ServedModel:
    path = variant.path / fp32.path.name
    return ServedModel(
        variant.repository, variant.name, variant.version, path, fp32.backbone, fp32.input_shape
    )
