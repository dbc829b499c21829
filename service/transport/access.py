"""Who may call what: a bearer token per role, and refusal of browser requests from other sites.

Every request belongs to one role (`role_of`, by path and method): probes and docs are open;
`/metrics` is METRICS; the model repository, and the writes (POST, DELETE) of the gallery API
`/v1/models/<name>/gallery...`, are ADMIN (a gallery's examples change every client's answers, like a
model load); everything else, inference, model metadata and reading a gallery included, is INFERENCE.
A role with a configured token demands it as `Authorization: Bearer <token>` (or in
CONVSERVE_TOKEN_HEADER, Triton's header-key style): 401 with `WWW-Authenticate` when none is sent,
403 when a wrong one is. The admin token is accepted wherever a token is asked for.
Tokens are compared as SHA-256 digests with `hmac.compare_digest`, so neither their content nor their
length shows in the time an answer takes; they are never logged or echoed.

Browsers attach no token by themselves, but they do send requests another site's page asks for
(a form POST needs no permission). A state-changing request (any method but GET, HEAD, OPTIONS) that
a browser marks as cross-site (`Sec-Fetch-Site`, or an `Origin` whose host is not this server's) is
refused with 403 unless its origin is in CONVSERVE_CORS_ORIGINS. Clients that are not browsers send
neither header and are unaffected. The check runs before the body is read.
Like every 4xx, a refusal is answered after CONVSERVE_CLIENT_ERROR_DELAY_S (see
`service.transport.middleware`), which also slows token guessing.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import StartupError
from service.settings import Settings, check_token


class Role(StrEnum):
    OPEN = "open"
    INFERENCE = "inference"
    ADMIN = "admin"
    METRICS = "metrics"


# Probes must work without credentials, and the API docs hold nothing a client could not learn by calling.
_OPEN_PATHS = frozenset(
    {"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"}
    | {"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
    | {"/", "/ui"}
)
# The docs pages' scripts, styles and icon (service.protocols.docs.STATIC_PREFIX), and the upload
# page's (service.protocols.ui.STATIC_PREFIX): the page's own calls carry the token the person pastes.
_OPEN_PREFIXES = ("/docs/static/", "/ui/static/")
_MODEL_READY = re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/ready$")
_ADMIN_PREFIXES = ("/v2/repository/",)
# Paths whose reads are inference and whose writes are admin (service.protocols.gallery).
_ADMIN_WRITES = re.compile(r"^/v1/models/[^/]+/gallery(/.*)?$")
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def role_of(path: str, method: str = "GET") -> Role:
    """The role a request for `path` with `method` needs; unknown paths are INFERENCE, so a new route
    is never open by accident."""
    if path in _OPEN_PATHS or path.startswith(_OPEN_PREFIXES) or _MODEL_READY.match(path):
        return Role.OPEN
    if path == "/metrics":
        return Role.METRICS
    if path.startswith(_ADMIN_PREFIXES) or path == "/v2/repository":
        return Role.ADMIN
    if method.upper() not in _SAFE_METHODS and _ADMIN_WRITES.match(path):
        return Role.ADMIN
    return Role.INFERENCE


def _digest(token: str | bytes) -> bytes:
    return hashlib.sha256(token.encode() if isinstance(token, str) else token).digest()


def _read_token(path: Path, variable: str) -> str:
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise StartupError(f"{variable}: cannot read the token file {str(path)!r} ({exc})") from None
    try:
        check_token(token, f"the token in {variable} ({path})")
    except ValueError as exc:
        raise StartupError(str(exc)) from None
    return token


@dataclass(frozen=True)
class Credentials:
    """The digests of the configured tokens (None: that role is open)."""

    admin: bytes | None = None
    inference: bytes | None = None
    metrics: bytes | None = None
    header: bytes | None = None
    """A lower-case header name that may carry a token besides `Authorization`."""

    @classmethod
    def from_settings(cls, settings: Settings) -> Credentials:
        """Tokens from CONVSERVE_*_TOKEN or the files CONVSERVE_*_TOKEN_FILE name; `StartupError` if a
        file cannot be read or holds a weak token."""
        digests: dict[str, bytes | None] = {}
        for role in ("admin", "inference", "metrics"):
            secret = getattr(settings, f"{role}_token")
            path = getattr(settings, f"{role}_token_file")
            if secret is not None:
                digests[role] = _digest(secret.get_secret_value())
            elif path is not None:
                digests[role] = _digest(_read_token(path, f"CONVSERVE_{role.upper()}_TOKEN_FILE"))
            else:
                digests[role] = None
        header = settings.token_header.encode() if settings.token_header else None
        return cls(digests["admin"], digests["inference"], digests["metrics"], header)

    def accepted(self, role: Role) -> tuple[bytes, ...]:
        """Digests any one of which opens `role` (empty: the role is open)."""
        if role is Role.OPEN:
            return ()
        own = {Role.ADMIN: self.admin, Role.INFERENCE: self.inference, Role.METRICS: self.metrics}[role]
        if own is None:
            return ()
        return (own,) if self.admin is None or own == self.admin else (own, self.admin)


@dataclass(frozen=True)
class Refusal:
    status: int
    reason: str
    """The `convserve_rejected_total` label."""
    message: str
    headers: tuple[tuple[bytes, bytes], ...] = ()


def _presented(scope: Scope, header: bytes | None) -> list[bytes]:
    """Every token the request presents: Bearer credentials and the token header's values."""
    tokens = []
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, credentials = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and credentials.strip():
                tokens.append(credentials.strip())
        elif header is not None and name == header and value.strip():
            tokens.append(value.strip())
    return tokens


def check_token_of(scope: Scope, role: Role, credentials: Credentials) -> Refusal | None:
    """None when the request may call a path of `role`; otherwise why not (401 or 403)."""
    accepted = credentials.accepted(role)
    if not accepted:
        return None
    presented = _presented(scope, credentials.header)
    how = "`Authorization: Bearer <token>`" + (
        f" or a `{credentials.header.decode()}` header" if credentials.header else ""
    )
    if not presented:
        return Refusal(
            401,
            "unauthorized",
            f"this endpoint needs the {role} token; send it as {how}",
            ((b"www-authenticate", f'Bearer realm="convserve {role}"'.encode()),),
        )
    # Every candidate is compared with every accepted digest, so the time taken does not say which matched.
    matched = False
    for token in presented:
        digest = _digest(token)
        for expected in accepted:
            matched |= hmac.compare_digest(digest, expected)
    if matched:
        return None
    return Refusal(
        403, "unauthorized", f"the token sent is not valid for this endpoint (needs the {role} token)"
    )


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value
    return None


def _netloc(origin: bytes) -> bytes:
    return origin.partition(b"://")[2].lower()


def check_origin(scope: Scope, allowed_origins: frozenset[bytes]) -> Refusal | None:
    """None unless a browser sent a state-changing request from a page of another site."""
    if scope["method"] in _SAFE_METHODS:
        return None
    origin = _header(scope, b"origin")
    if origin is not None and origin.strip().lower() in allowed_origins:
        return None
    fetch_site = _header(scope, b"sec-fetch-site")
    if fetch_site is not None:
        cross = fetch_site.strip().lower() not in (b"same-origin", b"none")
    elif origin is not None:
        host = _header(scope, b"host")
        cross = origin.strip() == b"null" or host is None or _netloc(origin.strip()) != host.strip().lower()
    else:
        cross = False  # no browser marks: curl, SDKs, tritonclient, another service
    if not cross:
        return None
    return Refusal(
        403,
        "cross_origin",
        "cross-site browser requests may not change anything here; call the API from a server-side "
        "client, or add the page's origin to CONVSERVE_CORS_ORIGINS",
    )


class AccessMiddleware:
    """Refuses requests without the token their path's role needs, and cross-site browser writes."""

    def __init__(
        self,
        app: ASGIApp,
        credentials: Credentials,
        allowed_origins: list[str],
        on_refused: Callable[[str], None],
    ) -> None:
        self.app = app
        self.credentials = credentials
        self.allowed_origins = frozenset(origin.encode() for origin in allowed_origins)
        self.on_refused = on_refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = check_origin(scope, self.allowed_origins) or check_token_of(
            scope, role_of(scope["path"], scope["method"]), self.credentials
        )
        if refusal is None:
            await self.app(scope, receive, send)
            return
        self.on_refused(refusal.reason)
        scope.setdefault("state", {})["error"] = refusal.message
        body = json.dumps({"error": refusal.message}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            *refusal.headers,
        ]
        await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
