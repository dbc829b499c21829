"""GPU batch shapes: the sizes formed on a GPU, the batcher's padding to them, and the warmup that
covers them; on the CPU batches run as formed and warmup stays at two sizes."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from service.inference.batching import DynamicBatcher
from service.models.gpu import gpu_batch_sizes
from service.models.runtime import OnnxModel, warmup_sizes

HANG_GUARD_S = 30.0  # only stops a broken batcher from hanging the suite; never a speed check


def images(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 3, 32, 32)).astype(np.float32)


@pytest.mark.parametrize(
    ("largest", "sizes"),
    [(1, (1,)), (2, (1, 2)), (32, (1, 2, 4, 8, 16, 32)), (20, (1, 2, 4, 8, 16, 20))],
)
def test_gpu_batch_sizes_are_powers_of_two_up_to_the_largest(largest: int, sizes: tuple[int, ...]) -> None:
    assert gpu_batch_sizes(largest) == sizes


def test_gpu_warmup_grows_with_the_log_of_the_largest_batch() -> None:
    assert len(gpu_batch_sizes(4096)) == 13  # 1..2048 and 4096, not 4096 sizes
    with pytest.raises(ValueError, match="at least 1"):
        gpu_batch_sizes(0)


class Recording:
    """The real tiny model's `run`, remembering the shape of every batch it was given."""

    def __init__(self, model: OnnxModel) -> None:
        self.model = model
        self.shapes: list[int] = []

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.shapes.append(len(batch))
        return self.model.run(batch)


async def submit_each(batcher: DynamicBatcher, counts: list[int]) -> list[np.ndarray]:
    """Submit requests of `counts` rows one after another (each its own batch); their outputs."""
    await batcher.start()
    try:
        deadline = time.monotonic() + HANG_GUARD_S
        return [await batcher.submit(images(count, seed=count), deadline) for count in counts]
    finally:
        await batcher.close(HANG_GUARD_S)


def batcher_for(infer: Recording, max_batch: int, sizes: tuple[int, ...] | None) -> DynamicBatcher:
    return DynamicBatcher(
        infer, max_batch_size=max_batch, max_queue_delay_s=0.0, max_queue_size=64, batch_sizes=sizes
    )


def test_batcher_pads_to_the_next_size_and_returns_only_the_real_rows(tiny_model: OnnxModel) -> None:
    recording = Recording(tiny_model)
    batcher = batcher_for(recording, 8, gpu_batch_sizes(8))
    (outputs,) = asyncio.run(submit_each(batcher, [5]))
    assert recording.shapes == [8]
    assert outputs.shape == (5, 3)
    np.testing.assert_allclose(outputs, tiny_model.run(images(5, seed=5)), rtol=1e-5, atol=1e-6)


def test_every_shape_the_batcher_runs_on_a_gpu_was_warmed_up(tiny_model: OnnxModel) -> None:
    largest = 12
    recording = Recording(tiny_model)
    asyncio.run(submit_each(batcher_for(recording, largest, gpu_batch_sizes(largest)), list(range(1, 13))))
    assert set(recording.shapes) == set(gpu_batch_sizes(largest)) == {1, 2, 4, 8, 12}


def test_on_the_cpu_batches_run_as_formed_and_warmup_takes_two_sizes(tiny_model: OnnxModel) -> None:
    assert not tiny_model.on_gpu and tiny_model.batch_sizes(32) is None
    assert warmup_sizes(tiny_model, 32) == (1, 32)
    recording = Recording(tiny_model)
    asyncio.run(submit_each(batcher_for(recording, 8, tiny_model.batch_sizes(8)), [3, 5, 7]))
    assert recording.shapes == [3, 5, 7]


@pytest.mark.parametrize("sizes", [(0, 4, 8), (1, 4, 2, 8), (1, 2, 4)], ids=["zero", "unsorted", "short"])
def test_batch_sizes_that_leave_a_batch_without_a_shape_are_refused(
    tiny_model: OnnxModel, sizes: tuple[int, ...]
) -> None:
    with pytest.raises(ValueError, match="batch_sizes must"):
        batcher_for(Recording(tiny_model), 8, sizes)
