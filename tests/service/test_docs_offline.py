"""The API docs work without internet: `/docs` and `/redoc` name only this server, and it serves every
asset they name, to anyone, even with an inference token set. Real uvicorn, real HTTP.

What a page would fetch is read from its HTML (every `src`, `href`, `spec-url` and any attribute
holding a URL), its inline scripts (Swagger UI's init script: string URLs, `url: '...'`) and styles
(`url(...)`), plus every `http(s)://` anywhere in the page; each must resolve to this server. No
allowance is needed: the pages hold no off-server string at all. The vendored bundles themselves are
third-party code full of documentation links and XML namespaces that are never fetched; they are
checked by what the page configures instead (Swagger UI's validator badge is the one default that
would fetch from elsewhere, so the init script must turn it off) and, for the stylesheet, by its
`url(...)` references.
"""

from __future__ import annotations

import hashlib
import http.client
import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx
import pytest

from service.protocols.docs import STATIC_DIR
from tests.liveserver import LiveServer, live_server
from tests.tinymodel import tiny_settings

INFERENCE = "inference-0123456789abcdef"
PAGES = ("/docs", "/redoc", "/docs/oauth2-redirect")
_URL_ATTRIBUTES = frozenset({"src", "href", "spec-url", "action", "data", "poster", "srcset"})
_ABSOLUTE = re.compile(r"""(?:https?:)?//[^\s'"<>()]+""", re.IGNORECASE)
_CSS_URL = re.compile(r"""url\(\s*(['"]?)(.*?)\1\s*\)""", re.IGNORECASE | re.DOTALL)
_SCRIPT_URL = re.compile(r"""\burl\s*:\s*(['"])(.*?)\1""")
# (expected content type, minimum size): a truncated or placeholder file fails.
_EXPECTED = {
    ".js": ("text/javascript", 500_000),
    ".css": ("text/css", 100_000),
    ".png": ("image/png", 200),
    ".json": ("application/json", 2_000),
}


@pytest.fixture(scope="module")
def server(model_repository: Path) -> Iterator[LiveServer]:
    """A server whose inference API needs a token: the docs must not."""
    with live_server(tiny_settings(model_repository, inference_token=INFERENCE)) as live:
        yield live


class _Page(HTMLParser):
    """The URLs a browser could fetch for this page, and its inline script and style text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.references: list[str] = []
        self.inline: list[str] = []
        self._inside: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if value is None:
                continue
            if name == "srcset":  # "url 1x, url 2x"
                self.references += [part.split()[0] for part in value.split(",") if part.strip()]
            elif name in _URL_ATTRIBUTES:
                self.references.append(value)
            elif name == "style":
                self.inline.append(value)
            elif _ABSOLUTE.search(value):  # a URL in any other attribute (`content=`, `data-*`) counts too
                self.references.append(value)
        self._inside = tag if tag in ("script", "style") else None

    def handle_endtag(self, tag: str) -> None:
        self._inside = None

    def handle_data(self, data: str) -> None:
        if self._inside is not None:
            self.inline.append(data)


def _references(html: str) -> list[str]:
    page = _Page()
    page.feed(html)
    page.close()
    found = list(page.references)
    for text in page.inline:
        found += [match.group(2) for match in _CSS_URL.finditer(text)]
        found += [match.group(2) for match in _SCRIPT_URL.finditer(text)]
    found += _ABSOLUTE.findall(html)  # comments, text, anything the parser does not see as a URL
    return found


def _is_local(reference: str, page_url: str) -> bool:
    target = urlsplit(urljoin(page_url, reference.strip()))
    if target.scheme == "data":
        return True
    return target.scheme in ("http", "https") and target.netloc == urlsplit(page_url).netloc


def _fetched(reference: str, page_url: str) -> bool:
    return urlsplit(urljoin(page_url, reference.strip())).scheme != "data"


@pytest.mark.parametrize("path", PAGES)
def test_docs_page_names_only_this_server(server: LiveServer, path: str) -> None:
    answer = httpx.get(f"{server.url}{path}")  # no token
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/html")
    references = _references(answer.text)
    if path != "/docs/oauth2-redirect":  # the redirect page is inline script only
        assert references, f"no URL found in {path}: the parser no longer sees the page's assets"
    off_server = [ref for ref in references if not _is_local(ref, str(answer.url))]
    assert not off_server, f"{path} would fetch from other hosts: {off_server}"


def test_swagger_ui_is_told_not_to_fetch_the_validator_badge(server: LiveServer) -> None:
    # The bundle's default is an image from validator.swagger.io, which would also tell it the spec's URL.
    assert b"https://validator.swagger.io/validator" in (STATIC_DIR / "swagger-ui-bundle.js").read_bytes()
    page = httpx.get(f"{server.url}/docs").text
    assert re.search(r'"validatorUrl"\s*:\s*null', page), page


def test_redoc_loads_no_web_fonts(server: LiveServer) -> None:
    page = httpx.get(f"{server.url}/redoc").text
    assert "<redoc spec-url=" in page
    assert "fonts.googleapis" not in page and "@import" not in page


@pytest.mark.parametrize("path", PAGES)
def test_every_asset_a_docs_page_names_is_served_without_a_token(server: LiveServer, path: str) -> None:
    page_url = f"{server.url}{path}"
    fetched = {
        urljoin(page_url, ref) for ref in _references(httpx.get(page_url).text) if _fetched(ref, page_url)
    }
    if path == "/docs":
        assert {urlsplit(url).path for url in fetched} >= {
            "/openapi.json",
            "/docs/static/swagger-ui-bundle.js",
            "/docs/static/swagger-ui.css",
        }
    if path == "/redoc":
        assert {urlsplit(url).path for url in fetched} >= {
            "/openapi.json",
            "/docs/static/redoc.standalone.js",
        }
    for url in fetched:
        answer = httpx.get(url)
        assert answer.status_code == 200, f"{url}: {answer.status_code} {answer.text[:200]}"
        content_type, minimum = _EXPECTED[Path(urlsplit(url).path).suffix or ".json"]
        assert answer.headers["content-type"].startswith(content_type), (url, answer.headers)
        assert len(answer.content) >= minimum, f"{url} is only {len(answer.content)} bytes"


def test_assets_are_the_vendored_files_and_cacheable_for_good(server: LiveServer) -> None:
    page = httpx.get(f"{server.url}/docs").text
    (css_url,) = [ref for ref in _references(page) if "swagger-ui.css" in ref]
    assert urlsplit(css_url).query, "an immutable asset needs a URL that changes with its content"
    answer = httpx.get(urljoin(server.url, css_url))
    assert answer.content == (STATIC_DIR / "swagger-ui.css").read_bytes()
    assert "immutable" in answer.headers["cache-control"]
    assert answer.headers["x-content-type-options"] == "nosniff"
    revalidated = httpx.get(urljoin(server.url, css_url), headers={"if-none-match": answer.headers["etag"]})
    assert revalidated.status_code == 304 and revalidated.content == b""
    # The stylesheet's own references are inline data, never another host or a missing file.
    css_references = [match.group(2) for match in _CSS_URL.finditer(answer.text)]
    assert css_references and all(ref.startswith("data:") for ref in css_references), css_references


def test_the_vendored_files_match_their_readme() -> None:
    readme = (STATIC_DIR / "README.md").read_text()
    listed = dict(re.findall(r"^\| `([^`]+)` \|.*\| `([0-9a-f]{64})` \|$", readme, re.MULTILINE))
    # (ui/ holds the upload page: our own files, not vendored ones)
    present = {path.name for path in STATIC_DIR.iterdir() if path.is_file() and path.name != "README.md"}
    assert set(listed) == present, "every vendored file, and only those, has a README row"
    for name, digest in listed.items():
        assert hashlib.sha256((STATIC_DIR / name).read_bytes()).hexdigest() == digest, name
    assert {"swagger-ui-dist.LICENSE", "redoc.LICENSE"} <= present


def test_open_docs_paths_do_not_open_anything_else(server: LiveServer) -> None:
    assert httpx.post(f"{server.url}/predict").status_code == 401  # the token is really required
    assert httpx.get(f"{server.url}/openapi.json").json()["paths"]
    assert httpx.get(f"{server.url}/docs/static/no-such.js").status_code == 404
    # Sent as written (httpx would resolve the `..` itself): routed to the docs assets, not to /predict.
    connection = http.client.HTTPConnection(server.host, server.port, timeout=30)
    try:
        for path in ("/docs/static/../predict", "/docs/static/..%2Fpredict", "/docs/static/README.md"):
            connection.request("POST" if "predict" in path else "GET", path)
            response = connection.getresponse()
            body = response.read()
            assert response.status in (404, 405), (path, response.status, body)
    finally:
        connection.close()
