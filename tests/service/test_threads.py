"""How batches use the CPU: the plan chosen from INSTANCES, INTRA_OP_THREADS and the usable cores (a
cgroup quota included), and the second session a lone batch runs on, which must answer as the first."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from service.models.runtime import load_model
from service.models.threads import ThreadPlan, usable_cores


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
