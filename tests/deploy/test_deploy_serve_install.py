"""The runtime image's install and start steps, replayed without Docker.

test_deploy_image.py builds the real image where a Docker daemon answers; this replay needs none and runs
everywhere. It does what the Dockerfile's runtime stage does, step for step: a fresh virtual environment;
the stage's `COPY` and `pip install` instructions (the serve lock, then the project), read from the
Dockerfile and run in order in a scratch directory; then `python -m service` from that environment on a
tiny model, probed with the image's healthcheck, and stopped with SIGTERM as `docker stop` does. A broken
install step, a lock that misses a runtime dependency or a service that needs torch fails here instead of
in a user's build.

Slow the first time only: the serve lock's wheels (~300 MB) are downloaded once into a wheelhouse outside
the repository (`CONVSERVE_WHEELHOUSE`, default ~/.cache/convserve/wheelhouse), hash-checked against the
lock; each run then installs from there with the package index switched off.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import venv
from collections.abc import Iterator
from pathlib import Path

import pytest
from deployfiles import DOCKERFILE, HEALTHCHECK_SCRIPT, REPO_ROOT, SERVE_LOCK, stages

from tests.liveserver import free_port
from tests.tinymodel import export_tiny_model

pytestmark = pytest.mark.slow

INSTALL_WORKDIR = "/opt/convserve/src"
START_TIMEOUT_S = 180.0
PIP_TIMEOUT_S = 900


def runtime_install_steps() -> list[str]:
    """The runtime stage's instructions from `WORKDIR /opt/convserve/src` up to the next WORKDIR."""
    stage = stages(DOCKERFILE.read_text(encoding="utf-8"))["runtime"]
    start = stage.index_of(f"WORKDIR {INSTALL_WORKDIR}") + 1
    steps = []
    for instruction in stage.instructions[start:]:
        if instruction.startswith("WORKDIR "):
            break
        steps.append(instruction)
    return steps


def wheelhouse_dir() -> Path:
    configured = os.environ.get("CONVSERVE_WHEELHOUSE")
    if configured:
        return Path(configured)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "convserve" / "wheelhouse"


def pip_download(wheelhouse: Path, *, offline: bool) -> str | None:
    """Put the serve lock's files and the project's build backend into `wheelhouse` (offline: only check
    that they are all there); pip's error output if that failed, else None. pip checks every file of the
    lock against its hashes either way."""
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    index = ["--no-index", "--find-links", str(wheelhouse)] if offline else []
    for arguments in (
        ["--require-hashes", "-r", str(SERVE_LOCK)],
        # `pip install --no-deps .` builds the project in an isolated environment that needs these.
        ["--no-deps", *pyproject["build-system"]["requires"]],
    ):
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--dest",
                str(wheelhouse),
                *index,
                *arguments,
            ],
            capture_output=True,
            text=True,
            timeout=PIP_TIMEOUT_S,
            check=False,
        )
        if result.returncode != 0:
            return result.stderr
    return None


def filled_wheelhouse() -> Path:
    """The wheelhouse, after downloading what the lock needs and it does not hold yet (on the first run
    after a lock change); otherwise nothing is fetched."""
    wheelhouse = wheelhouse_dir()
    wheelhouse.mkdir(parents=True, exist_ok=True)
    if pip_download(wheelhouse, offline=True) is not None:
        failure = pip_download(wheelhouse, offline=False)
        assert failure is None, f"could not fill the wheelhouse {wheelhouse}:\n{failure}"
    return wheelhouse


def replay(steps: list[str], workdir: Path, environment: Path, wheelhouse: Path) -> None:
    """Run COPY (from the repository) and RUN (with the new environment first on PATH, and pip reading
    only the wheelhouse) in `workdir`."""
    env = {
        "PATH": f"{environment / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": str(wheelhouse),
    }
    for step in steps:
        keyword, _, rest = step.partition(" ")
        if keyword == "COPY":
            *sources, destination = shlex.split(rest)
            if os.path.isabs(destination):
                continue  # files placed outside the install directory (models, healthcheck) are not needed
            assert not sources[0].startswith("--from="), f"the install steps copy from another stage: {step}"
            for source in sources:
                copy_into(REPO_ROOT / source, workdir / destination)
        elif keyword == "RUN":
            result = subprocess.run(
                rest,
                shell=True,
                cwd=workdir,
                env=env,
                capture_output=True,
                text=True,
                timeout=PIP_TIMEOUT_S,
                check=False,
            )
            assert result.returncode == 0, (
                f"Dockerfile step failed: RUN {rest}\n{result.stdout}\n{result.stderr}"
            )


def copy_into(source: Path, destination: Path) -> None:
    """Docker's COPY: a directory's contents into the destination directory, a file into it by name."""
    if source.is_dir():
        shutil.copytree(source, destination, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        destination.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, destination / source.name)


@pytest.fixture(scope="module")
def runtime_environment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A new environment holding what the runtime stage installs, removed afterwards (it is large)."""
    wheelhouse = filled_wheelhouse()
    root = tmp_path_factory.mktemp("runtime-image")
    environment = root / "venv"
    venv.create(environment, with_pip=True)
    workdir = root / "src"
    workdir.mkdir()
    try:
        replay(runtime_install_steps(), workdir, environment, wheelhouse)
        yield environment
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_runtime_install_steps_are_the_serve_lock_then_the_project() -> None:
    runs = [step for step in runtime_install_steps() if step.startswith("RUN ")]
    assert runs == ["RUN pip install --require-hashes -r serve.txt", "RUN pip install --no-deps ."]
    copies = [step for step in runtime_install_steps() if step.startswith("COPY ")]
    assert copies[0] == "COPY requirements/serve.txt ./"


def test_runtime_environment_has_the_service_but_no_torch_or_training(runtime_environment: Path) -> None:
    python = str(runtime_environment / "bin" / "python")
    modules = "('torch', 'torchvision', 'training')"
    probe = f"import importlib.util as u; print([m for m in {modules} if u.find_spec(m)])"
    found = subprocess.run([python, "-c", probe], cwd="/", capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "[]"
    service = subprocess.run(
        [python, "-c", "import service.app"], cwd="/", capture_output=True, text=True, check=False
    )
    assert service.returncode == 0, service.stderr


def test_python_m_service_from_the_runtime_environment_becomes_ready_and_stops_on_sigterm(
    runtime_environment: Path, tmp_path: Path
) -> None:
    repository = tmp_path / "models"
    export_tiny_model(repository)
    port = free_port()
    python = str(runtime_environment / "bin" / "python")
    env = {
        "PATH": f"{runtime_environment / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "PYTHONUNBUFFERED": "1",
        "CONVSERVE_MODEL_REPOSITORY": str(repository),
        "CONVSERVE_HOST": "127.0.0.1",
        "CONVSERVE_PORT": str(port),
        "CONVSERVE_GRPC_PORT": str(free_port()),
        "CONVSERVE_PROVIDERS": "cpu",
        "CONVSERVE_MAX_BATCH_SIZE": "4",
        "CONVSERVE_INTRA_OP_THREADS": "1",
    }
    log = tmp_path / "service.log"
    with log.open("w") as output:
        # cwd is outside the repository, so only the installed copy of `service` can be imported.
        process = subprocess.Popen(
            [python, "-m", "service"], cwd=tmp_path, env=env, stdout=output, stderr=subprocess.STDOUT
        )
        try:
            wait_until_healthy(python, port, process, log)
            process.send_signal(signal.SIGTERM)
            status = process.wait(timeout=60)
            # Uvicorn shuts down cleanly, then re-raises the signal it caught, so the process may end "killed
            # by SIGTERM" (Docker shows 143); either way the application's shutdown must have completed.
            assert status in (0, -signal.SIGTERM), log.read_text()
            assert "Application shutdown complete" in log.read_text()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


def wait_until_healthy(python: str, port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    """Poll with the image's own HEALTHCHECK command until it passes."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert process.poll() is None, f"python -m service exited early:\n{log.read_text()}"
        probe = subprocess.run(
            [python, str(HEALTHCHECK_SCRIPT)],
            env={"CONVSERVE_PORT": str(port)},
            capture_output=True,
            check=False,
        )
        if probe.returncode == 0:
            return
        time.sleep(0.5)
    pytest.fail(
        f"healthcheck did not pass within {START_TIMEOUT_S:.0f} s:\n{log.read_text()}\n{sys.executable}"
    )
