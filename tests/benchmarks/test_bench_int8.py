"""The INT8 part of a benchmark run, end to end on the tiny real model: quantized in a temporary copy,
measured in process and served by the real service; and a quantization that fails costs only its keys."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import onnx
import pytest

from benchmarks.common.loadgen import Window
from benchmarks.performance.ceiling import CeilingPlan
from benchmarks.performance.int8 import given_variant
from benchmarks.performance.plan import BenchPlan
from benchmarks.performance.report import render_markdown
from benchmarks.performance.runner import run
from benchmarks.performance.subjects import RunConfig
from modelcontract import METADATA_KEY, complete_versions
from tests.tinymodel import export_tiny

REPO_ROOT = Path(__file__).resolve().parents[2]
LABELS = ["cat", "dog", "fish"]


def _plan() -> BenchPlan:
    timing = Window(warmup_s=0.2, duration_s=1.0, max_requests=300)
    return BenchPlan(
        mode="quick",
        concurrency_levels=(1,),
        service_levels=timing,
        baseline_levels=timing,
        rate_fractions=(),
        rate_timing=timing,
        rates_for_unbatched=False,
        rss_checkpoints=(),
        rss_soak_concurrency=1,
        rss_soak_max_s=1.0,
        ceiling=CeilingPlan(
            batch_sizes=(1, 4),
            intra_op_threads=(0,),
            decode_threads=(1,),
            single_image_runs=4,
            seconds_per_measurement=0.2,
            confirm_seconds=0.2,
        ),
        int8_concurrency_levels=(1, 32),
    )


def _config(repository: Path, servers: tuple[str, ...]) -> RunConfig:
    return RunConfig(
        repo_root=REPO_ROOT,
        model_repository=repository,
        model_name=None,
        model_version=None,
        servers=servers,
        profile=False,
    )


def _priority() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bench-int8") / "models"
    export_tiny(root / "tiny" / "1", LABELS)
    return root


@pytest.fixture(scope="module")
def int8_run(
    repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict[str, Any], tuple[int, int]]:
    """One run of the ceiling and the INT8 variant; the results, and the caller's priority before and
    after it."""
    output = tmp_path_factory.mktemp("results") / "latest.json"
    before = _priority()
    results = run(_config(repository, ("ceiling", "int8")), _plan(), output)
    return results, (before, _priority())


def test_int8_variant_is_quantized_in_a_copy_and_the_users_repository_is_untouched(
    repository: Path, int8_run: tuple[dict[str, Any], tuple[int, int]]
) -> None:
    results, _ = int8_run
    assert complete_versions(repository / "tiny") == [1]
    assert sorted(path.name for path in (repository / "tiny").iterdir()) == ["1"]
    int8 = results["int8"]
    assert int8["source"] == "quantized" and int8["version"] == 2
    assert not Path(int8["path"]).exists()  # the temporary repository is gone after the run
    assert int8["quantize"]["comparison"]["top1_agreement"] == results["int8_top1_agreement"]
    assert results["not_measured"] == {}
    # The ceiling's validity is part of every run's results (no FP32 server ran here to exceed it).
    assert results["ceiling_valid"] is True
    assert results["ceiling_spread"] == results["in_process"]["ceiling_spread"]


def test_int8_service_is_measured_at_its_levels_and_compared_in_process(
    int8_run: tuple[dict[str, Any], tuple[int, int]],
) -> None:
    results, _ = int8_run
    rows = [row for row in results["levels"] if row["server"] == "int8"]
    assert [row["level"] for row in rows] == [1, 32]
    assert all(row["ok"] > 0 and row["errors"] == 0 for row in rows)
    assert results["int8_service_img_per_s"] == rows[1]["img_per_s"]
    assert results["ratio_int8_fp32"] is None  # the FP32 service was not in this run
    in_process = results["int8"]["in_process"]
    best = max(results["in_process"]["ort_only"], key=lambda entry: entry["img_per_s"])
    assert in_process["batch_size"] == best["batch_size"]
    assert results["int8_ort_alone_img_per_s"] == in_process["int8_ort_alone_img_per_s"] > 0
    assert results["int8_ceiling_img_per_s"] > 0
    assert results["ort_alone_img_per_s"] == results["in_process"]["ort_only_best_img_per_s"]
    targets = {target["key"]: target for target in results["targets"]}
    assert targets["ratio_int8_fp32"]["met"] is None


def test_in_process_measurement_leaves_the_load_generators_priority_alone(
    int8_run: tuple[dict[str, Any], tuple[int, int]],
) -> None:
    # The service's load_model lowers its calling thread to nice 10; the ceiling runs in its own thread.
    # (A test run earlier in this process that loaded a model on the main thread may have lowered it
    # already: then the run must still leave it as it found it.)
    _, (before, after) = int8_run
    assert after == before == _priority()


def test_markdown_shows_the_int8_rows(int8_run: tuple[dict[str, Any], tuple[int, int]]) -> None:
    results, _ = int8_run
    markdown = render_markdown(results)
    assert "| convserve serving the INT8 variant (dynamic batching) |" in markdown
    assert "| Ceiling with the INT8 variant" in markdown
    views = results["int8"]["quantize"]["comparison"]["images"]
    assert f"| INT8 top-1 agreement with FP32, % of {views} photo views | `int8_top1_agreement` |" in markdown


def test_failed_quantization_leaves_the_int8_keys_empty_with_the_reason(
    repository: Path, tmp_path: Path
) -> None:
    # A model already marked INT8: the quantize command refuses it, as it would any failure.
    marked = tmp_path / "models"
    shutil.copytree(repository / "tiny" / "1", marked / "tiny" / "1")
    model_file = marked / "tiny" / "1" / "model.onnx"
    proto = onnx.load(str(model_file))
    props = {prop.key: prop.value for prop in proto.metadata_props}
    onnx.helper.set_model_props(
        proto, {**props, METADATA_KEY: json.dumps({**json.loads(props[METADATA_KEY]), "precision": "int8"})}
    )
    onnx.save(proto, str(model_file))

    results = run(_config(marked, ("int8",)), _plan(), tmp_path / "latest.json")
    assert results["int8"] is None
    assert results["int8_service_img_per_s"] is None and results["int8_top1_agreement"] is None
    assert "quantize exited with" in results["not_measured"]["int8"]
    assert "already int8" in results["not_measured"]["int8"]
    assert complete_versions(marked / "tiny") == [1]


def test_given_int8_model_must_be_a_version_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="version directory"):
        given_variant(tmp_path)
    version = tmp_path / "tiny" / "3"
    version.mkdir(parents=True)
    (version / "model.onnx").write_bytes(b"")
    variant = given_variant(version)
    assert (variant.repository, variant.name, variant.version, variant.source) == (
        tmp_path.resolve(),
        "tiny",
        3,
        "given",
    )
    assert variant.report is None
