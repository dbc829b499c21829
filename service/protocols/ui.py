"""The upload page at `/ui`: pick images, see their top-k classes, the activation map, the latency.

Plain HTML, CSS and JavaScript from `static/ui/`, served by the service itself: no CDN, no build
step. The page only calls routes any client may call with the inference token (`/readyz`, the V2
model metadata, `/predict`, the explain verb), so it can show nothing a client could not ask for;
the page and its files are open (`service.transport.access` lists `PAGE_PATH` and `STATIC_PREFIX`),
and the calls it makes carry the token the person pastes into it.

As with the API docs (`service.protocols.docs`), file URLs carry a digest of their content and are
cached as immutable. The page itself is rendered per request: it names those URLs below the app's
root path (a proxy's prefix), and the script reads the root from the page. It runs under a
Content-Security-Policy that allows this server's own script, style and connections, plus `blob:`
images (the person's own files and the overlays, shown from memory) and nothing else.
"""

from __future__ import annotations

import functools
import hashlib
import html
from pathlib import Path

from fastapi import APIRouter, Request
from starlette.exceptions import HTTPException
from starlette.responses import HTMLResponse, RedirectResponse, Response

from service.protocols.docs import FAVICON, Asset, asset_url
from service.textsafety import brief

PAGE_PATH = "/ui"
STATIC_PREFIX = "/ui/static"
"""Where the page's script and style are served; open without a token (`service.transport.access`)."""

STATIC_DIR = Path(__file__).with_name("static") / "ui"
PAGE_FILE = "index.html"
_MEDIA_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' blob:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
_PAGE_HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    # Rendered per request (the root path goes in), and small: never cached, so a new release shows at once.
    "cache-control": "no-cache",
}

router = APIRouter(include_in_schema=False)


@functools.cache
def assets() -> dict[str, Asset]:
    """The page's script and style by file name, read once per process."""
    loaded = {}
    for path in sorted(STATIC_DIR.iterdir()):
        media_type = _MEDIA_TYPES.get(path.suffix)
        if media_type is not None:
            body = path.read_bytes()
            loaded[path.name] = Asset(body, media_type, hashlib.sha256(body).hexdigest()[:16])
    return loaded


@functools.cache
def _template() -> str:
    return (STATIC_DIR / PAGE_FILE).read_text(encoding="utf-8")


def _root(request: Request) -> str:
    return str(request.scope.get("root_path", "")).rstrip("/")


def render_page(root: str, favicon_url: str) -> str:
    """The page with the app's root path and its files' URLs filled in (`{{root}}`, `{{asset:NAME}}`,
    and `{{favicon}}`, the API docs' icon)."""
    page = _template().replace("{{root}}", html.escape(root)).replace("{{favicon}}", html.escape(favicon_url))
    for name, asset in assets().items():
        page = page.replace(
            f"{{{{asset:{name}}}}}", f"{html.escape(root)}{STATIC_PREFIX}/{name}?v={asset.digest}"
        )
    return page


@router.get(PAGE_PATH)
async def page(request: Request) -> HTMLResponse:
    return HTMLResponse(render_page(_root(request), asset_url(request, FAVICON)), headers=_PAGE_HEADERS)


@router.get("/")
async def home(request: Request) -> RedirectResponse:
    """A person who opens the server's address gets the page."""
    return RedirectResponse(f"{_root(request)}{PAGE_PATH}", status_code=307)


@router.get(STATIC_PREFIX + "/{name}")
async def static_file(request: Request, name: str) -> Response:
    asset = assets().get(name)
    if asset is None:
        raise HTTPException(404, f"no page file {brief(name)}; the page at {PAGE_PATH} names its files")
    return asset.response(request)
