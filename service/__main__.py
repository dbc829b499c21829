"""`python -m service`: read the settings once, check the model repository, run uvicorn.

Exit status 0 after a clean shutdown (SIGTERM or SIGINT, drained); 2 means the configuration or the
repository is unusable, 3 that the app failed to start; the log says why.
"""

from __future__ import annotations

import logging
import logging.config
import os
import sys
import tempfile

import uvicorn
from pydantic import ValidationError

from service.app import create_app
from service.errors import StartupError
from service.lifecycle import check_repository
from service.logging_config import log_config
from service.metrics import MULTIPROCESS_DIR_ENV
from service.models.runtime import limit_malloc_arenas
from service.settings import Settings
from service.transport.access import Credentials
from service.transport.server import Server, check_tls, check_uvicorn_hooks, uvicorn_options

logger = logging.getLogger("service")

_STARTUP_FAILURE = 3


def _settings_or_exit() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        _log_as_configured_if_possible(exc)
        # One record, one line: a shipper keeps the problems together with the error.
        problems = "; ".join(
            f"CONVSERVE_{'_'.join(str(p) for p in error['loc']).upper() or '(settings)'}: {error['msg']}"
            for error in exc.errors()
        )
        logger.error("invalid configuration, not starting: %s", problems)
        raise SystemExit(2) from None


def _log_as_configured_if_possible(exc: ValidationError) -> None:
    """Switch to the configured log level and format when those two settings are valid themselves, so
    a log shipper parses the configuration error too; otherwise the default (text) stays.

    They are learnt by validating the settings once more with every invalid field at its default:
    the one `Settings` class stays the only reader of the environment.
    """
    broken = {str(error["loc"][0]) for error in exc.errors() if error["loc"]}
    fields = Settings.model_fields
    if broken & {"log_level", "log_format"} or not broken <= fields.keys():
        return
    try:
        fallback = Settings(**{name: fields[name].get_default(call_default_factory=True) for name in broken})
    except ValidationError:  # a rule across fields failed: nothing to learn the format from
        return
    logging.config.dictConfig(log_config(fallback.log_level, fallback.log_format))


def main() -> None:
    limit_malloc_arenas()  # before any thread exists: model swaps must not grow RSS
    # The default first, so that even an invalid configuration is logged; then what the settings say.
    logging.config.dictConfig(log_config())
    settings = _settings_or_exit()
    config = log_config(settings.log_level, settings.log_format)
    logging.config.dictConfig(config)  # the workers get the same `config` through uvicorn
    try:  # fail here, with a clean message, rather than inside every worker
        names = check_repository(settings)
        Credentials.from_settings(settings)  # token files readable and strong
        check_tls(settings)
        check_uvicorn_hooks()  # a uvicorn outside the pinned range must not drop request limits silently
    except StartupError as exc:
        logger.error("cannot start: %s", exc)
        raise SystemExit(2) from None
    logger.info(
        "serving %s (versions: %s, model control: %s) on %s://%s:%d",
        ", ".join(names),
        settings.policy,
        settings.model_control,
        "https" if settings.tls_certfile else "http",
        settings.host,
        settings.port,
    )
    options = uvicorn_options(settings, config)
    if settings.workers == 1:
        server = Server(uvicorn.Config(create_app(settings), **options))
        server.run()
        if not server.started:
            raise SystemExit(_STARTUP_FAILURE)
    else:
        # A fresh directory per start: values left by an earlier run must not be counted again.
        with tempfile.TemporaryDirectory(prefix="convserve-metrics-") as directory:
            os.environ[MULTIPROCESS_DIR_ENV] = directory  # read by each worker as it starts
            uvicorn.run("service.app:create_app_from_env", factory=True, workers=settings.workers, **options)


if __name__ == "__main__":
    main()
    sys.exit(0)
