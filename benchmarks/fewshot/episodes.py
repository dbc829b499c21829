"""Few-shot episodes scored with the product's own search: galleries built as `GalleryMatrix`, queries
answered by `classify`, top-1 counted.

An episode draws `k` gallery examples per class (the first k of a seeded per-class order, so the
1-shot gallery is part of the 5-shot one) and scores every query against it. "Centered" is one
normalization tried on top: subtract the gallery's mean row from gallery and queries before the
cosine (the gallery alone decides it, so a service could apply it when a gallery changes).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from service.galleries.search import GalleryMatrix, classify, normalize_rows


def gallery_matrix(vectors: np.ndarray, labels: Sequence[str]) -> GalleryMatrix:
    """A gallery of `vectors` [N, D] with `labels`, as `GalleryStore.matrix` would hand it to a query."""
    rows = normalize_rows(vectors)
    rows.flags.writeable = False
    return GalleryMatrix(
        version=1,
        ids=[f"example-{i}" for i in range(len(rows))],
        labels=list(labels),
        vectors=rows,
        pending=0,
    )


def top1(
    gallery: np.ndarray,
    gallery_labels: Sequence[str],
    queries: np.ndarray,
    query_labels: Sequence[str],
    neighbours: int = 1,
) -> float:
    """Share of `queries` whose first label by the kNN vote among `neighbours` examples is their own."""
    answers = classify(gallery_matrix(gallery, gallery_labels), queries, k=neighbours, top_k=1)
    hits = sum(answer.votes[0].label == truth for answer, truth in zip(answers, query_labels, strict=True))
    return hits / len(query_labels)


def centered(gallery: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gallery and queries minus the gallery's mean row."""
    mean = gallery.mean(axis=0, keepdims=True)
    return gallery - mean, queries - mean


def draw_shots(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """[classes, shots] indices into `labels`: a seeded order of each class's items (classes sorted)."""
    rng = np.random.default_rng(seed)
    chosen = []
    for value in np.unique(labels):
        members = np.flatnonzero(labels == value)
        if len(members) < shots:
            raise ValueError(f"class {value} has {len(members)} items, fewer than {shots} shots")
        chosen.append(rng.permutation(members)[:shots])
    return np.stack(chosen)


def scores(
    vectors: np.ndarray,
    labels: Sequence[str],
    gallery: np.ndarray,
    queries: np.ndarray,
    shots: Sequence[int],
) -> dict[str, float]:
    """Top-1 of one episode for each k in `shots`, plain and centered, with 1 neighbour; for k > 1
    also by the vote of k neighbours. `gallery` is [classes, max shots] indices into `vectors`."""
    names = np.asarray(labels)
    found: dict[str, float] = {}
    for k in shots:
        chosen = gallery[:, :k].ravel()
        examples, asked = vectors[chosen], vectors[queries]
        truth = list(names[queries])
        found[f"k{k}"] = top1(examples, names[chosen], asked, truth)
        shifted_examples, shifted_asked = centered(examples, asked)
        found[f"k{k}_centered"] = top1(shifted_examples, names[chosen], shifted_asked, truth)
        if k > 1:
            found[f"k{k}_vote"] = top1(examples, names[chosen], asked, truth, neighbours=k)
    return found


def summarize(per_seed: Sequence[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean, min and max over seeds of each score."""
    return {
        key: {
            "mean": round(float(np.mean([s[key] for s in per_seed])), 4),
            "min": round(min(s[key] for s in per_seed), 4),
            "max": round(max(s[key] for s in per_seed), 4),
        }
        for key in per_seed[0]
    }
