"""The uvicorn server the service runs under: its options from the settings, and a clean exit status.

One place builds them, so `python -m service`, its worker processes and the tests' servers listen
with the same protocol, limits and TLS configuration.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Iterator
from typing import Any

import uvicorn

from service.errors import StartupError
from service.settings import Settings
from service.transport.protocol import GuardedHttpToolsProtocol, uvicorn_hook_problems

# Extra seconds uvicorn waits for open requests on shutdown beyond the request timeout.
_SHUTDOWN_MARGIN_S = 5.0


def uvicorn_options(settings: Settings, log_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Keyword arguments of `uvicorn.Config` / `uvicorn.run` for `settings`."""
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "access_log": False,  # the service logs one line per request itself, with the request id
        "http": GuardedHttpToolsProtocol,  # header limits and timeout, connection cap, drain signal
        # Accepted requests finish within REQUEST_TIMEOUT_S of arrival; bodies still arriving are
        # refused as soon as the drain begins, so nothing else can hold the shutdown open.
        "timeout_graceful_shutdown": settings.request_timeout_s + _SHUTDOWN_MARGIN_S,
    }
    if log_config is not None:
        options["log_config"] = log_config
    if settings.tls_certfile is not None:
        options["ssl_certfile"] = str(settings.tls_certfile)
        options["ssl_keyfile"] = str(settings.tls_keyfile)
        if settings.tls_client_ca is not None:
            # Mutual TLS: the handshake itself refuses clients without a certificate the CA signed.
            options["ssl_ca_certs"] = str(settings.tls_client_ca)
            options["ssl_cert_reqs"] = ssl.CERT_REQUIRED
    return options


def check_tls(settings: Settings) -> None:
    """Load the certificate, key and client CA once now, so a wrong path or a key that does not match
    its certificate stops the start with the reason (`StartupError`) instead of inside uvicorn."""
    if settings.tls_certfile is None:
        return
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(str(settings.tls_certfile), str(settings.tls_keyfile))
        if settings.tls_client_ca is not None:
            context.load_verify_locations(cafile=str(settings.tls_client_ca))
    except (OSError, ssl.SSLError) as exc:
        files = f"{settings.tls_certfile}, {settings.tls_keyfile}, {settings.tls_client_ca}"
        raise StartupError(
            f"cannot use the TLS files (CONVSERVE_TLS_CERTFILE, _KEYFILE, _CLIENT_CA: {files}): {exc}; "
            "give PEM files readable by the service, the key matching the certificate"
        ) from None


def check_uvicorn_hooks() -> None:
    """Stop the start (`StartupError`) when the installed uvicorn lacks a hook the service overrides.

    Each would fail silently otherwise: a protocol override uvicorn no longer calls drops a request
    limit, and a signal list `Server` no longer clears turns a clean stop into exit status 143.
    """
    problems = uvicorn_hook_problems()
    if not callable(getattr(uvicorn.Server, "capture_signals", None)):
        problems.append("uvicorn.Server.capture_signals is gone")
    probe = uvicorn.Server(uvicorn.Config(app=_no_app, log_config=None))
    if not isinstance(getattr(probe, "_captured_signals", None), list):
        problems.append("uvicorn.Server instances no longer have the `_captured_signals` list")
    if problems:
        raise StartupError(
            f"uvicorn {uvicorn.__version__} lacks what service/transport relies on: {'; '.join(problems)}; "
            "install the versions of requirements/serve.txt (pip install --require-hashes -r "
            "requirements/serve.txt), or adapt service/transport to this uvicorn"
        )


async def _no_app(scope: Any, receive: Any, send: Any) -> None:
    raise AssertionError("the probe server of check_uvicorn_hooks never serves")


class Server(uvicorn.Server):
    """uvicorn's server, exiting 0 after a signal-initiated graceful shutdown.

    uvicorn re-raises the captured SIGTERM once it has drained, so the process would end with
    status 143, which container runtimes and supervisors report as a failure. Stopping on request
    is the normal way for this service to end.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn internals: `check_uvicorn_hooks` refuses to start if either is gone.
        with super().capture_signals():
            yield
            self._captured_signals.clear()  # reached only when serving ended without an exception
