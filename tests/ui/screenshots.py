"""The README's screenshots of the upload page: `python -m tests.ui.screenshots`.

Serves a model repository (default: `models/`, where `make model` puts the ImageNet model, whose
labels read better than the test model's) with a real server, opens the page in the system's
Chromium, uploads two scikit-image photos and saves docs/images/ui.png; then turns the activation
map on and saves docs/images/ui-overlay.png when the served model can be explained, or says why not
(the page's own message) and leaves any older overlay screenshot alone.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from playwright.sync_api import TimeoutError as PlaywrightTimeout
from playwright.sync_api import expect

from service.protocols.ui import PAGE_PATH
from service.settings import Settings
from tests.liveserver import live_server
from tests.photos import jpeg
from tests.ui.browser import REPO_ROOT, chromium, find_chromium

PHOTOS = ("chelsea", "coffee")
OVERLAY_TIMEOUT_MS = 60_000


def capture(repository: Path, out_dir: Path, executable: str) -> str | None:
    """Save ui.png (and ui-overlay.png when explained) in `out_dir`; the page's reason when not."""
    settings = Settings(model_repository=repository, providers=["cpu"], grpc_port=0)
    with (
        tempfile.TemporaryDirectory() as scratch,
        live_server(settings) as server,
        chromium(executable) as browser,
    ):
        files = []
        for name in PHOTOS:
            path = Path(scratch) / f"{name}.jpg"
            path.write_bytes(jpeg(name))
            files.append(path)
        page = browser.new_page(viewport={"width": 1100, "height": 1000})
        page.goto(f"{server.url}{PAGE_PATH}")
        expect(page.locator("#status")).to_contain_text("Ready")
        page.set_input_files("#files", files)
        expect(page.locator(".result .classes li")).not_to_have_count(0)
        expect(page.locator(".result .latency")).to_have_count(len(PHOTOS))
        for latency in page.locator(".result .latency").all():
            expect(latency).to_contain_text("ms round trip")
        out_dir.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=out_dir / "ui.png", full_page=True)
        page.check("#overlay")
        try:
            page.wait_for_function(
                "() => [...document.querySelectorAll('.result img.overlay')].every(i => i.naturalWidth > 0)"
                " || document.querySelector('.result .overlay-error:not([hidden])')",
                timeout=OVERLAY_TIMEOUT_MS,
            )
        except PlaywrightTimeout:
            return f"no overlay within {OVERLAY_TIMEOUT_MS / 1000:g} s"
        refusal = page.locator(".result .overlay-error:not([hidden])")
        if refusal.count():
            return refusal.first.inner_text()
        page.screenshot(path=out_dir / "ui-overlay.png", full_page=True)
    return None


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--repository", type=Path, default=REPO_ROOT / "models", help="model repository to serve"
    )
    parser.add_argument(
        "--out", type=Path, default=REPO_ROOT / "docs" / "images", help="where to save the PNGs"
    )
    args = parser.parse_args()
    executable = find_chromium()
    if executable is None:
        print("no Chromium found: apt-get install chromium", file=sys.stderr)
        return 1
    reason = capture(args.repository, args.out, executable)
    print(f"saved {args.out / 'ui.png'}")
    if reason is None:
        print(f"saved {args.out / 'ui-overlay.png'}")
    else:
        print(f"no overlay screenshot: {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
