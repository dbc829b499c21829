"""How batches use the CPU: the plan chosen from INSTANCES, INTRA_OP_THREADS and the usable cores (a
cgroup quota included), the second session a lone batch runs on, which must answer as the first, and
the decode threads a lone image takes."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from service.inference.predictor import InferenceRequest, Inputs, NamedImage, Predictor
from service.metrics import Metrics
from service.models.runtime import load_model
from service.models.threads import ThreadPlan, usable_cores
from tests.photos import jpeg
from tests.tinymodel import tiny_settings


def affinity() -> int:
    return len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    ("instances", "intra", "cores", "expected"),
    [
        (0, 0, 2, ThreadPlan(2, 1, 2, automatic=True, decode_threads=2)),  # the default on 2 cores
        (0, 0, 8, ThreadPlan(8, 1, 8, automatic=True, decode_threads=4)),
        (0, 2, 8, ThreadPlan(4, 2, 8, automatic=True, decode_threads=4)),
        # one core: nothing to gain from a second session
        (0, 0, 1, ThreadPlan(1, 1, 0, automatic=True, decode_threads=1)),
        (0, 4, 2, ThreadPlan(1, 4, 0, automatic=True, decode_threads=2)),
        # set explicitly: exactly that, no lone session
        (1, 0, 8, ThreadPlan(1, 0, 0, automatic=False, decode_threads=4)),
        (3, 1, 2, ThreadPlan(3, 1, 0, automatic=False, decode_threads=2)),
    ],
)
def test_the_plan_follows_the_settings_and_the_cores(
    instances: int, intra: int, cores: int, expected: ThreadPlan
) -> None:
    assert ThreadPlan.choose(instances, intra, cores) == expected


def test_a_gpu_computes_one_batch_at_a_time_unless_instances_are_set() -> None:
    assert ThreadPlan.choose(0, 0, 8).instances_on(gpu=True) == 1
    assert ThreadPlan.choose(0, 0, 8).instances_on(gpu=False) == 8
    assert ThreadPlan.choose(2, 0, 8).instances_on(gpu=True) == 2


@pytest.mark.parametrize(
    ("files", "quota"),
    [
        ({"cpu.max": "150000 100000\n"}, 2),  # cgroup v2, 1.5 CPUs: rounded up
        ({"cpu.max": "100000 100000\n"}, 1),
        ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),  # cgroup v1
    ],
)
def test_a_cgroup_quota_caps_the_usable_cores(tmp_path: Path, files: dict[str, str], quota: int) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert usable_cores(tmp_path) == min(affinity(), quota)


@pytest.mark.parametrize(
    "files",
    [
        {},  # no cgroup files at all
        {"cpu.max": "max 100000\n"},
        {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"},
        {"cpu.max": "garbage\n"},
    ],
)
def test_without_a_quota_every_core_of_the_affinity_is_usable(tmp_path: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert usable_cores(tmp_path) == affinity()


def test_a_lone_batch_runs_on_its_own_session_with_the_same_answers(tiny_model_path: Path) -> None:
    model = load_model(tiny_model_path, ["CPUExecutionProvider"], intra_op_threads=1, lone_threads=2)
    assert model.lone_session is not None and model.lone_session is not model.session
    batch = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(model.run(batch, alone=True), model.run(batch), rtol=1e-5, atol=1e-6)


def test_without_lone_threads_every_batch_runs_on_the_one_session(tiny_model_path: Path) -> None:
    assert load_model(tiny_model_path, ["CPUExecutionProvider"], intra_op_threads=1).lone_session is None
    assert load_model(tiny_model_path, ["CPUExecutionProvider"], lone_threads=1).lone_session is None


class CountingPool(ThreadPoolExecutor):
    """A decode pool that counts the jobs it is given: whole images, and the halves it helps with."""

    def __init__(self, workers: int) -> None:
        super().__init__(workers, thread_name_prefix="decode")
        self.jobs = 0
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        with self._lock:
            self.jobs += 1
        return super().submit(fn, *args, **kwargs)


@pytest.mark.parametrize(
    ("images", "lone_batches", "jobs", "computed_on"),
    [(1, True, 2, "decode"), (2, True, 2, "convserve-infer"), (1, False, 1, "convserve-infer")],
)
def test_a_lone_image_takes_two_decode_threads_and_company_one_each(
    tiny_model_path: Path,
    model_repository: Path,
    *,
    images: int,
    lone_batches: bool,
    jobs: int,
    computed_on: str,
) -> None:
    """A lone image (the batcher's only one, with lone batches on) is decoded on one thread, resampled
    on two, and computed by the thread that decoded it; images in company, or without lone batches,
    keep to one decode thread each and are computed on an inference thread."""
    model = load_model(tiny_model_path, ["CPUExecutionProvider"], intra_op_threads=1, lone_threads=2)
    threads: list[str] = []

    def infer(batch: np.ndarray, **options: Any) -> Any:
        threads.append(threading.current_thread().name)
        return model.run(batch, **options)

    settings = tiny_settings(model_repository, max_queue_delay_ms=0.0)
    files = [NamedImage(f"{i}.jpg", jpeg("coffee")) for i in range(images)]

    async def receive() -> list[NamedImage]:
        return files

    def parse(payload: list[NamedImage]) -> tuple[Inputs, None]:
        return Inputs(images=payload), None

    async def scenario() -> tuple[int, list[list[dict[str, Any]]]]:
        metrics = Metrics(CollectorRegistry(), settings.max_batch_size).for_model("m", 1)
        with CountingPool(2) as decode:
            predictor = await Predictor.start(
                model.metadata, infer, settings, metrics, decode, instances=2, lone_batches=lone_batches
            )
            try:
                request = InferenceRequest(time.monotonic(), receive, parse, parse_on_loop=True)
                ranked, _, _ = await predictor.classify(request, top_k=1)
            finally:
                await predictor.close()
            return decode.jobs, ranked

    counted, ranked = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert counted == jobs
    assert threads and all(name.startswith(computed_on) for name in threads), threads
    assert len(ranked) == images and all(len(row) == 1 for row in ranked)
