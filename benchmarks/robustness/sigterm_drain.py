"""SIGTERM under load: does the server answer everything it took, and exit cleanly and promptly?

N clients send back to back; after a warm-up the server gets SIGTERM and the clients stop starting
new requests (as a load balancer stops routing to a terminating pod). Every request started before
the signal must still be answered in full — a 200, or a 503 refusal — and the process should exit
with status 0 once they are. Exit statuses follow the shell's convention: killed by signal N is
128 + N (143 for SIGTERM).
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from benchmarks.common.corpus import Photo
from benchmarks.common.loadgen import Window, closed_loop
from benchmarks.common.processes import ServerProcess


def shell_exit_status(returncode: int) -> int:
    """Popen's returncode (negative = killed by that signal) as a shell reports it."""
    return 128 - returncode if returncode < 0 else returncode


async def sigterm_under_load(
    server: ServerProcess,
    photos: Sequence[Photo],
    *,
    clients: int,
    load_s: float,
    exit_timeout_s: float,
    request_timeout_s: float = 60.0,
) -> dict[str, Any]:
    """Load the server with `clients` clients for `load_s`, SIGTERM it, and follow it to its exit."""
    stop = asyncio.Event()
    # The window only bounds the run: the clients stop starting requests at `stop`, set at the signal.
    window = Window(duration_s=load_s + request_timeout_s + exit_timeout_s)
    load = asyncio.create_task(
        closed_loop(
            f"{server.url}/predict", photos, clients, window, stop=stop, request_timeout_s=request_timeout_s
        )
    )
    await asyncio.sleep(load_s)
    stop.set()
    signalled = time.perf_counter()
    server.send_signal(signal.SIGTERM)
    returncode = await asyncio.to_thread(server.wait_exit, exit_timeout_s)
    exited_after = time.perf_counter() - signalled
    if returncode is None:
        server.kill()  # hung: what it still held is lost, and the clients need not wait for it
    outcomes = (await load).outcomes
    in_flight = [o for o in outcomes if o.sent < signalled <= o.finished]
    fates = Counter(outcome.kind for outcome in in_flight)
    return {
        "clients": clients,
        "load_s": load_s,
        "requests_before_sigterm": sum(o.finished < signalled for o in outcomes),
        "in_flight_at_sigterm": len(in_flight),
        "answered_200": fates["answered"],
        "refused_503": fates["refused"],
        "lost": fates["lost"] + fates["connection_error"],
        "lost_kinds": dict(
            Counter(o.error or str(o.status) for o in in_flight if o.kind in ("lost", "connection_error"))
        ),
        "started_after_sigterm": sum(o.sent >= signalled for o in outcomes),
        "last_answer_after_s": round(max((o.finished for o in in_flight), default=signalled) - signalled, 2),
        "exit_status": None if returncode is None else shell_exit_status(returncode),
        "exited_after_s": None if returncode is None else round(exited_after, 2),
        "killed_after_timeout_s": None if returncode is not None else exit_timeout_s,
    }
