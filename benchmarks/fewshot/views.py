"""The photo classes and their views: seeded crops, flips and scales of scikit-image's sample photos.

Each class is one photo. A view is a square crop of it (a random fraction of its shorter side, at a
random place), mirrored or not, resized to a random side: what a gallery example or a query of that
photo looks like. Queries are drawn apart from the gallery: a query crop may overlap each gallery crop
of its class by at most `MAX_QUERY_OVERLAP` (intersection over union), so a query is another part or
framing of the photo, never a near-copy of an example.

Classes are whole photos, so this is recognising other views of the same scene or object: easier than
recognising another cat from one cat, and the docs say so.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from training.photos import sample_photo

PHOTO_CLASSES: dict[str, str] = {
    "brick": "texture",
    "grass": "texture",
    "gravel": "texture",
    "chelsea": "animal",
    "astronaut": "person",
    "camera": "person",
    "coffee": "object",
    "coins": "object",
    "clock": "object",
    "rocket": "object",
    "stereo_motorcycle": "object",
    "moon": "scene",
    "hubble_deep_field": "scene",
    "page": "document",
    "text": "document",
    "immunohistochemistry": "microscopy",
    "retina": "microscopy",
    "cell": "microscopy",
}
"""scikit-image's bundled photos (no download), each a class, with the kind of picture it is. The
synthetic samples (checkerboard, logo, binary blobs, phantoms) are left out: they are not photos."""
CROP_FRACTIONS = (0.35, 0.7)
"""Range of a crop's side, as a fraction of the photo's shorter side."""
OUTPUT_SIDES = (128, 384)
"""Range of a view's side after resizing, in pixels: the same content at different scales."""
MAX_QUERY_OVERLAP = 0.25
"""Largest intersection over union a query crop may have with any gallery crop of its class."""
JPEG_QUALITY = 90
_MAX_DRAWS = 10_000


@dataclass(frozen=True)
class View:
    box: tuple[int, int, int, int]
    """(x0, y0, x1, y1) of the square crop, in the photo's pixels."""
    flip: bool
    """Mirrored left to right."""
    side: int
    """Side of the rendered view, in pixels."""


def random_view(size: tuple[int, int], rng: np.random.Generator) -> View:
    """A random square crop of a photo of `size` (width, height), flip and output side."""
    width, height = size
    side = max(1, int(rng.uniform(*CROP_FRACTIONS) * min(width, height)))
    x0 = int(rng.integers(0, width - side + 1))
    y0 = int(rng.integers(0, height - side + 1))
    return View((x0, y0, x0 + side, y0 + side), bool(rng.integers(2)), int(rng.integers(*OUTPUT_SIDES)))


def overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection over union of two boxes (x0, y0, x1, y1)."""
    width = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def draw_views(
    size: tuple[int, int],
    shots: int,
    queries: int,
    rng: np.random.Generator,
    max_overlap: float = MAX_QUERY_OVERLAP,
) -> tuple[list[View], list[View]]:
    """`shots` gallery views and `queries` query views of one photo, each query overlapping every
    gallery view by at most `max_overlap` (IoU)."""
    gallery = [random_view(size, rng) for _ in range(shots)]
    chosen: list[View] = []
    for _ in range(_MAX_DRAWS):
        if len(chosen) == queries:
            return gallery, chosen
        view = random_view(size, rng)
        if all(overlap(view.box, example.box) <= max_overlap for example in gallery):
            chosen.append(view)
    raise ValueError(
        f"found only {len(chosen)} of {queries} query crops of a {size[0]}x{size[1]} photo apart from its "
        f"{shots} gallery crops in {_MAX_DRAWS} draws; lower the shots or raise the overlap allowed"
    )


def view_image(photo: Image.Image, view: View) -> Image.Image:
    """The view as an RGB image: cropped, resized (Lanczos) and mirrored as it says."""
    image = photo.crop(view.box).resize((view.side, view.side), Image.Resampling.LANCZOS)
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if view.flip else image


def encode_jpeg(image: Image.Image) -> bytes:
    """The bytes a client would send: a JPEG at `JPEG_QUALITY`."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


@dataclass(frozen=True)
class PhotoEpisode:
    """The encoded views of one seed: `shots` gallery views and `queries` queries per class."""

    seed: int
    gallery: list[list[bytes]]
    """[class][shot] encoded gallery views; the first `k` of each class are the k-shot gallery."""
    queries: list[list[bytes]]
    """[class][query] encoded query views."""


def photo_episode(names: list[str], shots: int, queries: int, seed: int) -> PhotoEpisode:
    """Every class's views for `seed`: one generator per seed, classes drawn in `names` order."""
    rng = np.random.default_rng(seed)
    gallery, query = [], []
    for name in names:
        photo = sample_photo(name)
        examples, others = draw_views(photo.size, shots, queries, rng)
        gallery.append([encode_jpeg(view_image(photo, view)) for view in examples])
        query.append([encode_jpeg(view_image(photo, view)) for view in others])
    return PhotoEpisode(seed, gallery, query)
