"""Fixtures shared by the benchmark tests: a tiny real upload server in a subprocess."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.processes import ServerProcess, free_port

TINY_SERVER = Path(__file__).with_name("tiny_upload_server.py")


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """`tiny_upload_server.py` on a free port, ready, for the module's tests."""
    port = free_port()
    server = ServerProcess(
        name="tiny",
        command=[sys.executable, str(TINY_SERVER), str(port)],
        env={},
        port=port,
        log_path=tmp_path_factory.mktemp("tiny") / "server.log",
        start_timeout_s=60,
    )
    with server:
        yield server
