"""Building and running the real image for the image test: base images, build arguments, containers.

The build arguments come from the environment (the Makefile passes BUILD_BASE, RUNTIME_BASE and
TORCH_INDEX_URL) and default to the real CPU variant: the Dockerfile's build base and torch index, and
docker-compose.cpu.yml's runtime base. A base image that is neither on the machine nor pullable is
replaced by the local stand-in that ../shared/tools/docker-offline-bases.sh builds; an unreachable torch
index by PyPI (whose torch is the CUDA build, ~4 GB, cached as a layer). Each substitution is reported.
"""

from __future__ import annotations

import os
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from deployfiles import COMPOSE_CPU_FILE, DOCKERFILE, REPO_ROOT, arg_defaults, load_compose

from tests.liveserver import free_port as _free_port

IMAGE_TAG = "convserve:image-test"
ENABLE_HINT = (
    "run `bash ../shared/tools/docker-offline-bases.sh` as root (starts dockerd, builds local base images) "
    "or start Docker, then `make image-test`"
)
STAND_INS = {"BUILD_BASE": "local/python:3.11-bookworm", "RUNTIME_BASE": "local/debian:bookworm"}
PYPI_SIMPLE = "https://pypi.org/simple"
# A cold build downloads torch and the serve/train dependencies (~5 GB from PyPI) and exports the default
# model: 445 s on the 2-core development machine. A warm layer cache rebuilds only what changed. The budget
# leaves a slow mirror 3x that, and still fits CI's 90 minutes beside the rest of `make test`.
DEFAULT_BUILD_BUDGET_S = 1500.0
# Figures the terminal summary prints (conftest.py), filled in as the image tests run.
FIGURES: dict[str, str] = {}


def docker_unavailable() -> str | None:
    """Why no Docker daemon can be used here, or None when one answers."""
    try:
        result = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=20, check=False)
    except FileNotFoundError:
        return "the docker CLI is not installed"
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer within 20 s"
    return None if result.returncode == 0 else "no Docker daemon answers `docker info`"


def docker(*args: str, timeout: float = 120.0, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def image_available(name: str) -> bool:
    if docker("image", "inspect", name, check=False).returncode == 0:
        return True
    return docker("pull", name, timeout=300, check=False).returncode == 0


def _url_reachable(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=10):
            return True
    except urllib.error.HTTPError:
        return True  # the server answered; pip will see the same
    except (urllib.error.URLError, OSError):
        return False


@dataclass
class BuildPlan:
    """The build arguments to use and what was substituted on the way."""

    args: dict[str, str]
    notes: list[str] = field(default_factory=list)


def build_plan() -> BuildPlan:
    """Requested (or real) build arguments, with stand-ins where the real ones are out of reach."""
    dockerfile_args = arg_defaults(DOCKERFILE.read_text(encoding="utf-8"))
    cpu_args = load_compose(COMPOSE_CPU_FILE)["services"]["service"]["build"]["args"]
    defaults = {
        "BUILD_BASE": dockerfile_args["BUILD_BASE"],
        "RUNTIME_BASE": cpu_args["RUNTIME_BASE"],
        "TORCH_INDEX_URL": dockerfile_args["TORCH_INDEX_URL"],
    }
    plan = BuildPlan({name: os.environ.get(name) or value for name, value in defaults.items()})
    for name, stand_in in STAND_INS.items():
        wanted = plan.args[name]
        if not image_available(wanted):
            if docker("image", "inspect", stand_in, check=False).returncode != 0:
                raise LookupError(f"base image {wanted} is not here and cannot be pulled, nor is {stand_in}")
            plan.args[name] = stand_in
            plan.notes.append(f"{name}={stand_in} ({wanted} cannot be pulled)")
    if not _url_reachable(plan.args["TORCH_INDEX_URL"]):
        plan.notes.append(f"TORCH_INDEX_URL={PYPI_SIMPLE} ({plan.args['TORCH_INDEX_URL']} unreachable)")
        plan.args["TORCH_INDEX_URL"] = PYPI_SIMPLE
    return plan


def build_image(plan: BuildPlan, budget_s: float) -> float:
    """Build the runtime stage with the legacy builder (BuildKit's frontend cannot be pulled); seconds."""
    command = ["docker", "build", "--network", "host", "-t", IMAGE_TAG]
    for name, value in plan.args.items():
        command += ["--build-arg", f"{name}={value}"]
    start = time.monotonic()
    try:
        result = subprocess.run(
            [*command, str(REPO_ROOT)],
            env={**os.environ, "DOCKER_BUILDKIT": "0"},
            capture_output=True,
            text=True,
            timeout=budget_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"the image build exceeded its budget of {budget_s:.0f} s (IMAGE_BUILD_BUDGET_S). A cold build "
            "downloads ~5 GB; warm the layer cache once with `make image-test`, or raise the budget"
        ) from None
    tail = "\n".join((result.stdout + result.stderr).splitlines()[-40:])
    assert result.returncode == 0, f"docker build failed:\n{' '.join(command)}\n{tail}"
    return time.monotonic() - start


def image_size_bytes() -> int:
    return int(docker("image", "inspect", "-f", "{{.Size}}", IMAGE_TAG).stdout.strip())


@dataclass(frozen=True)
class Container:
    """A running container of the image, on the host network."""

    name: str
    port: int
    started_at: float
    grpc_port: int = 0
    """The V2 gRPC port (host networking: the container's own)."""
    ready_s: float | None = None  # seconds from `docker run` to /readyz 200, once known

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def logs(self) -> str:
        result = docker("logs", self.name, check=False)
        return result.stdout + result.stderr

    def inspect(self, template: str) -> str:
        return docker("inspect", "-f", template, self.name).stdout.strip()

    def exec(self, *command: str) -> str:
        return docker("exec", self.name, *command).stdout


@contextmanager
def run_container(port: int, env: dict[str, str], extra: tuple[str, ...] = ()) -> Iterator[Container]:
    """`docker run` the image with the hardening the Kubernetes manifests apply; removed afterwards.

    Read-only root filesystem with a tmpfs at /tmp (the one writable path the manifests mount), all
    capabilities dropped, no privilege escalation: if the service needed more, the test would show it.
    """
    name = f"convserve-image-test-{uuid.uuid4().hex[:8]}"
    # Host networking: the gRPC port too must be one nobody else holds (8001 is one per machine).
    grpc_port = int(env.get("CONVSERVE_GRPC_PORT") or _free_port())
    settings = {
        "CONVSERVE_PORT": str(port),
        "CONVSERVE_GRPC_PORT": str(grpc_port),
        "CONVSERVE_PROVIDERS": "cpu",
        **env,
    }
    command = ["run", "-d", "--name", name, "--network", "host", "--read-only", "--tmpfs", "/tmp"]
    command += ["--cap-drop", "ALL", "--security-opt", "no-new-privileges", *extra]
    for key, value in settings.items():
        command += ["-e", f"{key}={value}"]
    started_at = time.monotonic()
    docker(*command, IMAGE_TAG)
    try:
        yield Container(name=name, port=port, started_at=started_at, grpc_port=grpc_port)
    finally:
        docker("rm", "-f", name, check=False)


def wait_for(condition_name: str, check: Callable[[], bool], timeout_s: float, container: Container) -> float:
    """Poll `check()` until it is true; seconds since the container started. Fails with the log."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return time.monotonic() - container.started_at
        if container.inspect("{{.State.Running}}") != "true":
            raise AssertionError(f"the container exited before {condition_name}:\n{container.logs()}")
        time.sleep(0.5)
    raise AssertionError(f"no {condition_name} within {timeout_s:.0f} s:\n{container.logs()}")
