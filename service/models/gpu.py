"""What serving on a GPU changes: which device, which batch shapes, and what a lost GPU means.

Three decisions live here so that the runtime, the batcher and the health route share one answer:

- **Device.** One process drives one GPU (`CONVSERVE_GPU_DEVICE_ID`, CUDA's numbering as this process
  sees it). Several GPUs are served by several processes, one per GPU (a container or pod each), not
  by one process spreading sessions over devices: each then has its own batcher, its own queue and its
  own /metrics, and an orchestrator restarts a process whose GPU failed without touching the others.
  Inside a container the runtime exposes only the reserved GPUs, renumbered from 0.
- **Batch shapes.** The CUDA provider chooses its kernels (cuDNN algorithms) per input shape, so a
  shape met for the first time under traffic pays that choice. On a GPU the batcher forms only the
  sizes of `gpu_batch_sizes` (powers of two up to the largest batch, plus the largest), padding a
  batch to the next one, so warming those O(log max) sizes covers every shape it will ever run. On a
  CPU nothing depends on the shape and batches are never padded.
- **A lost GPU.** A provider failure while serving switches the session to the CPU (counted and
  logged), unless CONVSERVE_REQUIRE_GPU=true, where the model refuses every batch from then on and
  `/healthz` fails so that the orchestrator restarts the process.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from service.settings import Settings

REQUIRE_GPU_REFUSAL = "CONVSERVE_REQUIRE_GPU=true but"
"""How every refusal to serve without a GPU begins; `/healthz` recognises a version's load failure by it."""


@dataclass(frozen=True)
class GpuOptions:
    """How one process uses its GPU; the defaults serve from device 0 and fall back to the CPU."""

    device_id: int = 0
    """The CUDA device the sessions run on, as this process numbers them."""
    require: bool = False
    """Refuse to serve from the CPU: at load (a StartupError) and after a failure while serving."""
    on_fallback: Callable[[str], None] | None = None
    """Called with ONNX Runtime's reason when a session leaves the GPU while serving (a metric, say)."""

    @classmethod
    def from_settings(
        cls, settings: Settings, on_fallback: Callable[[str], None] | None = None
    ) -> GpuOptions:
        """CONVSERVE_GPU_DEVICE_ID and CONVSERVE_REQUIRE_GPU, with the model's fallback counter."""
        return cls(settings.gpu_device_id, settings.require_gpu, on_fallback)


def gpu_batch_sizes(largest: int) -> tuple[int, ...]:
    """The batch sizes formed on a GPU: powers of two below `largest`, then `largest` itself.

    Padding costs at most as many rows as the batch holds (a batch of 17 runs as 32) but only on the
    device, where a batch of 32 takes hardly longer than one of 17; in exchange warmup runs
    log2(largest) + 1 shapes instead of `largest` (12 instead of 4096 at the setting's maximum).
    """
    if largest < 1:
        raise ValueError(f"the largest batch must be at least 1, got {largest}")
    sizes = []
    size = 1
    while size < largest:
        sizes.append(size)
        size *= 2
    return (*sizes, largest)


def refusal(situation: str, reason: str | None) -> str:
    """The message of a refusal to serve without a GPU in `situation`, quoting ONNX Runtime's `reason`."""
    return (
        f"{REQUIRE_GPU_REFUSAL} {situation}; ONNX Runtime said: "
        f"{reason or 'nothing (is a GPU visible to this process?)'}"
    )
