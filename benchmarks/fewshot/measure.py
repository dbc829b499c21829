"""The two measurements: photos with the ImageNet default, and digits 5-9 after a fine-tune on 0-4.

Every representation (raw pixels, a model's embedding, one of its earlier stages) is scored on the
same episodes: the same seeds, gallery examples and queries. Models are exported into a work
directory (a temporary one unless `--workdir` keeps them for a rerun), never into models/.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.fewshot import IMAGENET, IMAGENET_96
from benchmarks.fewshot.digits import FINE_TUNES, Digits, digit_image, fine_tune
from benchmarks.fewshot.embedders import Embedder, pooled_pixels, with_stage_outputs
from benchmarks.fewshot.episodes import draw_shots, scores, summarize
from benchmarks.fewshot.views import (
    CROP_FRACTIONS,
    JPEG_QUALITY,
    MAX_QUERY_OVERLAP,
    OUTPUT_SIDES,
    PHOTO_CLASSES,
    photo_episode,
)

log = logging.getLogger(__name__)

SHOTS = (1, 5)
PHOTO_QUERIES = 8
"""Query views per photo class and seed."""
PHOTO_SEEDS = (0, 1, 2)
DIGIT_SEEDS = tuple(range(10))
RAW_SIDE = 32
"""Raw pixels of a photo view: the model's input averaged down to 32 x 32 x 3."""
PARITY_DIGITS = 8

Rows = dict[str, np.ndarray]
"""Unit rows of every image under each representation's key."""


def export_imagenet(workdir: Path) -> Path:
    """The default model, as `python -m training pretrained` builds it, with its stage outputs."""
    from training.imagenet import export_imagenet_model  # noqa: PLC0415 (torch, only to export)

    path = workdir / "imagenet" / "1" / "model.onnx"
    if not path.exists():
        export_imagenet_model(path.parent.parent)
    return _staged(path)


def export_imagenet_like(workdir: Path, like: Path, digits: Digits) -> Path:
    """The ImageNet EfficientNet-Lite0, not fine-tuned, exported with the eval transform of `like`
    (the fine-tune's 96 px, full frame): the pretrained backbone's features on the fine-tune's input."""
    import torch  # noqa: PLC0415 (torch, only to export)

    from training.export import export_onnx  # noqa: PLC0415
    from training.imagenet import imagenet_efficientnet_lite0, imagenet_labels  # noqa: PLC0415
    from training.transforms import eval_transform  # noqa: PLC0415

    path = workdir / "imagenet-96" / "1" / "model.onnx"
    if not path.exists():
        spec = Embedder(like).metadata.eval_spec
        transform = eval_transform(spec)
        images = [digit_image(digits.pixels[i]) for i in digits.unseen[:PARITY_DIGITS]]
        export_onnx(
            imagenet_efficientnet_lite0(),
            path.parent,
            labels=imagenet_labels(),
            eval_spec=spec,
            backbone="efficientnet_lite0",
            parity_inputs=torch.stack([transform(image) for image in images]),
        )
    return _staged(path)


def fine_tuned(workdir: Path, digits: Digits, schedule: str) -> tuple[Path, dict[str, Any]]:
    """The fine-tune on digits 0-4 with its stage outputs, and its description (reused from `workdir`)."""
    record = workdir / f"fine-tune-{schedule}.json"
    path = workdir / f"fine-tune-{schedule}" / "1" / "model.onnx"
    if path.exists() and record.exists():
        return _staged(path), json.loads(record.read_text())
    path, described = fine_tune(digits, workdir, schedule)
    record.write_text(json.dumps(described))
    return _staged(path), described


def _staged(path: Path) -> Path:
    target = path.with_name("model-stages.onnx")
    return target if target.exists() else with_stage_outputs(path, target)


def representations(embedder: Embedder, encoded: list[bytes], model: str) -> Rows:
    """`model`'s embedding and stage rows of `encoded`, under "<model>: <layer>"."""
    return {f"{model}: {layer}": rows for layer, rows in embedder.embed(encoded).items()}


def measure_photos(model: Path) -> dict[str, Any]:
    """Top-1 on photo views of `PHOTO_CLASSES`: raw pixels and the ImageNet model's representations."""
    names = list(PHOTO_CLASSES)
    embedder = Embedder(model)
    per_seed: dict[str, list[dict[str, float]]] = {}
    dims: dict[str, int] = {}
    for seed in PHOTO_SEEDS:
        episode = photo_episode(names, max(SHOTS), PHOTO_QUERIES, seed)
        encoded = [b for views in episode.gallery for b in views] + [b for q in episode.queries for b in q]
        labels = [n for n in names for _ in range(max(SHOTS))] + [
            n for n in names for _ in range(PHOTO_QUERIES)
        ]
        rows = {f"raw pixels ({RAW_SIDE}x{RAW_SIDE})": pooled_pixels(embedder.inputs(encoded), RAW_SIDE)}
        rows.update(representations(embedder, encoded, IMAGENET))
        gallery = np.arange(len(names) * max(SHOTS)).reshape(len(names), max(SHOTS))
        queries = np.arange(gallery.size, len(encoded))
        for key, vectors in rows.items():
            dims[key] = int(vectors.shape[1])
            per_seed.setdefault(key, []).append(scores(vectors, labels, gallery, queries, SHOTS))
        log.info("photos, seed %d: %s", seed, {k: v[-1]["k5"] for k, v in per_seed.items()})
    return {
        "classes": PHOTO_CLASSES,
        "queries_per_class": PHOTO_QUERIES,
        "queries": PHOTO_QUERIES * len(names),
        "seeds": list(PHOTO_SEEDS),
        "views": {
            "crop_fraction_of_shorter_side": list(CROP_FRACTIONS),
            "output_side_px": list(OUTPUT_SIDES),
            "flip_probability": 0.5,
            "max_query_overlap_iou": MAX_QUERY_OVERLAP,
            "encoding": f"JPEG quality {JPEG_QUALITY}",
        },
        "rows": _rows(per_seed, dims),
    }


def measure_digits(workdir: Path, digits: Digits) -> dict[str, Any]:
    """Top-1 on digits 5-9 (unseen) and 0-4 (seen): raw pixels and four models' representations.

    A fine-tuned model's stage that the fine-tune left as it was (frozen blocks give the very rows of
    the ImageNet weights at the same input) is listed under `unchanged_by_fine_tune`, not scored twice.
    """
    tunes = {schedule: fine_tuned(workdir, digits, schedule) for schedule in FINE_TUNES}
    pretrained = export_imagenet_like(workdir, tunes["short"][0], digits)
    rows: Rows = {"raw pixels (8x8)": digits.pixels.reshape(len(digits.labels), -1)}
    rows.update(representations(Embedder(export_imagenet(workdir)), digits.encoded, IMAGENET))
    rows.update(representations(Embedder(pretrained), digits.encoded, IMAGENET_96))
    unchanged: dict[str, list[str]] = {}
    for path, described in tunes.values():
        model = f"fine-tuned on 0-4, {_epochs(described)} epochs"
        for key, vectors in representations(Embedder(path), digits.encoded, model).items():
            layer = key.split(": ", 1)[1]
            same = rows.get(f"{IMAGENET_96}: {layer}")
            if layer != "embedding" and same is not None and np.allclose(vectors, same, atol=1e-5):
                unchanged.setdefault(model, []).append(layer)
            else:
                rows[key] = vectors
    labels = [str(d) for d in digits.labels]
    dims = {key: int(vectors.shape[1]) for key, vectors in rows.items()}
    results: dict[str, Any] = {
        "fine_tunes": [described for _, described in tunes.values()],
        "unchanged_by_fine_tune": unchanged,
    }
    for task, episodes in {"unseen": _unseen_episodes(digits), "seen": _seen_episodes(digits)}.items():
        per_seed = {
            key: [scores(vectors, labels, gallery, queries, SHOTS) for gallery, queries in episodes]
            for key, vectors in rows.items()
        }
        results[task] = {
            "classes": sorted({labels[i] for i in episodes[0][1]}),
            "queries": len(episodes[0][1]),
            "seeds": list(DIGIT_SEEDS),
            "rows": _rows(per_seed, dims),
        }
    return results


def _epochs(described: dict[str, Any]) -> str:
    options = described["options"]
    return f"{options['frozen_epochs']}+{options['unfrozen_epochs']}"


def _unseen_episodes(digits: Digits) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per seed: k examples per class of 5-9, and every other 5-9 digit as a query."""
    episodes = []
    for seed in DIGIT_SEEDS:
        gallery = digits.unseen[draw_shots(digits.labels[digits.unseen], max(SHOTS), seed)]
        episodes.append((gallery, np.setdiff1d(digits.unseen, gallery.ravel())))
    return episodes


def _seen_episodes(digits: Digits) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per seed: k examples per class from the fine-tune's own images of 0-4, the held-out 0-4 as queries."""
    return [
        (digits.train[draw_shots(digits.labels[digits.train], max(SHOTS), seed)], digits.held_out)
        for seed in DIGIT_SEEDS
    ]


def _rows(per_seed: dict[str, list[dict[str, float]]], dims: dict[str, int]) -> list[dict[str, Any]]:
    return [
        {"representation": key, "dim": dims[key], **summarize(seeds), "per_seed_k5": [s["k5"] for s in seeds]}
        for key, seeds in per_seed.items()
    ]
