"""SIGTERM under load: does the server answer everything it took, and exit cleanly and promptly?

N clients send back to back; after a warm-up the server gets SIGTERM and the clients stop starting
new requests (as a load balancer stops routing to a terminating pod). Every request started before
the signal must still be answered in full — a 200, or a 503 refusal — and the process should exit
with status 0 once they are. Exit statuses follow the shell's convention: killed by signal N is
128 + N (143 for SIGTERM).
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from benchmarks.corpus import Photo
from benchmarks.overload import Outcome, client_session, post_photo
from benchmarks.processes import ServerProcess


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
    url = f"{server.base_url}/predict"
    outcomes: list[Outcome] = []
    stop = asyncio.Event()
    cycle = itertools.cycle(photos)

    async def client(session: Any) -> None:
        while not stop.is_set():
            started = time.perf_counter()
            status, error = await post_photo(session, url, next(cycle))
            outcomes.append(Outcome(started, time.perf_counter(), status, error))

    async with client_session(clients, request_timeout_s) as session:
        tasks = [asyncio.create_task(client(session)) for _ in range(clients)]
        await asyncio.sleep(load_s)
        stop.set()
        signalled = time.perf_counter()
        server.send_signal(signal.SIGTERM)

        async def wait_exit() -> tuple[int | None, float]:
            code = await asyncio.to_thread(server.wait_exit, exit_timeout_s)
            return code, time.perf_counter() - signalled

        exit_wait = asyncio.create_task(wait_exit())
        await asyncio.wait(tasks, timeout=request_timeout_s + exit_timeout_s)
        returncode, exited_after = await exit_wait
    if returncode is None:
        server.kill()
    in_flight = [o for o in outcomes if o.scheduled < signalled <= o.finished]
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
        "started_after_sigterm": sum(o.scheduled >= signalled for o in outcomes),
        "last_answer_after_s": round(max((o.finished for o in in_flight), default=signalled) - signalled, 2),
        "exit_status": None if returncode is None else shell_exit_status(returncode),
        "exited_after_s": None if returncode is None else round(exited_after, 2),
        "killed_after_timeout_s": None if returncode is not None else exit_timeout_s,
    }
