"""deploy/healthcheck.py, the image's HEALTHCHECK: 0 only when /readyz answers 200."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from deployfiles import HEALTHCHECK_SCRIPT

from tests.liveserver import LiveServer, free_port


def run_probe(port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK_SCRIPT)],
        env={"CONVSERVE_PORT": str(port)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


class _NotReadyHandler(BaseHTTPRequestHandler):
    """Answers like the service does while it is still warming up."""

    def do_GET(self) -> None:
        self.send_response(503)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"error": "warming up"}')

    def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
        return


@pytest.fixture
def not_ready_port() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NotReadyHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def test_probe_succeeds_against_the_ready_service(live_server: LiveServer) -> None:
    result = run_probe(live_server.port)
    assert result.returncode == 0, result.stderr


def test_probe_fails_while_readyz_answers_503(not_ready_port: int) -> None:
    result = run_probe(not_ready_port)
    assert result.returncode == 1
    assert f"127.0.0.1:{not_ready_port}/readyz" in result.stderr


def test_probe_fails_when_nothing_listens() -> None:
    assert run_probe(free_port()).returncode == 1
