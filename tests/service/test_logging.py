"""The service's log, as a log shipper reads it: `python -m service` in a real subprocess, its stderr
split on newlines only (what shippers do), every line checked — start-up and shutdown included.

`LOG_FORMAT=json` must give one JSON object per line from every logger and every worker; `text` one
readable line per record. Whatever a client sends (control characters, quotes, escapes that look like
a newline, Unicode line separators) stays inside its one line in either format.
"""

from __future__ import annotations

import io
import json
import logging
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.logging_config import REQUEST_FIELDS, JsonFormatter
from tests.liveserver import LOOPBACK, REPO_ROOT, ServiceProcess, run_service, service_env, service_process
from tests.photos import jpeg
from tests.waiting import wait_until

STOP_TIMEOUT_S = 60.0
_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
_TEXT_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) \[\d+\] [\w.]+: "
)
_TEXT_ACCESS = re.compile(
    r"request_id=(?P<request_id>\S+) method=(?P<method>\S+) path=(?P<path>.*) status=(?P<status>\d+) "
    r"duration_ms=[\d.]+( error=.*)?$"
)
# Characters some readers take as the end of a line: none may reach the log raw.
_LINE_BREAKERS = ("\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029")


def lines_of(log: str) -> list[str]:
    """The log's lines as a shipper splits them: on `\\n` only."""
    assert not any(breaker in log for breaker in _LINE_BREAKERS), "a raw line break besides \\n in the log"
    lines = log.split("\n")
    return lines[:-1] if lines[-1] == "" else lines


def json_entries(log: str) -> list[dict[str, Any]]:
    """Every line of `log`, parsed; fails on the first line that is not one JSON object."""
    entries = []
    for number, line in enumerate(lines_of(log), 1):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise AssertionError(f"line {number} is not JSON ({exc}): {line!r}") from None
        assert isinstance(entry, dict), line
        assert {"time", "level", "logger", "message", "pid"} <= entry.keys(), line
        assert _TIME.match(entry["time"]) and datetime.fromisoformat(entry["time"]).utcoffset() is not None
        entries.append(entry)
    return entries


def text_lines(log: str) -> list[str]:
    """Every line of `log`; fails on the first that does not start like a record of the text format."""
    lines = lines_of(log)
    for line in lines:
        assert _TEXT_LINE.match(line), f"not a record line of the text format: {line!r}"
    return lines


def stop(server: ServiceProcess) -> str:
    """SIGTERM, wait for the clean exit, and return the whole log (every write has happened by then)."""
    server.process.send_signal(signal.SIGTERM)
    assert server.wait(timeout_s=STOP_TIMEOUT_S) == 0, server.log()
    return server.log()


@pytest.fixture
def json_server(model_repository: Path, tmp_path: Path) -> Iterator[ServiceProcess]:
    env = service_env(model_repository, LOG_FORMAT="json")
    with service_process(env, log_path=tmp_path / "service.log") as server:
        yield server


# ---- the JSON format --------------------------------------------------------------------------------


def test_json_log_is_one_object_per_line_with_the_request_fields(json_server: ServiceProcess) -> None:
    answer = httpx.post(
        f"{json_server.url}/predict", files={"file": ("cat.jpg", jpeg("chelsea"), "image/jpeg")}, timeout=30
    )
    assert answer.status_code == 200, answer.text
    request_id = answer.headers["x-request-id"]
    wait_until(lambda: request_id in json_server.log(), "the access line of the prediction")
    entries = json_entries(stop(json_server))

    (access,) = [entry for entry in entries if entry.get("request_id") == request_id]
    assert access["logger"] == "service.access" and access["level"] == "INFO"
    assert access["model"] == "tiny" and access["version"] == "1"
    assert access["status"] == 200
    assert isinstance(access["duration_ms"], float) and access["duration_ms"] >= 0
    assert (access["method"], access["path"], access["protocol"]) == ("POST", "/predict", "http")
    assert access["pid"] == json_server.pid  # one worker: the process itself
    assert "error" not in access and "exception" not in access
    assert request_id in access["message"]  # the message still reads as in the text format
    messages = [entry["message"] for entry in entries]
    assert "Application startup complete." in messages  # uvicorn's start-up and shutdown lines too
    assert any(message.startswith("Finished server process") for message in messages)
    assert any(entry["logger"] == "service" and "serving tiny" in entry["message"] for entry in entries)


def test_every_worker_logs_json_under_its_own_pid(model_repository: Path, tmp_path: Path) -> None:
    env = service_env(model_repository, LOG_FORMAT="json", WORKERS="2")
    with service_process(env, log_path=tmp_path / "service.log") as server:

        def started_workers() -> set[int]:
            # Lines of workers still writing may be cut: only whole lines count.
            done = server.log().rpartition("\n")[0]
            entries = json_entries(done + "\n") if done else []
            return {e["pid"] for e in entries if e["message"] == "Application startup complete."}

        wait_until(lambda: len(started_workers()) == 2, "both workers logging their start-up")
        workers = started_workers()
        entries = json_entries(stop(server))
    assert server.pid not in workers
    assert {entry["pid"] for entry in entries} == {server.pid, *workers}
    for pid in workers:
        assert f"Finished server process [{pid}]" in [e["message"] for e in entries if e["pid"] == pid]


def test_json_formatter_writes_exceptions_and_leaves_out_empty_request_fields() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("tests.logging.formatter")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        try:
            raise ValueError("bad\nvalue")
        except ValueError:
            logger.exception(
                "failed %s",
                "once\u2028\x85",
                extra={"request_id": "r1", "model": "", "version": None, "status": 500},
            )
    finally:
        logger.removeHandler(handler)
    (entry,) = json_entries(stream.getvalue())
    assert entry["message"] == "failed once\u2028\x85" and entry["level"] == "ERROR"
    assert entry["request_id"] == "r1" and entry["status"] == 500
    assert "model" not in entry and "version" not in entry
    assert entry["exception"].startswith("Traceback") and "ValueError: bad\nvalue" in entry["exception"]
    assert set(entry) <= {"time", "level", "logger", "message", "pid", "exception", *REQUEST_FIELDS}


# ---- level and start-up -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variables", "named"),
    [
        ({"LOG_FORMAT": "json", "WORKERS": "many"}, "CONVSERVE_WORKERS"),
        ({"LOG_FORMAT": "xml"}, "CONVSERVE_LOG_FORMAT"),
    ],
    ids=["json-when-the-format-is-valid", "text-when-it-is-not"],
)
def test_an_invalid_configuration_is_reported_in_one_readable_line(
    model_repository: Path, variables: dict[str, str], named: str
) -> None:
    result = run_service(service_env(model_repository, **variables))
    assert result.returncode == 2, result.stderr
    if variables.get("LOG_FORMAT") == "json":
        (entry,) = json_entries(result.stderr)
        assert entry["level"] == "ERROR"
        message = entry["message"]
    else:
        (line,) = text_lines(result.stderr)
        assert " ERROR " in line
        message = line
    assert "invalid configuration, not starting" in message and named in message


def test_log_level_warning_drops_the_access_lines(model_repository: Path, tmp_path: Path) -> None:
    env = service_env(model_repository, LOG_FORMAT="json", LOG_LEVEL="WARNING")
    with service_process(env, log_path=tmp_path / "service.log") as server:
        answer = httpx.post(
            f"{server.url}/predict", files={"file": ("cat.jpg", jpeg("chelsea"), "image/jpeg")}, timeout=30
        )
        assert answer.status_code == 200
        # A record at WARNING after it: the log works, the level alone keeps the access line out.
        assert _raw(server.port, b"GET /a\x1bb HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 400")
        entries = json_entries(stop(server))
    assert [entry["message"] for entry in entries] == ["Invalid HTTP request received."]
    assert entries[0]["level"] == "WARNING" and entries[0]["logger"] == "uvicorn.error"


def test_log_level_debug_shows_the_probe_lines(model_repository: Path, tmp_path: Path) -> None:
    env = service_env(model_repository, LOG_LEVEL="debug")  # text format, level in any case
    with service_process(env, log_path=tmp_path / "service.log") as server:
        assert httpx.get(f"{server.url}/healthz", headers={"x-request-id": "probe-1"}).status_code == 200
        wait_until(lambda: "request_id=probe-1 method=GET path=/healthz" in server.log(), "the probe's line")
        lines = text_lines(stop(server))
    (probe,) = [line for line in lines if "request_id=probe-1" in line]
    assert " DEBUG " in probe and "service.access" in probe


# ---- hostile input ----------------------------------------------------------------------------------

# Paths that decode to control characters, quotes, a forged record, escapes that look like a newline
# and Unicode line separators; each request carries its own id to find its one line.
_HOSTILE_PATHS = {
    "hostile-newline": "/x%0a2026-01-01%2000:00:00,000%20ERROR%20[1]%20service:%20forged",
    "hostile-json": "/x%0d%0a%7B%22level%22:%20%22ERROR%22,%20%22message%22:%20%22forged%22%7D",
    "hostile-controls": "/x%00%07%08%1b[31mred%7f%c2%85%c2%9b",
    "hostile-separators": "/x%E2%80%A8y%E2%80%A9z%E2%80%AEevil",
    "hostile-escapes": "/x%5Cn%5Cr%5Cx0a%5Cu2028%22quoted%22%27single%27",
}


_CLOSE = b"\r\nConnection: close\r\n\r\n"


def _raw(port: int, request: bytes) -> bytes:
    with socket.create_connection((LOOPBACK, port), timeout=30) as connection:
        connection.sendall(request)  # with `Connection: close`, or malformed: the server closes
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
        return answer


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_hostile_request_text_cannot_split_or_forge_a_line(
    model_repository: Path, tmp_path: Path, log_format: str
) -> None:
    env = service_env(model_repository, LOG_FORMAT=log_format)
    with service_process(env, log_path=tmp_path / "service.log") as server:
        for request_id, path in _HOSTILE_PATHS.items():
            line = f"GET {path} HTTP/1.1\r\nHost: x\r\nX-Request-ID: {request_id}".encode()
            assert _raw(server.port, line + _CLOSE).startswith(b"HTTP/1.1 404"), path
        # A request id that is not a plain token is replaced by one the server makes, never logged.
        forged_id = b'"x\\n\xc2\x85\xe2\x80\xa8\t{"level":"ERROR"}'
        head = b"GET /hostile-header HTTP/1.1\r\nHost: x\r\nX-Request-ID: " + forged_id + _CLOSE
        assert _raw(server.port, head).startswith(b"HTTP/1.1 404")
        # Raw control bytes in a header or the request line: the HTTP parser refuses them (400) and
        # uvicorn logs a warning of its own, without the bytes.
        head = b"GET /hostile-header HTTP/1.1\r\nHost: x\r\nX-Request-ID: a\x1b[31m\x7f" + _CLOSE
        assert _raw(server.port, head).startswith(b"HTTP/1.1 400")
        assert _raw(server.port, b"GET /a\x1bb\x00 HTTP/1.1" + _CLOSE).startswith(b"HTTP/1.1 400")
        log = stop(server)

    if log_format == "json":
        entries = json_entries(log)
        access = [(e["request_id"], e["path"]) for e in entries if e["logger"] == "service.access"]
    else:
        lines = text_lines(log)
        matches = [_TEXT_ACCESS.search(line) for line in lines if " service.access: " in line]
        assert all(matches), lines
        access = [(match["request_id"], match["path"]) for match in matches if match]
    # One access line per request (the readiness poll's aside): nothing split one line into two.
    requests = [(request_id, path) for request_id, path in access if path != "/readyz"]
    assert len(requests) == len(_HOSTILE_PATHS) + 1, log
    paths = dict(requests)
    assert set(_HOSTILE_PATHS) <= paths.keys()
    assert all(level != "ERROR" for level in _levels(log, log_format)), "a forged ERROR record"
    assert paths["hostile-newline"].startswith("/x\\x0a2026")  # escaped, on the same line
    assert "\\x1b" in paths["hostile-controls"] and "\\x85" in paths["hostile-controls"]
    assert "\\u2028" in paths["hostile-separators"] and "\\u202e" in paths["hostile-separators"]
    assert forged_id.decode("latin-1") not in log and '{"level":"ERROR"}' not in log
    assert log.count("Invalid HTTP request received.") == 2


def _levels(log: str, log_format: str) -> list[str]:
    if log_format == "json":
        return [entry["level"] for entry in json_entries(log)]
    return [match[1] for line in text_lines(log) if (match := _TEXT_LINE.match(line))]


def test_python_warnings_become_records_in_the_configured_format() -> None:
    script = (
        "import logging.config, warnings\n"
        "from service.logging_config import log_config\n"
        "logging.config.dictConfig(log_config('INFO', 'json'))\n"
        "warnings.warn('a library is unhappy', UserWarning)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    (entry,) = json_entries(result.stderr)
    assert entry["logger"] == "py.warnings" and entry["level"] == "WARNING"
    assert "UserWarning: a library is unhappy" in entry["message"]
