"""Headless Chromium for the page tests: the system's browser (Debian's `chromium`), driven by Playwright.

Playwright's own browser download needs its CDN; the system browser needs only the Debian mirror, and
`.ci/run` installs it there. `find_chromium()` says where one is; the tests skip, with one line, when
none is.

A `Watched` page records what a person would not see but a broken page shows: console errors,
uncaught exceptions and answers of 400 and above. A test names the failures it provokes (a 401 before
the token is pasted, say) and asserts that nothing else went wrong.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from playwright.sync_api import Browser, ConsoleMessage, Page, Response, sync_playwright

INFERENCE_TOKEN = "inference-0123456789abcdef"
"""The inference token the page tests' server asks for, as a production one would."""
CHROMIUM_VARIABLE = "CONVSERVE_TEST_CHROMIUM"
"""An explicit browser binary, for a machine whose Chromium is elsewhere."""
_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Chromium's console line for every answer of 400 or above, names the status; the URL is in its location.
_FAILED_LOAD = re.compile(r"^Failed to load resource: the server responded with a status of (\d{3})\b")
REPO_ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO_ROOT / "test-artifacts" / "ui"
"""Screenshots the tests leave for a person (or CI) to look at; gitignored."""


NO_CHROMIUM = (
    f"no Chromium to test the upload page with: `apt-get install chromium` (`make test` does, as root), "
    f"or name one in {CHROMIUM_VARIABLE}"
)


def find_chromium() -> str | None:
    explicit = os.environ.get(CHROMIUM_VARIABLE)
    if explicit:
        return explicit
    for name in _CANDIDATES:
        found = shutil.which(name)
        if found is not None:
            return found
    return None


@contextmanager
def chromium(executable: str) -> Iterator[Browser]:
    # --no-sandbox: CI runs as root in a container, where Chromium's sandbox cannot start.
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class Watched:
    """A page and everything that went wrong on it so far."""

    page: Page
    console_errors: list[tuple[str, str]] = field(default_factory=list)
    """(text, URL of its source) of every console error."""
    page_errors: list[str] = field(default_factory=list)
    failed: list[tuple[str, int]] = field(default_factory=list)
    """(URL, status) of every answer of 400 or above."""
    unanswered: list[str] = field(default_factory=list)
    """URLs of requests that got no answer at all."""

    def unexpected(self, allowed: set[tuple[str, int]]) -> list[str]:
        """Everything that went wrong except answers `allowed` as (path, status), and the
        console lines Chromium writes for exactly those."""
        problems = [f"page error: {error}" for error in self.page_errors]
        problems += [f"no answer: {url}" for url in self.unanswered]
        problems += [
            f"HTTP {status}: {url}" for url, status in self.failed if (_local(url), status) not in allowed
        ]
        for text, url in self.console_errors:
            failed_load = _FAILED_LOAD.match(text)
            if failed_load is None or (_local(url), int(failed_load.group(1))) not in allowed:
                problems.append(f"console error: {text} ({url})")
        return problems


def _local(url: str) -> str:
    """The path of an absolute URL of the server under test, without its query."""
    return urlsplit(url).path


def watch(page: Page) -> Watched:
    watched = Watched(page)

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            watched.console_errors.append((message.text, str(message.location.get("url", ""))))

    def on_response(response: Response) -> None:
        if response.status >= 400:
            watched.failed.append((response.url, response.status))

    page.on("console", on_console)
    page.on("pageerror", lambda error: watched.page_errors.append(str(error)))
    page.on("response", on_response)
    page.on("requestfailed", lambda request: watched.unanswered.append(request.url))
    return watched
