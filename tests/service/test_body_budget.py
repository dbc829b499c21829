"""The sum of request bodies a worker holds is bounded: past MAX_BODY_BYTES_IN_FLIGHT, 503 + Retry-After.

Arranged over raw sockets against a real uvicorn: one client sends most of a large body and stalls
(the server has read and counted it, which the gauge shows), a second body that would pass the
budget is refused, and once the first request ends every byte is given back.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable

import httpx
import pytest
from pydantic import ValidationError

from service.settings import Settings
from tests.liveserver import LiveServer, live_server
from tests.photos import jpeg
from tests.service.promtext import metric
from tests.waiting import wait_until

MIB = 1024 * 1024
WAIT_S = 30.0


def held_bytes(live: LiveServer) -> float:
    return metric(httpx.get(f"{live.url}/metrics").text, "convserve_request_body_bytes")


def start_body(live: LiveServer, declared: int, sent: int) -> socket.socket:
    """A request declaring `declared` body bytes, of which `sent` are sent now."""
    sock = socket.create_connection((live.host, live.port), timeout=WAIT_S)
    sock.sendall(
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-npy\r\n"
        + f"Content-Length: {declared}\r\n\r\n".encode()
        + b"\0" * sent
    )
    return sock


def answer(sock: socket.socket) -> tuple[int, bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.lower().split(b"\r\n")
    length = int(next(line.split(b":")[1] for line in lines if line.startswith(b"content-length")))
    while len(body) < length:
        body += sock.recv(65536)
    return int(head.split(b" ")[1]), head.lower(), body


def test_bodies_past_the_budget_get_503_and_every_byte_is_given_back(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(max_upload_bytes=2 * MIB, max_body_bytes_in_flight=3 * MIB, body_timeout_s=20)
    with live_server(settings) as live:
        assert held_bytes(live) == 0
        first = start_body(live, declared=2 * MIB, sent=2 * MIB - 10)  # stalls 10 bytes short
        wait_until(lambda: held_bytes(live) >= 2 * MIB - 10 - 65536, "the first body to be counted")
        second = start_body(live, declared=2 * MIB, sent=3 * MIB // 2)  # 2 + 1.5 MiB > 3 MiB
        status, head, body = answer(second)
        assert status == 503
        assert b"retry-after: 1" in head
        assert "MAX_BODY_BYTES_IN_FLIGHT" in json.loads(body)["error"]
        second.close()
        # A small request still fits beside the held body.
        files = {"image": ("cat.jpg", jpeg("chelsea"), "image/jpeg")}
        assert httpx.post(f"{live.url}/predict", files=files, timeout=WAIT_S).status_code == 200
        first.sendall(b"\0" * 10)  # the body completes (not a valid .npy: 422), and the request ends
        assert answer(first)[0] == 422
        first.close()
        wait_until(lambda: held_bytes(live) == 0, "every body byte to be given back")
        assert httpx.post(f"{live.url}/predict", files=files, timeout=WAIT_S).status_code == 200
        text = httpx.get(f"{live.url}/metrics").text
        assert metric(text, 'convserve_rejected_total{reason="body_memory"}') == 1
        assert metric(text, "convserve_request_body_bytes") == 0


def test_the_budget_cannot_be_set_below_one_upload(make_settings: Callable[..., Settings]) -> None:
    with pytest.raises(ValidationError, match="MAX_BODY_BYTES_IN_FLIGHT"):
        make_settings(max_upload_bytes=4 * MIB, max_body_bytes_in_flight=3 * MIB)
