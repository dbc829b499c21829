"""`make gpu-check` in its dry mode, end to end on the CPU: every GPU step says it was skipped, the
parity and throughput steps really run against a local service, and one summary line ends it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.liveserver import REPO_ROOT, process_env
from tests.tinymodel import export_tiny_model


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess[str]:
    repository = tmp_path_factory.mktemp("models")
    export_tiny_model(repository)
    command = [
        sys.executable,
        "-m",
        "benchmarks.gpucheck",
        "--seconds",
        "1",
        "--model-repository",
        str(repository),
    ]
    return subprocess.run(
        command,
        cwd=REPO_ROOT,
        env=process_env({"GPU_CHECK_DRY": "1"}),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def lines_of(run: subprocess.CompletedProcess[str], status: str) -> dict[str, str]:
    """{step: detail} of the output lines with `status`."""
    prefix = f"gpu-check: {status:<7} "
    found = [line.removeprefix(prefix) for line in run.stdout.splitlines() if line.startswith(prefix)]
    return dict(line.split(": ", 1) for line in found)


def test_dry_run_passes_and_ends_with_one_summary_line(dry_run: subprocess.CompletedProcess[str]) -> None:
    assert dry_run.returncode == 0, dry_run.stdout + dry_run.stderr
    summaries = [line for line in dry_run.stdout.splitlines() if line.startswith("gpu-check summary:")]
    assert len(summaries) == 1 and dry_run.stdout.strip().splitlines()[-1] == summaries[0]
    summary = summaries[0]
    assert summary.startswith("gpu-check summary: DRY ")
    assert "provider=CPUExecutionProvider" in summary
    assert "top1_agree=4/4" in summary and "gpu_util_pct=n/a" in summary


def test_dry_run_skips_each_gpu_step_with_one_visible_line(dry_run: subprocess.CompletedProcess[str]) -> None:
    skipped = lines_of(dry_run, "skipped")
    assert set(skipped) == {"cuda-tests", "gpu-image", "serve", "gpu-utilization"}
    assert "no NVIDIA GPU here" in skipped["cuda-tests"]


def test_dry_run_really_runs_parity_and_load(dry_run: subprocess.CompletedProcess[str]) -> None:
    ok = lines_of(dry_run, "ok")
    assert "max |served - CPU| = 0" in ok["parity"] and "top-1 4/4" in ok["parity"]
    assert "32 clients" in ok["throughput"] and ", 0 errors" in ok["throughput"]
    img_per_s = float(ok["throughput"].split(", ")[1].removesuffix(" img/s"))
    assert img_per_s > 0
