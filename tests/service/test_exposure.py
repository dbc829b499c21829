"""Exposed to the network: slow clients, overload, connection limits, errors and keep-alive, logs.

Every test runs the real app under a real uvicorn with the service's HTTP protocol and talks to it
over raw sockets or real HTTP clients. Conditions are arranged, not waited for: a held decode pool,
a stalled body, connections kept open; the assertions are about what the server answered.
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest
from fastapi import FastAPI

from service.settings import Settings
from service.transport import middleware
from tests.liveserver import LiveServer, live_server
from tests.photos import jpeg
from tests.service.promtext import metric
from tests.waiting import wait_until

SOCKET_TIMEOUT_S = 30.0  # a bound on waiting, far above every server-side timeout these tests set

ACCESS_LOGGER = middleware.logger.name  # the one line per request goes there


def connect(live: LiveServer) -> socket.socket:
    sock = socket.create_connection((live.host, live.port), timeout=SOCKET_TIMEOUT_S)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def test_connections_that_never_finish_their_headers_are_closed(
    make_settings: Callable[..., Settings],
) -> None:
    with live_server(make_settings(header_timeout_s=0.5)) as live:
        idle = [connect(live) for _ in range(5)]  # connect and send nothing
        trickling = [connect(live) for _ in range(20)]
        for sock in trickling:
            sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-")
        # A well-behaved client is served meanwhile.
        assert httpx.get(f"{live.url}/readyz").status_code == 200
        for sock in idle + trickling:
            # Closed by the server without an answer; a socket it left open fails the read's timeout.
            assert read_until_closed(sock) == b""
            sock.close()
        text = httpx.get(f"{live.url}/metrics").text
        assert metric(text, 'convserve_rejected_total{reason="slow_client"}') == 25


def test_body_shorter_than_its_content_length_gets_408_and_the_connection_closes(
    make_settings: Callable[..., Settings],
) -> None:
    with live_server(make_settings(body_timeout_s=0.5)) as live, connect(live) as sock:
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n" + b'{"inputs": ['
        )
        response = read_until_closed(sock)
        assert status_of(response) == 408
        head, body = response.split(b"\r\n\r\n", 1)
        assert b"connection: close" in head.lower() and b"x-request-id" in head.lower()
        assert "too slowly" in json.loads(body)["error"]


def test_a_body_trickled_below_the_minimum_rate_gets_408(make_settings: Callable[..., Settings]) -> None:
    # Each byte comes well within the idle timeout, but 1 byte per 0.1 s is far below 1000 bytes/s.
    settings = make_settings(body_timeout_s=0.5, min_body_rate=1000.0)
    with live_server(settings) as live, connect(live) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
        sock.sendall(b"Content-Length: 100000\r\n\r\n")
        sock.settimeout(0.1)
        response = b""
        for _ in range(300):  # at most 30 s of trickling
            try:
                sock.sendall(b" ")
                response = sock.recv(65536)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
            if response:
                break
        assert status_of(response) == 408


def test_requests_beyond_the_connection_cap_get_a_json_503(make_settings: Callable[..., Settings]) -> None:
    with live_server(make_settings(max_connections=3, header_timeout_s=60)) as live:
        held = [connect(live) for _ in range(3)]
        try:
            connection = http.client.HTTPConnection(live.host, live.port, timeout=SOCKET_TIMEOUT_S)
            connection.request("GET", "/readyz")
            refused = connection.getresponse()
            assert refused.status == 503
            assert refused.getheader("retry-after") == "1"
            assert "CONVSERVE_MAX_CONNECTIONS" in json.loads(refused.read())["error"]
            connection.close()
        finally:
            for sock in held:
                sock.close()
        assert httpx.get(f"{live.url}/readyz").status_code == 200  # room again once they are gone


def _boom(app: FastAPI) -> None:
    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("a bug, not a client mistake")


def test_error_responses_keep_the_keepalive_connection_usable(
    make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    with live_server(make_settings(), customize=_boom) as live:
        connection = http.client.HTTPConnection(live.host, live.port, timeout=SOCKET_TIMEOUT_S)
        connection.request("GET", "/boom", headers={"X-Request-ID": "boom-1"})
        crashed = connection.getresponse()
        body = json.loads(crashed.read())
        assert crashed.status == 500 and crashed.getheader("content-type") == "application/json"
        assert crashed.getheader("x-request-id") == "boom-1" and "boom-1" in body["error"]
        sock = connection.sock
        json_body = {"Content-Type": "application/json"}
        for method, path, payload, headers in [
            ("GET", "/readyz", None, {}),
            ("POST", "/predict", b'{"inputs": [1, 2]}', json_body),  # 422 after reading the body
            ("POST", "/predict", b'{"inputs": [[[[', json_body),  # 400
            ("GET", "/v2/models/unknown", None, {}),  # 404
            ("GET", "/readyz", None, {}),
        ]:
            connection.request(method, path, body=payload, headers=headers)
            response = connection.getresponse()
            response.read()
            assert response.status in (200, 400, 404, 422)
            assert connection.sock is sock, f"{method} {path} after a 500 needed a new connection"
        connection.close()
    crash_lines = [r for r in caplog.records if "unhandled error" in r.getMessage()]
    assert len(crash_lines) == 1 and crash_lines[0].exc_info is not None


def test_an_error_before_the_body_is_read_says_connection_close(
    make_settings: Callable[..., Settings],
) -> None:
    with live_server(make_settings(max_upload_bytes=4096)) as live, connect(live) as sock:
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000\r\n\r\n" + b"[" * 1000
        )
        response = read_until_closed(sock)  # the server answers 413 without reading 1 MB, then closes
        head = response.split(b"\r\n\r\n", 1)[0].lower()
        assert status_of(response) == 413 and b"connection: close" in head


def test_control_characters_from_the_client_never_reach_the_log_raw(
    make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    with live_server(make_settings()) as live:
        forged = f"/x%0d%0a2026-01-01 INFO {ACCESS_LOGGER}: request_id=forged status=200"
        assert httpx.get(live.url + forged).status_code == 404
        files = {"image": ("evil\r\nname.jpg", b"not an image", "image/jpeg")}
        assert httpx.post(f"{live.url}/predict", files=files).status_code == 422
    lines = [r.getMessage() for r in caplog.records if r.name == ACCESS_LOGGER]
    assert any("\\x0d\\x0a2026-01-01" in line for line in lines)
    assert not any(char in line for line in lines for char in "\r\n\x00")


@contextmanager
def held_decode_threads(live: LiveServer) -> Iterator[threading.Event]:
    """Occupy every decode thread until the returned event is set (or the block ends)."""
    executor = live.app.state.convserve.decode_executor
    release, busy = threading.Event(), threading.Semaphore(0)

    def hold() -> None:
        busy.release()
        release.wait(SOCKET_TIMEOUT_S)

    jobs = [executor.submit(hold) for _ in range(executor._max_workers)]
    for _ in jobs:
        assert busy.acquire(timeout=SOCKET_TIMEOUT_S)
    try:
        yield release
    finally:
        release.set()


def test_overload_is_refused_at_admission_while_admitted_images_wait_for_decoding(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(max_batch_size=4, max_queue_size=8)
    four = [("image", (f"{i}.jpg", jpeg("chelsea"), "image/jpeg")) for i in range(4)]
    with live_server(settings) as live, ThreadPoolExecutor(2) as pool:
        with held_decode_threads(live) as release:
            admitted = [
                pool.submit(httpx.post, f"{live.url}/predict", files=four, timeout=60) for _ in range(2)
            ]
            wait_until(
                lambda: metric(httpx.get(f"{live.url}/metrics").text, "convserve_queue_depth") == 8,
                "the admission of both requests' 4 images",
                SOCKET_TIMEOUT_S,
            )
            # Nothing has been decoded (the decode threads are held), yet the queue counts 8 images:
            # a ninth is refused now, not after the others' decoding.
            refused = httpx.post(f"{live.url}/predict", files=four[:1], timeout=SOCKET_TIMEOUT_S)
            assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
            assert "queue is full" in refused.json()["error"]
            assert not any(job.done() for job in admitted)
            release.set()
            assert [job.result().status_code for job in admitted] == [200, 200]
        assert metric(httpx.get(f"{live.url}/metrics").text, "convserve_queue_depth") == 0


def test_every_client_error_waits_its_delay_and_nothing_else_does(
    make_settings: Callable[..., Settings],
) -> None:
    delay = 0.2
    with (
        live_server(make_settings(client_error_delay_s=delay)) as live,
        httpx.Client(base_url=live.url) as client,
    ):
        started = time.monotonic()
        refused = [
            client.post("/predict", content=b"x", headers={"content-type": "text/plain"}),  # 415
            client.post("/predict", params={"model": "nope"}, files={"f": ("a.jpg", jpeg("chelsea"))}),  # 404
            client.get("/no/such/route"),  # 404
            client.post("/predict", files={"f": ("a.jpg", b"not an image")}),  # 422
        ]
        # asyncio.sleep never wakes early: the lower bound is deterministic.
        assert time.monotonic() - started >= len(refused) * delay
        assert [r.status_code for r in refused] == [415, 404, 404, 422]
        assert all("error" in r.json() for r in refused)
        assert client.post("/predict", files={"f": ("a.jpg", jpeg("chelsea"))}).status_code == 200
