"""Container health probe: exit 0 when the service answers 200 on /readyz, 1 otherwise.

Used by the Dockerfile's HEALTHCHECK and docker-compose.yml. It is plain standard library so the runtime
image needs neither curl nor wget, and it reads the same CONVSERVE_PORT the service listens on, and the
same CONVSERVE_TLS_* files: with TLS it probes over HTTPS (the certificate is not checked on loopback,
where there is nobody in between), and with mutual TLS it presents the service's own certificate,
which must then come from the client CA too.
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.error
import urllib.request

TIMEOUT_S = 3.0


def probe_url() -> str:
    """The readiness URL of the service in this container (it always listens on all interfaces here)."""
    port = os.environ.get("CONVSERVE_PORT", "8000")
    scheme = "https" if os.environ.get("CONVSERVE_TLS_CERTFILE") else "http"
    return f"{scheme}://127.0.0.1:{port}/readyz"


def tls_context() -> ssl.SSLContext | None:
    """The client side of the service's TLS settings, None for plain HTTP."""
    certfile = os.environ.get("CONVSERVE_TLS_CERTFILE")
    if not certfile:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if os.environ.get("CONVSERVE_TLS_CLIENT_CA"):
        context.load_cert_chain(certfile, os.environ.get("CONVSERVE_TLS_KEYFILE"))
    return context


def is_ready(url: str, timeout_s: float = TIMEOUT_S) -> bool:
    """True only for an HTTP 200; refused connections, timeouts and 503 all mean not ready."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s, context=tls_context()) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def main() -> int:
    url = probe_url()
    if is_ready(url):
        return 0
    # Docker keeps the last lines a probe prints; say which URL failed so `docker inspect` explains it.
    sys.stderr.write(f"not ready: GET {url} did not return 200\n")
    return 1


if __name__ == "__main__":
    sys.exit(main())
