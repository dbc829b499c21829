"""Run directories: where a `fit` run works until it is published, and what is left when it stops.

A run works in `<out>/.run-<UTC time>-<random>/`, which the service never reads (only positive
integer directory names are versions). The directory becomes a version with one rename once the
model is exported and verified; if the run stops before that (Ctrl-C, SIGTERM, a crash) it stays
with the checkpoint of the last completed epoch, ready for `fit --resume`, or is removed when no
epoch completed.
"""

from __future__ import annotations

import logging
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

from training.checkpoint import CHECKPOINT_FILENAME

logger = logging.getLogger(__name__)

RUN_PREFIX = ".run-"


def new_run_dir(model_root: Path) -> Path:
    model_root.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    run_dir = Path(tempfile.mkdtemp(prefix=f"{RUN_PREFIX}{stamp}-", dir=model_root))
    run_dir.chmod(0o755)  # mkdtemp makes it owner-only; a service running as another user must read it
    return run_dir


def is_run_dir(directory: Path) -> bool:
    return directory.name.startswith(RUN_PREFIX)


def clear_outputs(run_dir: Path) -> None:
    """Remove everything but the checkpoint (what a failed export or an interrupted write left)."""
    for child in run_dir.iterdir():
        if child.name != CHECKPOINT_FILENAME:
            shutil.rmtree(child) if child.is_dir() else child.unlink()


def leave(run_dir: Path, error: BaseException, world_size: int) -> None:
    """After a run stopped unpublished: keep a resumable checkpoint, remove anything else."""
    if (run_dir / CHECKPOINT_FILENAME).is_file():
        clear_outputs(run_dir)  # a half-written export or checkpoint file is of no use to --resume
        launcher = f"torchrun --nproc_per_node {world_size} -m" if world_size > 1 else "python -m"
        logger.warning(
            "run stopped (%s); %s holds the checkpoint of the last completed epoch, continue with: "
            "%s training fit --resume %s",
            type(error).__name__,
            run_dir / CHECKPOINT_FILENAME,
            launcher,
            run_dir,
        )
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
        logger.warning(
            "run stopped (%s) before its first epoch completed; nothing to resume", type(error).__name__
        )


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"received {signal.Signals(signum).name}")


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (docker stop, Kubernetes, torchrun stopping its workers) stops a run as Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set signal handlers; an embedding program handles its own
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
