"""Thread priorities: compute threads (decode, inference) yield the CPU to the event loop."""

from __future__ import annotations

import contextlib
import os
import threading

COMPUTE_NICENESS = 10


def yield_to_the_event_loop() -> None:
    """Lower the calling thread's CPU priority (Linux; a no-op elsewhere or when not allowed).

    Decoding and inference may use every core; the event loop must still get CPU at once to accept
    connections, read request heads and refuse overload, or refusals wait behind the work they
    protect. Threads started from a lowered thread (ONNX Runtime's intra-op pool, created with the
    session) inherit its priority.
    """
    with contextlib.suppress(OSError, AttributeError):
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, max(os.getpriority(os.PRIO_PROCESS, tid), COMPUTE_NICENESS))
