"""The lock files in requirements/ against pyproject.toml, each other and the environment running the tests.

`make`, CI and the Dockerfile install only from these files (see requirements/lock.sh). They go stale
silently when pyproject.toml changes and nobody runs `make lock`; these checks make that loud.
"""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from deployfiles import DEV_LOCK, REPO_ROOT, SERVE_LOCK, TRAIN_LOCK, LockedPackage, lock_entries
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# The platform the locks are compiled for (lock.sh: Linux x86_64, Python 3.11).
LOCK_ENVIRONMENT = {
    "python_version": "3.11",
    "python_full_version": "3.11.0",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "sys_platform": "linux",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
}
# Left out of train.txt on purpose: the image's model stage installs torch's CPU builds first.
TORCH_STACK_PREFIXES = ("torch", "torchvision", "nvidia-", "cuda-", "triton")
STALE = "regenerate the lock files with `make lock` (requirements/lock.sh)"


def project() -> dict[str, Any]:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def requirements_of(*extras: str) -> list[Requirement]:
    """The base dependencies plus those of `extras`, for the lock platform (self-references expanded)."""
    spec = project()
    optional: dict[str, list[str]] = spec["optional-dependencies"]
    found = [Requirement(line) for line in spec["dependencies"]]
    pending, seen = list(extras), set()
    while pending:
        extra = pending.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for line in optional[extra]:
            requirement = Requirement(line)
            if canonicalize_name(requirement.name) == "convserve":
                pending += sorted(requirement.extras)
            else:
                found.append(requirement)
    return [r for r in found if r.marker is None or r.marker.evaluate({**LOCK_ENVIRONMENT, "extra": ""})]


def unsatisfied(requirements: list[Requirement], lock: dict[str, LockedPackage]) -> list[str]:
    problems = []
    for requirement in requirements:
        locked = lock.get(canonicalize_name(requirement.name))
        if locked is None:
            problems.append(f"{requirement} is not in the lock")
        elif not requirement.specifier.contains(locked.version, prereleases=True):
            problems.append(f"{requirement} does not allow the locked {locked.name}=={locked.version}")
    return problems


@pytest.mark.parametrize("lock_file", [DEV_LOCK, SERVE_LOCK, TRAIN_LOCK], ids=lambda path: path.name)
def test_every_locked_package_is_pinned_with_sha256_hashes(lock_file: Path) -> None:
    lock = lock_entries(lock_file)
    assert lock, f"{lock_file} lists no packages; {STALE}"
    unhashed = sorted(name for name, entry in lock.items() if not entry.hashes)
    assert not unhashed, f"{unhashed} in {lock_file} carry no --hash; {STALE}"


def test_dev_lock_satisfies_every_extra_of_pyproject() -> None:
    problems = unsatisfied(requirements_of("dev", "serve", "train"), lock_entries(DEV_LOCK))
    assert not problems, f"requirements/dev.txt is stale: {problems}; {STALE}"


def test_serve_lock_satisfies_the_serve_extra_and_holds_no_torch() -> None:
    lock = lock_entries(SERVE_LOCK)
    problems = unsatisfied(requirements_of("serve"), lock)
    assert not problems, f"requirements/serve.txt is stale: {problems}; {STALE}"
    torch_stack = sorted(name for name in lock if name.startswith(TORCH_STACK_PREFIXES))
    assert not torch_stack, (
        f"the runtime image's lock pulls {torch_stack}: the serve extra must stay torch-free"
    )


def test_train_lock_is_the_train_extra_without_torch_or_its_cuda_libraries() -> None:
    lock = lock_entries(TRAIN_LOCK)
    wanted = [r for r in requirements_of("train") if not r.name.startswith(TORCH_STACK_PREFIXES)]
    problems = unsatisfied(wanted, lock)
    assert not problems, f"requirements/train.txt is stale: {problems}; {STALE}"
    torch_stack = sorted(name for name in lock if name.startswith(TORCH_STACK_PREFIXES))
    assert not torch_stack, (
        f"requirements/train.txt holds {torch_stack}: the image's model stage installs torch's CPU build "
        "instead; add the new CUDA packages to requirements/no-cuda-overrides.txt and run `make lock`"
    )


@pytest.mark.parametrize("lock_file", [SERVE_LOCK, TRAIN_LOCK], ids=lambda path: path.name)
def test_image_locks_pin_the_versions_the_dev_lock_tests(lock_file: Path) -> None:
    dev = lock_entries(DEV_LOCK)
    differing = [
        f"{name} {entry.version} (dev.txt: {dev[name].version if name in dev else 'absent'})"
        for name, entry in lock_entries(lock_file).items()
        if name not in dev or dev[name].version != entry.version
    ]
    assert not differing, f"{lock_file} differs from requirements/dev.txt: {differing}; {STALE}"


def test_the_environment_running_the_tests_is_the_dev_lock() -> None:
    drifted = []
    for name, entry in lock_entries(DEV_LOCK).items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = "not installed"
        # A local label ("2.14.1+cpu") is the same release built for another accelerator.
        if installed.split("+")[0] != entry.version:
            drifted.append(f"{name}: {installed}, locked {entry.version}")
    assert not drifted, (
        f"this environment is not requirements/dev.txt: {drifted}. `make test` installs the lock into .venv; "
        "elsewhere run `pip install --require-hashes -r requirements/dev.txt`"
    )
