"""Slow clients: many connections that send part of a request and then nothing.

Each connection sends either a partial request head (no blank line ends it) or a complete head
announcing a body that never arrives, then waits. A server with header and body timeouts closes
them; one without keeps every socket (and whatever it allocated for it) until the client gives up.
Meanwhile a normal client sends one real request a second, to see whether the server still serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from benchmarks.common.corpus import Photo
from benchmarks.common.loadgen import post_photo
from benchmarks.common.stats import latency_summary_ms

PARTIAL_HEAD = (
    b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slowloris\r\n"
    b"Content-Type: multipart/form-data; boundary=x\r\n"
)
PARTIAL_BODY = (
    b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slowloris\r\n"
    b"Content-Type: multipart/form-data; boundary=x\r\nContent-Length: 1000000\r\n\r\n"
    b'--x\r\nContent-Disposition: form-data; name="file"; filename="slow.jpg"\r\n\r\n' + bytes(1024)
)
MODES = {"head": PARTIAL_HEAD, "body": PARTIAL_BODY}


@dataclass
class _Connection:
    opened: bool = False
    connect_error: str | None = None
    closed_after_s: float | None = None
    """Seconds from sending the partial request until the server closed (EOF or reset)."""
    answered_status: bytes = b""
    """First bytes the server sent before closing, e.g. an HTTP 408 status line."""


async def _hold(host: str, port: int, payload: bytes, deadline: float, record: _Connection) -> None:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout=5.0)
    except (OSError, TimeoutError) as exc:
        record.connect_error = type(exc).__name__
        return
    record.opened = True
    sent_at = time.monotonic()
    try:
        writer.write(payload)
        await writer.drain()
        while (remaining := deadline - time.monotonic()) > 0:
            data = await asyncio.wait_for(reader.read(4096), timeout=remaining)
            if not data:
                break
            record.answered_status = record.answered_status or data.split(b"\r\n", 1)[0][:40]
        else:
            return  # still open at the deadline
        record.closed_after_s = time.monotonic() - sent_at
    except TimeoutError:  # before OSError, of which it is a subclass: still open at the deadline
        return
    except OSError:  # reset by the server
        record.closed_after_s = time.monotonic() - sent_at
    finally:
        writer.close()


async def _probe(url: str, photo: Photo, stop: asyncio.Event) -> list[tuple[int | None, float]]:
    """One normal request a second until `stop`; (status, seconds) each."""
    results = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10.0)) as session:
        while not stop.is_set():
            started = time.monotonic()
            status, _ = await post_photo(session, url, photo)
            results.append((status, time.monotonic() - started))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=max(0.0, 1.0 - (time.monotonic() - started)))
    return results


async def slow_clients(
    host: str, port: int, photo: Photo, *, connections: int, mode: str, wait_s: float
) -> dict[str, Any]:
    """Open `connections` slow clients at once, wait up to `wait_s`, and report what the server did."""
    payload = MODES[mode]
    records = [_Connection() for _ in range(connections)]
    deadline = time.monotonic() + wait_s
    stop = asyncio.Event()
    probe = asyncio.create_task(_probe(f"http://{host}:{port}/predict", photo, stop))
    await asyncio.gather(*(_hold(host, port, payload, deadline, record) for record in records))
    stop.set()
    probes = await probe
    closed = [record.closed_after_s for record in records if record.closed_after_s is not None]
    connect_errors = [record.connect_error for record in records if record.connect_error]
    answers = sorted(
        {record.answered_status.decode("latin-1") for record in records if record.answered_status}
    )
    return {
        "mode": mode,
        "connections": connections,
        "opened": sum(record.opened for record in records),
        "refused_at_connect": len(connect_errors),
        "closed_by_server": len(closed),
        "still_open_at_end": sum(record.opened and record.closed_after_s is None for record in records),
        "wait_s": wait_s,
        "closed_after_s": {
            key.replace("_ms", "_s"): None if value is None else round(value / 1000, 2)
            for key, value in latency_summary_ms(closed).items()
        },
        "server_answers": answers,
        "normal_requests_meanwhile": len(probes),
        "normal_requests_ok": sum(status == 200 for status, _ in probes),
        "normal_latency_ms": latency_summary_ms([seconds for status, seconds in probes if status == 200]),
    }
