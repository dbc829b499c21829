"""The API docs, Swagger UI at `/docs` and ReDoc at `/redoc`, with every asset served by the service.

FastAPI's own docs pages load their JavaScript and CSS from a CDN, so they are blank wherever the
cluster has no internet. These pages are built with FastAPI's public helpers but point at copies of
the assets vendored in `static/` (which npm package and version each comes from, and how to refresh
them: `static/README.md`), served under `STATIC_PREFIX` by a small allow-listed route.

Asset URLs carry a digest of their content (`?v=`), so they can be cached as immutable: a new copy
gets a new URL. The docs hold nothing a client could not learn by calling the API, so they and their
assets are open without a token (`service.transport.access` lists `STATIC_PREFIX` as open).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from starlette.exceptions import HTTPException
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route, Router

from service.textsafety import brief

DOCS_PATH = "/docs"
OAUTH2_REDIRECT_PATH = "/docs/oauth2-redirect"
REDOC_PATH = "/redoc"
STATIC_PREFIX = "/docs/static"
"""Where the assets are served; open without a token (`service.transport.access`)."""

STATIC_DIR = Path(__file__).with_name("static")
_MEDIA_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".txt": "text/plain; charset=utf-8",
}
SWAGGER_JS = "swagger-ui-bundle.js"
SWAGGER_CSS = "swagger-ui.css"
FAVICON = "favicon-32x32.png"
REDOC_JS = "redoc.standalone.js"
# The bundles name their third-party notices in a comment, as files next to them: served too.
_SERVED = (SWAGGER_JS, SWAGGER_CSS, FAVICON, REDOC_JS, f"{SWAGGER_JS}.LICENSE.txt", f"{REDOC_JS}.LICENSE.txt")
_CACHE_CONTROL = "public, max-age=31536000, immutable"
# Swagger UI shows a badge image fetched from validator.swagger.io, with the spec's URL in the query,
# unless this is null: the page would reach off the server and tell a third party where the API is.
_SWAGGER_PARAMETERS = {"validatorUrl": None}


@dataclass(frozen=True)
class Asset:
    body: bytes
    media_type: str
    digest: str
    """The first 16 hex digits of the body's SHA-256: the `?v=` of its URL and its ETag."""

    def response(self, request: Request) -> Response:
        """The asset, cached as immutable (its URL names its digest), or 304 when the client has it."""
        etag = f'"{self.digest}"'
        headers = {"cache-control": _CACHE_CONTROL, "etag": etag, "x-content-type-options": "nosniff"}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return Response(self.body, media_type=self.media_type, headers=headers)


@functools.cache
def assets() -> dict[str, Asset]:
    """The served assets by file name, read once per process (about 3 MB)."""
    loaded = {}
    for name in _SERVED:
        body = (STATIC_DIR / name).read_bytes()
        media_type = _MEDIA_TYPES[Path(name).suffix]
        loaded[name] = Asset(body, media_type, hashlib.sha256(body).hexdigest()[:16])
    return loaded


def asset_url(request: Request, name: str) -> str:
    """The versioned URL of asset `name`, below the app's root path (a proxy's prefix)."""
    return f"{_root(request)}{STATIC_PREFIX}/{name}?v={assets()[name].digest}"


def _root(request: Request) -> str:
    return str(request.scope.get("root_path", "")).rstrip("/")


def _openapi_url(request: Request) -> str:
    app: FastAPI = request.app
    return f"{_root(request)}{app.openapi_url}"


async def swagger_ui(request: Request) -> HTMLResponse:
    app: FastAPI = request.app
    return get_swagger_ui_html(
        openapi_url=_openapi_url(request),
        title=f"{app.title} - Swagger UI",
        swagger_js_url=asset_url(request, SWAGGER_JS),
        swagger_css_url=asset_url(request, SWAGGER_CSS),
        swagger_favicon_url=asset_url(request, FAVICON),
        oauth2_redirect_url=f"{_root(request)}{OAUTH2_REDIRECT_PATH}",
        init_oauth=app.swagger_ui_init_oauth,
        swagger_ui_parameters={**(app.swagger_ui_parameters or {}), **_SWAGGER_PARAMETERS},
    )


async def swagger_ui_redirect(request: Request) -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


async def redoc(request: Request) -> HTMLResponse:
    app: FastAPI = request.app
    return get_redoc_html(
        openapi_url=_openapi_url(request),
        title=f"{app.title} - ReDoc",
        redoc_js_url=asset_url(request, REDOC_JS),
        redoc_favicon_url=asset_url(request, FAVICON),
        with_google_fonts=False,  # the page would fetch its fonts from Google; the browser's own do
    )


async def static_asset(request: Request) -> Response:
    name = request.path_params["name"]
    asset = assets().get(name)
    if asset is None:
        raise HTTPException(
            404, f"no docs asset {brief(name)}; the docs pages at /docs and /redoc name theirs"
        )
    return asset.response(request)


def install_docs(app: FastAPI) -> None:
    """Serve the docs pages and their assets on `app` (built with `docs_url=None, redoc_url=None`)."""
    assets()  # a missing or unreadable asset fails the start, not the first visitor
    # On the app itself, like FastAPI's own docs routes, outside the OpenAPI document.
    app.add_route(DOCS_PATH, swagger_ui, include_in_schema=False)
    app.add_route(OAUTH2_REDIRECT_PATH, swagger_ui_redirect, include_in_schema=False)
    app.add_route(REDOC_PATH, redoc, include_in_schema=False)
    app.mount(STATIC_PREFIX, Router([Route("/{name}", static_asset, methods=["GET"])]))
