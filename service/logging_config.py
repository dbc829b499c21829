"""Logging for the service process and its uvicorn workers: one format, to stderr, INFO by default."""

from __future__ import annotations

from typing import Any


def log_config(level: str = "INFO") -> dict[str, Any]:
    """A `logging.config.dictConfig` dict; uvicorn applies it in the parent and in every worker."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"}},
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"}
        },
        "root": {"level": level, "handlers": ["stderr"]},
        # uvicorn's loggers come with their own handlers unless told to use the root's.
        "loggers": {name: {"handlers": [], "propagate": True} for name in ("uvicorn", "uvicorn.error")},
    }
