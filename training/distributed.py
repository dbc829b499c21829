"""Data-parallel training under `torchrun`: which process this is, and the few collectives we need.

`torchrun --nproc_per_node N -m training fit ...` starts N copies of `fit` with RANK, LOCAL_RANK and
WORLD_SIZE in their environment; `process_group` joins them (gloo on CPU, NCCL on CUDA, one GPU per
process). Without torchrun (or with N = 1) there is no process group and every collective here is
the identity, so `python -m training fit` runs exactly as a single process always did.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto`, `cpu` or `cuda` as this process's device (its own GPU under torchrun)."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but CUDA is not available; use --device cpu or auto")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    if local_rank >= torch.cuda.device_count():
        raise ValueError(
            f"process {local_rank} has no GPU of its own ({torch.cuda.device_count()} visible): "
            "start at most one process per GPU (torchrun --nproc_per_node <number of GPUs>)"
        )
    return torch.device("cuda", local_rank)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the data-parallel processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    """0 .. world_size - 1; rank 0 alone writes files."""
    world_size: int = 1
    """Number of training processes."""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    """This process's device."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, values: Sequence[float]) -> list[float]:
        """`values` summed over every process (every process gets the same sums)."""
        if self.world_size == 1:
            return [float(v) for v in values]
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def wrap(self, model: nn.Module) -> nn.Module:
        """`model` under DistributedDataParallel (itself in one process).

        Call it again whenever `requires_grad` changes: DDP registers the trainable parameters when it
        is built. Buffers are not synced at every forward (`forward_sync_buffers=False`): a pretrained
        base's BatchNorm statistics are frozen and identical everywhere, and BatchNorm that trains from
        scratch is averaged once per epoch by `average_buffers` instead of copied from rank 0 at
        every step.
        """
        if self.world_size == 1:
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False)

    def average_buffers(self, model: nn.Module) -> None:
        """Average floating-point buffers (BatchNorm running statistics) over the processes."""
        if self.world_size == 1:
            return
        for buffer in model.buffers():
            if buffer.is_floating_point():
                dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
                buffer.div_(self.world_size)

    def share(self, value: Any) -> Any:
        """Rank 0's `value`, on every process; also a barrier (the others wait for rank 0)."""
        if self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


@contextmanager
def process_group(device: str) -> Iterator[Ranks]:
    """Join the torchrun process group for the duration of a run (nothing to join without torchrun)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        yield Ranks(device=resolve_device(device))
        return
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    this_device = resolve_device(device, local_rank)
    if this_device.type == "cuda":
        torch.cuda.set_device(this_device)
    dist.init_process_group(
        "nccl" if this_device.type == "cuda" else "gloo",
        rank=rank,
        world_size=world_size,
        device_id=this_device if this_device.type == "cuda" else None,
    )
    try:
        yield Ranks(rank, world_size, this_device)
    finally:
        dist.destroy_process_group()
