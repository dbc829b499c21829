"""A description of the machine and software a benchmark ran on, recorded with every result."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import onnxruntime
import psutil

_PACKAGES = (
    "onnxruntime-gpu",
    "onnxruntime",
    "torch",
    "torchvision",
    "pillow",
    "numpy",
    "fastapi",
    "uvicorn",
)
_CPU_FLAGS_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile")


def _cpu_model_and_flags() -> tuple[str, list[str]]:
    model, flags = platform.processor() or "unknown", list[str]()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return model, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            model = value.strip()
        elif key.strip() == "flags":
            present = set(value.split())
            flags = [flag for flag in _CPU_FLAGS_OF_INTEREST if flag in present]
            break
    return model, flags


def _package_versions() -> dict[str, str]:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _onnxruntime_providers() -> list[str]:
    return list(onnxruntime.get_available_providers())


def git_commit(repo: Path) -> str | None:
    """The checked-out commit (with `-dirty` when files differ), or None outside a git checkout."""
    try:
        described = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            cwd=repo,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return described.stdout.strip() or None


def describe_machine(repo: Path) -> dict[str, Any]:
    """CPU, memory, OS, Python and key package versions, plus the load average at this moment."""
    model, flags = _cpu_model_and_flags()
    return {
        "cpu_model": model,
        "cpu_flags": flags,
        "logical_cpus": os.cpu_count(),
        "physical_cpus": psutil.cpu_count(logical=False),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "onnxruntime_providers": _onnxruntime_providers(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "packages": _package_versions(),
        "git_commit": git_commit(repo),
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
    }


def other_processes_cpu(sample_s: float = 1.0, min_percent: float = 5.0) -> list[dict[str, Any]]:
    """Processes outside this benchmark using CPU right now (what else competed for the cores)."""
    own = {os.getpid(), *(child.pid for child in psutil.Process().children(recursive=True))}
    processes = [p for p in psutil.process_iter(["name", "cmdline"]) if p.pid not in own]
    for process in processes:
        try:
            process.cpu_percent(None)
        except psutil.Error:
            continue
    time.sleep(sample_s)
    busy = []
    for process in processes:
        try:
            percent = process.cpu_percent(None)
        except psutil.Error:
            continue
        if percent >= min_percent:
            command = " ".join(process.info["cmdline"] or [process.info["name"] or "?"])
            busy.append({"pid": process.pid, "cpu_percent": round(percent, 1), "command": command[:120]})
    return sorted(busy, key=lambda entry: -entry["cpu_percent"])[:8]
