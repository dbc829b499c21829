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
        problems = "\n".join(
            f"  CONVSERVE_{'_'.join(str(p) for p in error['loc']).upper() or '(settings)'}: {error['msg']}"
            for error in exc.errors()
        )
        logger.error("invalid configuration, not starting:\n%s", problems)
        raise SystemExit(2) from None


def main() -> None:
    limit_malloc_arenas()  # before any thread exists: model swaps must not grow RSS
    config = log_config()
    logging.config.dictConfig(config)
    settings = _settings_or_exit()
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
