"""The upload page in a real browser: headless Chromium, a real server with two tiny models (one of
which can be explained), real photos.

The server asks for an inference token, as a production one would: the page itself loads without it,
its calls need the token the person pastes, and what the service answers (labels, errors) is what the
page shows. Each browser test fails on any console error, uncaught exception or failed request
other than the ones it provokes. Screenshots go to test-artifacts/ui/.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image
from playwright.sync_api import Browser, Page, expect

from service.protocols.ui import PAGE_PATH
from tests.explainmodel import EXPLAIN_MODEL_NAME
from tests.liveserver import LiveServer
from tests.photos import jpeg
from tests.tinymodel import MODEL_NAME
from tests.ui.browser import ARTIFACTS, INFERENCE_TOKEN, NO_CHROMIUM, Watched, find_chromium, watch

if find_chromium() is None:
    pytest.skip(NO_CHROMIUM, allow_module_level=True)

AUTH = {"Authorization": f"Bearer {INFERENCE_TOKEN}"}
EXPLAIN_PATH = f"/v1/models/{MODEL_NAME}:explain"
# What the page asks before the token is pasted: each model's V2 metadata (401).
FIRST_LOAD = {(f"/v2/models/{MODEL_NAME}", 401), (f"/v2/models/{EXPLAIN_MODEL_NAME}", 401)}
# The control ids in the order Tab reaches them.
FOCUS_ORDER = ("model", "version", "top-k", "token", "overlay", "files")


@pytest.fixture(scope="module")
def cat_photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("photos") / "chelsea.jpg"
    path.write_bytes(jpeg("chelsea"))
    return path


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1100, "height": 800})
    try:
        yield context.new_page()
    finally:
        context.close()


def open_page(page: Page, server: LiveServer, model: str = MODEL_NAME) -> Watched:
    """The page, watched from before its first request, with `model` chosen."""
    watched = watch(page)
    page.goto(f"{server.url}{PAGE_PATH}")
    expect(page.locator("#status")).to_contain_text("Model details unavailable")  # no token yet: 401
    expect(page.locator("#model option")).to_have_text(sorted((MODEL_NAME, EXPLAIN_MODEL_NAME)))
    page.select_option("#model", model)
    return watched


def paste_token(page: Page) -> None:
    page.fill("#token", INFERENCE_TOKEN)
    page.press("#token", "Tab")  # leaving the field commits it, as a person would
    # The model's V2 metadata answered: the token works.
    expect(page.locator("#status")).to_contain_text("serves version 1.")
    expect(page.locator("#version option")).to_have_text(["newest", "version 1"])


def screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=ARTIFACTS / name, full_page=True)


def test_upload_shows_the_top_label_of_predict_and_the_overlay_or_why_not(
    server: LiveServer, page: Page, cat_photo: Path
) -> None:
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client:
        predicted = client.post(
            "/predict", params={"model": MODEL_NAME}, files={"image": cat_photo.read_bytes()}
        )
        explained = client.post(
            EXPLAIN_PATH, params={"format": "png"}, files={"image": cat_photo.read_bytes()}
        )
    assert predicted.status_code == 200, predicted.text
    top_label = predicted.json()["predictions"][0][0]["label"]
    watched = open_page(page, server)
    paste_token(page)

    page.set_input_files("#files", cat_photo)
    result = page.locator(".result")
    expect(result.locator(".classes li .label").first).to_have_text(top_label)
    expect(result.locator(".classes li")).to_have_count(len(predicted.json()["predictions"][0]))
    expect(result.locator(".latency")).to_contain_text(f"ms round trip, {MODEL_NAME} version 1")
    screenshot(page, "upload.png")

    page.focus("#overlay")
    page.keyboard.press("Space")
    expect(page.locator("#overlay")).to_be_checked()
    # LeNet flattens its feature map, so the service cannot explain it: the page says what the service said.
    assert 400 <= explained.status_code < 500, explained.text
    expect(result.locator(".overlay-error")).to_contain_text(
        f"HTTP {explained.status_code}: {explained.json()['error']}"
    )
    expect(result.locator("img.photo")).to_be_visible()
    allowed = {*FIRST_LOAD, (EXPLAIN_PATH, explained.status_code)}
    screenshot(page, "upload-overlay.png")
    assert not watched.unexpected(allowed)


def test_the_overlay_toggle_shows_the_explain_png_and_hides_it_again(
    server: LiveServer, page: Page, cat_photo: Path
) -> None:
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client:
        explained = client.post(
            f"/v1/models/{EXPLAIN_MODEL_NAME}:explain",
            params={"format": "png"},
            files={"image": cat_photo.read_bytes()},
        )
    assert explained.status_code == 200, explained.text
    overlay_width = Image.open(io.BytesIO(explained.content)).width
    watched = open_page(page, server, EXPLAIN_MODEL_NAME)
    paste_token(page)
    page.check("#overlay")
    page.set_input_files("#files", cat_photo)
    result = page.locator(".result")
    expect(result.locator("img.overlay")).to_be_visible()
    page.wait_for_function("() => document.querySelector('.result img.overlay').naturalWidth > 0")
    assert result.locator("img.overlay").evaluate("image => image.naturalWidth") == overlay_width
    expect(result.locator("img.photo")).to_be_hidden()
    screenshot(page, "overlay.png")
    page.focus("#overlay")
    page.keyboard.press("Space")  # the toggle is a real checkbox: the keyboard works it
    expect(result.locator("img.photo")).to_be_visible()
    expect(result.locator("img.overlay")).to_be_hidden()
    assert not watched.unexpected(FIRST_LOAD)


def test_the_page_shows_what_the_service_refused_and_why(
    server: LiveServer, page: Page, tmp_path: Path
) -> None:
    not_a_photo = tmp_path / "notes.jpg"
    not_a_photo.write_bytes(b"these are notes, not a JPEG")
    upload = {"image": (not_a_photo.name, not_a_photo.read_bytes(), "image/jpeg")}
    with httpx.Client(base_url=server.url, timeout=30) as client:
        unauthorized = client.post("/predict", params={"model": MODEL_NAME}, files=upload)
        undecodable = client.post("/predict", params={"model": MODEL_NAME}, headers=AUTH, files=upload)
    assert (unauthorized.status_code, undecodable.status_code) == (401, 422)
    watched = open_page(page, server)

    page.set_input_files("#files", not_a_photo)  # before the token is pasted
    expect(page.locator(".result .error").first).to_contain_text(f"HTTP 401: {unauthorized.json()['error']}")
    paste_token(page)
    page.set_input_files("#files", not_a_photo)
    expect(page.locator(".result .error").first).to_contain_text(f"HTTP 422: {undecodable.json()['error']}")
    expect(page.locator(".result .classes li")).to_have_count(0)
    screenshot(page, "refused.png")
    assert not watched.unexpected({*FIRST_LOAD, ("/predict", 401), ("/predict", 422)})


def test_dropped_photos_each_get_the_top_label_predict_gives_them(server: LiveServer, page: Page) -> None:
    photos = {name: jpeg(name) for name in ("chelsea", "coffee")}
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client:
        expected = {}
        for name, data in photos.items():
            answer = client.post("/predict", params={"model": MODEL_NAME}, files={"image": data})
            assert answer.status_code == 200, answer.text
            expected[f"{name}.jpg"] = answer.json()["predictions"][0][0]["label"]
    watched = open_page(page, server)
    paste_token(page)
    # What a drag from the file manager delivers: a DataTransfer holding the files.
    dropped = page.evaluate_handle(
        """(photos) => {
            const transfer = new DataTransfer();
            for (const [name, bytes] of Object.entries(photos)) {
                transfer.items.add(new File([new Uint8Array(bytes)], name + ".jpg", { type: "image/jpeg" }));
            }
            return transfer;
        }""",
        {name: list(data) for name, data in photos.items()},
    )
    page.dispatch_event("#drop", "drop", {"dataTransfer": dropped})
    results = page.locator(".result")
    expect(results).to_have_count(len(photos))
    for result in results.all():
        name = result.locator(".name").inner_text()
        expect(result.locator(".classes li .label").first).to_have_text(expected[name])
    assert not watched.unexpected(FIRST_LOAD)


def test_tab_reaches_every_control_in_order(server: LiveServer, page: Page) -> None:
    watched = open_page(page, server)
    reached = []
    for _ in FOCUS_ORDER:
        page.keyboard.press("Tab")
        reached.append(page.evaluate("() => document.activeElement.id"))
    assert reached == list(FOCUS_ORDER)
    assert not watched.unexpected(FIRST_LOAD)
