"""Fixtures shared by the benchmark tests: a tiny real upload server in a subprocess.

It is started by the suite's one launcher (`tests.liveserver.service_process`, with the tiny server's
command instead of `python -m service`), so it gets the same free port, readiness wait and stop as
every other server the tests start.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.liveserver import ServiceProcess, service_process

TINY_SERVER = Path(__file__).with_name("tiny_upload_server.py")


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """`tiny_upload_server.py` on a free port, ready, for the module's tests."""
    with service_process(
        {},
        command=lambda port: [sys.executable, str(TINY_SERVER), str(port)],
        log_path=tmp_path_factory.mktemp("tiny") / "server.log",
    ) as server:
        yield server
