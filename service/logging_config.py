"""Logging for the service process and its uvicorn workers: one handler on stderr, in one format.

`text` is one readable line per record. `json` is one JSON object per line, for log shippers: every
record of every logger (the service's, uvicorn's start-up and error lines, libraries') goes through
the root logger's one handler, so every line the service writes to stderr parses. A record that
carries request fields (`extra={...}` with the keys of `REQUEST_FIELDS`, as the access lines of every
protocol do) has them as top-level keys. Nothing a client sent can break a line: the JSON encoder
escapes every control character (and, with `ensure_ascii`, every non-ASCII one, so no Unicode line
separator reaches a shipper that splits on it); text lines escape client strings with
`service.textsafety.printable` where they are logged.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Literal

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
LogFormat = Literal["text", "json"]

REQUEST_FIELDS = (
    "request_id",
    "model",
    "version",
    "status",
    "duration_ms",
    "method",
    "path",
    "protocol",
    "error",
)
"""The `extra` keys of an access line, written as top-level JSON keys when set (an empty string or
None is left out: a request no model answered has no `model` or `version`)."""

_TEXT_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: `time` (ISO 8601, UTC, milliseconds), `level`, `logger`, `message`,
    `pid`, the request fields the record carries, and `exception` (the traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        for key in REQUEST_FIELDS:
            value = record.__dict__.get(key)
            if value is not None and value != "":
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # default=str: a field some library sets to an object still gives a line, never a lost record.
        return json.dumps(entry, ensure_ascii=True, default=str)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{seconds}.{int(record.msecs):03d}Z"


def stderr_handler() -> logging.Handler:
    """The one handler. Building it also routes `warnings.warn` into logging (logger `py.warnings`):
    a library's warning would otherwise be raw text on stderr, a line no JSON parser reads. Here,
    because this is the code every process (the parent and each worker) runs when it applies the
    configuration."""
    logging.captureWarnings(True)
    return logging.StreamHandler(sys.stderr)


def log_config(level: LogLevel = "INFO", fmt: LogFormat = "text") -> dict[str, Any]:
    """A `logging.config.dictConfig` dict; uvicorn applies it in the parent and in every worker."""
    formatter: dict[str, Any] = (
        {"()": f"{__name__}.JsonFormatter"} if fmt == "json" else {"format": _TEXT_FORMAT}
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"service": formatter},
        "handlers": {"stderr": {"()": f"{__name__}.stderr_handler", "formatter": "service"}},
        "root": {"level": level, "handlers": ["stderr"]},
        # uvicorn's loggers come with their own handlers unless told to use the root's.
        "loggers": {
            name: {"handlers": [], "propagate": True}
            for name in ("uvicorn", "uvicorn.error", "uvicorn.access")
        },
    }
