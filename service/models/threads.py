"""How many batches of one model a CPU computes at once, and on how many threads each.

Two ways to use a small CPU pull in opposite directions (EfficientNet-Lite0 on 2 cores):
- one batch on every core (ONNX Runtime's default) finishes a lone image soonest, 5.2 ms, and 4.1 ms
  when its threads spin between operators instead of sleeping; but under load a batch's threads
  meet at a barrier after every operator, and spinning ones take the cores image decoding needs;
- one single-threaded batch per core (Triton's instance count) computes ~10 % more images a second
  under load, but a lone image takes 7.5 ms on one core.
So by default each core computes a single-threaded batch of its own, and a batch with nothing else
in sight (no other batch computing, no other image admitted: a lone request) runs on a second session
of the same file whose threads cover every core and spin between its operators. Spinning stops when
the run returns (`session.force_spinning_stop`), so the next batches find the cores free. The second
session costs the memory of the weights once more (EfficientNet-Lite0: 24 → 43 MB per loaded version,
as the memory budget measures it; activations come from the arena every session shares), so with
many models per box and a tight budget, INSTANCES=<cores> holds twice the versions. Explicit
INSTANCES keeps exactly what it says, with no second session; a GPU computes one batch at a time on
its own. A lone image's decode takes every core in the same way: the decode threads that have
nothing else to do resample it in bands (`Predictor`, `ImagePreprocessor.transform_into`), and the
thread that decoded it computes it on the lone session right away (`DynamicBatcher.lone_run`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from service.settings import Settings

CGROUP_ROOT = Path("/sys/fs/cgroup")


def usable_cores(cgroup_root: Path = CGROUP_ROOT) -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup CPU quota (a container's
    CPU limit, which `os.cpu_count()` does not see: a 2-CPU pod on a 64-core node would run 64 threads)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cgroup_quota(cgroup_root)
    return max(1, min(cores, math.ceil(quota) if quota is not None else cores))


def _cgroup_quota(root: Path) -> float | None:
    """CPUs the cgroup may use (quota / period), or None without a limit or a readable cgroup."""
    try:  # cgroup v2: "max 100000" or "200000 100000"
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:  # cgroup v1: a quota of -1 means no limit
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class ThreadPlan:
    """Batches of one model computed at once and ONNX Runtime's threads, from the settings and the cores."""

    instances: int
    """Batches computed at once on a CPU."""
    intra_op_threads: int
    """Threads inside one batch's operators (0: ONNX Runtime's default, one per core)."""
    lone_threads: int
    """Threads of the session a lone batch runs on (covering every core, spinning); 0: no such session."""
    automatic: bool
    """Chosen here (INSTANCES=0) rather than set: a GPU then computes one batch at a time."""
    decode_threads: int = 1
    """Image decoding threads: one per core, at most 4 (ONNX Runtime's threads need the cores too)."""

    @classmethod
    def choose(cls, instances: int, intra_op_threads: int, cores: int) -> ThreadPlan:
        """The plan for CONVSERVE_INSTANCES and CONVSERVE_INTRA_OP_THREADS (0 = automatic) on `cores`."""
        decode = min(4, cores)
        if instances > 0:
            return cls(instances, intra_op_threads, 0, automatic=False, decode_threads=decode)
        threads = intra_op_threads or 1
        count = max(1, cores // threads)
        return cls(count, threads, cores if count > 1 else 0, automatic=True, decode_threads=decode)

    @classmethod
    def from_settings(cls, settings: Settings) -> ThreadPlan:
        """The plan for the settings, on CONVSERVE_CPUS cores or else the usable ones (`usable_cores`)."""
        return cls.choose(settings.instances, settings.intra_op_threads, settings.cpus or usable_cores())

    def instances_on(self, gpu: bool) -> int:
        """Batches to compute at once on the model's provider."""
        return 1 if gpu and self.automatic else self.instances

    def describe(self) -> str:
        """One line for the log: what runs at once, on how many threads."""
        threads = self.intra_op_threads or "ONNX Runtime's default number of"
        lone = f"; a lone batch on {self.lone_threads} spinning threads" if self.lone_threads else ""
        return (
            f"{self.instances} batch(es) at once on {threads} thread(s) each{lone}; "
            f"{self.decode_threads} decode thread(s)"
        )
