"""The gallery API end to end: a real server on the tiny model (which exports an embedding), real photos,
real files on disk; queries through `/predict?mode=gallery`.

Each test arranges what it checks (two labels of photos, a full gallery, a missing token, a held
embedding claim) and asserts both the answer and what the gallery directory holds afterwards.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from modelcontract import publish_version
from service.app import ROUTERS
from service.galleries.store import EMBEDDER_LOCK_NAME, GalleryStore
from service.settings import Settings
from service.transport.access import Role, role_of
from tests.liveserver import LiveServer, live_server, service_env, service_process
from tests.photos import encode, jpeg, photo
from tests.service.promtext import metric
from tests.tinymodel import MODEL_NAME, TINY_LABELS, export_tiny, tiny_settings
from tests.waiting import wait_until

ADMIN = "admin-0123456789abcdef"
INFERENCE = "inference-0123456789abcdef"
GALLERY = f"/v1/models/{MODEL_NAME}/gallery"


def admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN}"}


def cat_photos() -> list[bytes]:
    """Two encodings of the same cat: different bytes (two entries), nearly the same embedding."""
    return [jpeg("chelsea", quality=90), jpeg("chelsea", quality=50)]


def cup_photos() -> list[bytes]:
    return [jpeg("coffee", quality=90), jpeg("coffee", quality=50)]


def add(client: httpx.Client, label: str | None, images: list[bytes], **kwargs: Any) -> httpx.Response:
    files = [("image", (f"{index}.jpg", data, "image/jpeg")) for index, data in enumerate(images)]
    data = {} if label is None else {"label": label}
    return client.post(GALLERY, files=files, data=data, headers=kwargs.pop("headers", admin()), **kwargs)


def query(
    client: httpx.Client, image: bytes, version: int | None = None, model: str | None = MODEL_NAME
) -> httpx.Response:
    """`/predict?mode=gallery`: the gallery's top 3 labels by their vote, and the nearest examples."""
    params: dict[str, Any] = {"mode": "gallery", "top_k": 3}
    params |= {**({"model": model} if model else {}), **({"version": version} if version else {})}
    return client.post("/predict", params=params, files={"image": ("q.jpg", image, "image/jpeg")})


@pytest.fixture
def repository(tmp_path: Path, tiny_model_path: Path) -> Path:
    """A repository of its own (a test may publish a version 2), holding the tiny model's version 1."""
    root = tmp_path / "repository"
    (root / MODEL_NAME / "1").mkdir(parents=True)
    shutil.copy(tiny_model_path, root / MODEL_NAME / "1" / "model.onnx")
    return root


@pytest.fixture
def gallery_dir(tmp_path: Path) -> Path:
    return tmp_path / "galleries"


@pytest.fixture
def settings_for(repository: Path, gallery_dir: Path) -> Callable[..., Settings]:
    def build(**fields: Any) -> Settings:
        defaults: dict[str, Any] = {
            "gallery_dir": gallery_dir,
            "admin_token": ADMIN,
            "gallery_k": 3,
            "repository_poll_s": 0.2,
        }
        return tiny_settings(repository, **{**defaults, **fields})

    return build


@pytest.fixture
def server(settings_for: Callable[..., Settings]) -> Iterator[LiveServer]:
    with live_server(settings_for()) as live:
        yield live


def listing(client: httpx.Client) -> dict[str, Any]:
    response = client.get(GALLERY)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def stored(gallery_dir: Path) -> tuple[dict[str, int], dict[int, int], int]:
    """What the directory holds, read by a store of the test's own (as another worker would):
    labels, embedded rows per version, image files."""
    with GalleryStore(gallery_dir, MODEL_NAME, max_entries=1000, max_bytes=1 << 30) as store:
        stats = store.stats()
        labels = store.labels()
    images = len(list((gallery_dir / MODEL_NAME / "images").iterdir()))
    return labels, stats.rows_per_version, images


# ---- the API ------------------------------------------------------------------------------------


def test_examples_are_added_listed_searched_and_removed(server: LiveServer, gallery_dir: Path) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        cats = add(client, "cat", cat_photos())
        cups = add(client, "cup", cup_photos())
        assert cats.status_code == 201, cats.text
        assert cats.json()["model"] == MODEL_NAME and cats.json()["label"] == "cat"
        cat_ids, cup_ids = cats.json()["ids"], cups.json()["ids"]
        assert len(cat_ids) == 2 and len(cup_ids) == 2 and len(set(cat_ids + cup_ids)) == 4
        body = listing(client)
        assert body["labels"] == {"cat": 2, "cup": 2}
        assert (body["entries"], body["version"], body["pending"]) == (4, 1, 0)
        assert body["versions"] == {"1": {"embedded": 4, "pending": 0}}

        # Another encoding of each photo: its own entries are its nearest neighbours.
        for image, label, ids in (
            (jpeg("chelsea", 75), "cat", cat_ids),
            (jpeg("coffee", 75), "cup", cup_ids),
        ):
            answer = query(client, image)
            assert answer.status_code == 200, answer.text
            result = answer.json()
            assert (result["model"]["version"], result["entries"]) == (1, 4)
            assert result["predictions"][0][0]["label"] == label
            assert result["predictions"][0][0]["votes"] == 2
            assert result["predictions"][0][0]["score"] == pytest.approx(2 / 3)
            nearest = result["neighbours"][0]
            assert len(nearest) == 3  # CONVSERVE_GALLERY_K
            assert {n["id"] for n in nearest[:2]} == set(ids)
            assert nearest[0]["similarity"] >= nearest[1]["similarity"] >= nearest[2]["similarity"]

        removed = client.delete(f"{GALLERY}/entries/{cat_ids[0]}", headers=admin())
        assert removed.status_code == 204
        assert listing(client)["labels"] == {"cat": 1, "cup": 2}
        again = client.delete(f"{GALLERY}/entries/{cat_ids[0]}", headers=admin())
        assert again.status_code == 404 and "no entry" in again.json()["error"]
        by_label = client.delete(f"{GALLERY}/cat", headers=admin())
        assert by_label.json() == {"model": MODEL_NAME, "label": "cat", "removed": 1}
        assert client.delete(f"{GALLERY}/cat", headers=admin()).status_code == 404
        assert listing(client)["labels"] == {"cup": 2}
        # Without ?model=, the default model's gallery (the only model served).
        assert query(client, jpeg("chelsea", 75), model=None).json()["predictions"][0][0]["label"] == "cup"

        metrics = client.get("/metrics").text
    assert metric(metrics, f'convserve_gallery_entries{{model="{MODEL_NAME}"}}') == 2
    assert metric(metrics, 'convserve_gallery_changes_total{change="add"}') == 4
    assert metric(metrics, 'convserve_gallery_changes_total{change="remove"}') == 2
    assert metric(metrics, "convserve_gallery_query_seconds_count") == 3
    assert stored(gallery_dir) == ({"cup": 2}, {1: 2}, 2)


def test_mode_both_answers_the_classes_and_the_gallery_side_by_side(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        add(client, "cat", cat_photos())
        files = {"image": ("q.jpg", jpeg("chelsea", 75), "image/jpeg")}
        both = client.post("/predict", params={"mode": "both", "top_k": 2, "embedding": "true"}, files=files)
        plain = client.post("/predict", params={"top_k": 2}, files=files)
        unknown = client.post("/predict", params={"mode": "nearest"}, files=files)
    assert both.status_code == 200, both.text
    body = both.json()
    assert body["predictions"] == plain.json()["predictions"]  # the classifier's, as without a gallery
    assert {p["label"] for p in body["predictions"][0]} <= set(TINY_LABELS)
    gallery = body["gallery"]
    assert (gallery["version"], gallery["entries"]) == (1, 2)
    assert gallery["predictions"][0][0]["label"] == "cat" and len(gallery["neighbours"][0]) == 2
    assert len(body["embeddings"]) == 1  # asked for, so answered too
    assert unknown.status_code == 422 and "mode" in unknown.text


def test_a_restarted_server_keeps_the_gallery(settings_for: Callable[..., Settings]) -> None:
    with live_server(settings_for()) as first, httpx.Client(base_url=first.url, timeout=30) as client:
        ids = add(client, "cat", cat_photos()).json()["ids"]
    with (
        live_server(settings_for()) as second,
        httpx.Client(base_url=second.url, timeout=30) as client,
    ):
        assert listing(client)["labels"] == {"cat": 2}
        nearest = query(client, cat_photos()[0]).json()["neighbours"][0]
        assert nearest[0]["id"] == ids[0]
        assert nearest[0]["similarity"] == pytest.approx(1.0, abs=1e-5)  # the very same bytes


def test_mistakes_are_4xx_and_write_nothing(server: LiveServer, gallery_dir: Path) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        assert add(client, "cat", cat_photos()[:1]).status_code == 201
        cases: list[tuple[httpx.Response, int, str]] = [
            (add(client, None, cat_photos()), 422, "`label` form field"),
            (
                client.post(
                    GALLERY,
                    files=[("image", ("a.jpg", cat_photos()[1], "image/jpeg"))],
                    data={"label": ["a", "b"]},
                    headers=admin(),
                ),
                422,
                "exactly one",
            ),
            (add(client, "dog/husky", cat_photos()), 422, "may not contain `/`"),
            (add(client, " cat", cat_photos()), 422, "whitespace"),
            (add(client, "x" * 129, cat_photos()), 422, "1 to 128"),
            (add(client, "cat", [cat_photos()[1], b"not an image at all"]), 422, ""),
            (client.post(GALLERY, json={"label": "cat"}, headers=admin()), 415, "multipart/form-data"),
            (client.post(GALLERY, data={"label": "cat"}, headers=admin()), 415, "multipart/form-data"),
            (client.get("/v1/models/no-such-model/gallery"), 404, "unknown model"),
            (client.delete(f"{GALLERY}/entries/zzz", headers=admin()), 404, "16 hex digits"),
            (query(client, jpeg("chelsea"), version=7), 404, "no version 7"),
        ]
        for response, status, words in cases:
            assert response.status_code == status, response.text
            assert words in response.json()["error"], response.text
        assert listing(client)["labels"] == {"cat": 1}
    assert stored(gallery_dir) == ({"cat": 1}, {1: 1}, 1)


def test_bounds_refuse_an_add_whole_with_413_or_507(
    settings_for: Callable[..., Settings], gallery_dir: Path
) -> None:
    one_image = len(cat_photos()[0])
    settings = settings_for(gallery_max_entries=3, gallery_max_bytes=3 * one_image)
    with live_server(settings) as live, httpx.Client(base_url=live.url, timeout=30) as client:
        assert add(client, "cat", cat_photos()).status_code == 201
        full = add(client, "cup", cup_photos())  # 4 entries > 3
        assert full.status_code == 507, full.text
        assert "CONVSERVE_GALLERY_MAX_ENTRIES" in full.json()["error"]
        never = add(client, "cup", [*cup_photos(), *cat_photos()])  # more than a whole gallery
        assert never.status_code == 413, never.text
        big = encode(photo("astronaut"), "PNG")  # over the byte limit on its own
        assert add(client, "big", [big]).status_code == 413
        assert listing(client)["labels"] == {"cat": 2}
    assert stored(gallery_dir) == ({"cat": 2}, {1: 2}, 2)


# ---- who may write ----------------------------------------------------------------------------------


def test_writes_need_the_admin_token_and_reads_the_inference_token(
    settings_for: Callable[..., Settings], gallery_dir: Path
) -> None:
    with (
        live_server(settings_for(inference_token=INFERENCE)) as live,
        httpx.Client(base_url=live.url, timeout=30) as client,
    ):
        inference = {"Authorization": f"Bearer {INFERENCE}"}
        assert add(client, "cat", cat_photos(), headers={}).status_code == 401
        assert add(client, "cat", cat_photos(), headers=inference).status_code == 403
        ids = add(client, "cat", cat_photos()).json()["ids"]
        for path in (f"{GALLERY}/cat", f"{GALLERY}/entries/{ids[0]}"):
            assert client.delete(path).status_code == 401
            assert client.delete(path, headers=inference).status_code == 403
        assert client.get(GALLERY).status_code == 401
        assert client.get(GALLERY, headers=inference).json()["labels"] == {"cat": 2}
    assert stored(gallery_dir)[0] == {"cat": 2}


def test_every_gallery_write_route_is_admin_and_every_read_inference() -> None:
    routes = [
        (str(getattr(route, "path", "")), method)
        for router in ROUTERS
        for route in router.routes
        for method in getattr(route, "methods", ())
        if "/gallery" in str(getattr(route, "path", ""))
    ]
    assert {method for _, method in routes} == {"GET", "POST", "DELETE"}
    for path, method in routes:
        concrete = path.replace("{model_name}", MODEL_NAME).replace("{label}", "cat")
        concrete = concrete.replace("{entry_id}", "0123456789abcdef")
        expected = Role.INFERENCE if method == "GET" else Role.ADMIN
        assert role_of(concrete, method) is expected, (path, method)


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"gallery_writes": False}, "read-only"),
        ({"admin_token": None}, "need the admin token"),
    ],
)
def test_writes_are_refused_when_turned_off_or_unguarded(
    settings_for: Callable[..., Settings], gallery_dir: Path, fields: dict[str, Any], words: str
) -> None:
    with live_server(settings_for(**fields)) as live, httpx.Client(base_url=live.url, timeout=30) as client:
        refused = add(client, "cat", cat_photos())
        assert refused.status_code == 403 and words in refused.json()["error"]
        assert client.delete(f"{GALLERY}/cat", headers=admin()).status_code == 403
        assert listing(client)["entries"] == 0


def test_galleries_off_answer_404_saying_how_to_turn_them_on(repository: Path) -> None:
    with live_server(tiny_settings(repository)) as live, httpx.Client(base_url=live.url) as client:
        for response in (
            client.get(GALLERY),
            add(client, "cat", cat_photos()),
            client.delete(f"{GALLERY}/cat"),
            client.delete(f"{GALLERY}/entries/0123456789abcdef"),
        ):
            assert response.status_code == 404
            assert "CONVSERVE_GALLERY_DIR" in response.json()["error"]


# ---- versions -----------------------------------------------------------------------------------------


@pytest.fixture
def version_2(tmp_path: Path) -> Path:
    """A differently seeded tiny model (another embedding space), staged for publishing as version 2."""
    staging = tmp_path / "staging"
    export_tiny(staging, TINY_LABELS, seed=1)
    return staging


def test_a_new_version_is_re_embedded_in_the_background_and_versions_never_mix(
    settings_for: Callable[..., Settings], repository: Path, gallery_dir: Path, version_2: Path
) -> None:
    with (
        live_server(settings_for()) as live,
        httpx.Client(base_url=live.url, timeout=30) as client,
    ):
        ids = add(client, "cat", cat_photos()).json()["ids"] + add(client, "cup", cup_photos()).json()["ids"]
        # Hold the embedding claim, as another worker embedding this gallery would: nothing re-embeds.
        claim = os.open(gallery_dir / MODEL_NAME / EMBEDDER_LOCK_NAME, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(claim, fcntl.LOCK_EX)
            publish_version(version_2, repository / MODEL_NAME)
            wait_until(lambda: listing(client)["versions"].keys() == {"2"}, "version 2 replacing version 1")
            waiting = listing(client)
            assert waiting["version"] is None and waiting["pending"] == 4
            refused = query(client, cat_photos()[0])
            assert refused.status_code == 503 and refused.headers["retry-after"]
            assert "being embedded" in refused.json()["error"]
            assert "version 2: 4 of 4 pending" in refused.json()["error"]
        finally:
            os.close(claim)  # releases the claim
        wait_until(lambda: listing(client)["pending"] == 0, "version 2 embedding every entry")
        assert listing(client)["version"] == 2
        answer = query(client, cat_photos()[0]).json()
        assert answer["model"]["version"] == 2
        nearest = answer["neighbours"][0][0]
        # The very same bytes, embedded by version 2 both times: similarity 1 only if no version-1 row
        # was ever compared with a version-2 query.
        assert nearest["id"] == ids[0]
        assert nearest["similarity"] == pytest.approx(1.0, abs=1e-5)
        wait_until(lambda: stored(gallery_dir)[1] == {2: 4}, "version 1's embeddings dropped")
        metrics = client.get("/metrics").text
    assert metric(metrics, 'convserve_gallery_pending{version="2"}') == 0


def test_two_servers_sharing_a_gallery_embed_each_entry_once(
    settings_for: Callable[..., Settings], repository: Path, gallery_dir: Path, version_2: Path
) -> None:
    def decoded_by_version_2(live: LiveServer) -> float:
        text = httpx.get(f"{live.url}/metrics").text
        return metric(text, 'convserve_preprocess_duration_seconds_count{version="2"}')

    with (
        live_server(settings_for()) as first,
        live_server(settings_for()) as second,
        httpx.Client(base_url=first.url, timeout=30) as client,
    ):
        add(client, "cat", cat_photos())
        add(client, "cup", cup_photos())
        claim = os.open(gallery_dir / MODEL_NAME / EMBEDDER_LOCK_NAME, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(claim, fcntl.LOCK_EX)  # neither server embeds until both serve version 2
            publish_version(version_2, repository / MODEL_NAME)
            for live in (first, second):
                with httpx.Client(base_url=live.url, timeout=30) as each:
                    wait_until(
                        lambda each=each: listing(each)["versions"].keys() == {"2"}, "version 2 served"
                    )
            before = decoded_by_version_2(first) + decoded_by_version_2(second)
        finally:
            os.close(claim)
        for live in (first, second):
            with httpx.Client(base_url=live.url, timeout=30) as each:
                wait_until(lambda each=each: listing(each)["pending"] == 0, "version 2 complete")
        # Both servers saw 4 pending entries; between them they decoded each image once.
        assert decoded_by_version_2(first) + decoded_by_version_2(second) - before == 4
    assert stored(gallery_dir)[1] == {2: 4}


# ---- several workers ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_workers_lose_no_concurrent_add(repository: Path, gallery_dir: Path, tmp_path: Path) -> None:
    env = service_env(
        repository, WORKERS="2", GALLERY_DIR=str(gallery_dir), ADMIN_TOKEN=ADMIN, MAX_QUEUE_SIZE="64"
    )
    with (
        service_process(env, log_path=tmp_path / "service.log") as server,
        httpx.Client(base_url=server.url, timeout=60) as client,
    ):
        images = [jpeg("chelsea", quality) for quality in range(40, 96, 5)]  # 12 distinct files
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda image: add(client, "cat", [image]), images))
        assert [a.status_code for a in answers] == [201] * len(images), server.log()
        ids = {entry_id for a in answers for entry_id in a.json()["ids"]}
        assert len(ids) == len(images)
        for _ in range(4):  # whichever worker answers, it reads the shared journal
            assert listing(client)["labels"] == {"cat": len(images)}
    assert stored(gallery_dir) == ({"cat": len(images)}, {1: len(images)}, len(images))
