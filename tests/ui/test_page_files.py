"""The upload page and its files over plain HTTP: open without a token, under a Content-Security-Policy
that the page keeps (no inline script), with everything it names served by this server."""

from __future__ import annotations

import re

import httpx

from service.protocols.ui import PAGE_PATH
from tests.liveserver import LiveServer


def test_page_and_its_files_load_without_a_token_under_a_csp(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url, timeout=10) as client:
        answer = client.get(PAGE_PATH)
        assert answer.status_code == 200, answer.text
        policy = answer.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "default-src 'none'" in policy
        assert not re.search(r"<script(?![^>]*\bsrc=)", answer.text), "an inline script the CSP would block"
        files = re.findall(r'(?:src|href)="([^"]+)"', answer.text)
        assert len(files) == 3  # the icon, the style sheet, the script
        for url in files:
            asset = client.get(url)
            assert asset.status_code == 200, f"{url}: {asset.status_code} {asset.text[:200]}"
        assert client.get("/ui/static/nothing.js").status_code == 404
        home = client.get("/")
        assert (home.status_code, home.headers["location"]) == (307, PAGE_PATH)
        # The page is open; what it calls is not.
        assert client.post("/predict", files={"image": b"x"}).status_code == 401
