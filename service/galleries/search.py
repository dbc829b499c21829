"""Exact nearest-neighbour search over one version's gallery embeddings, and the kNN vote on labels.

Similarity is cosine similarity: the inner product of L2-normalized vectors, in [-1, 1], higher is
nearer. Rows are normalized once, when they enter the store (`normalize_rows`); a query is normalized
here, so a batch of queries costs one matrix product with the gallery plus a partial sort.

Why exact NumPy search rather than an index library (faiss-cpu, usearch): one query against D=1280
float32 rows (OpenBLAS, 2 shared CPU cores) took p50 1 ms / p99 9 ms at 10^4 entries and p50 17 ms /
p99 51 ms at 10^5 (a batch of 32 queries: 15 ms and 170 ms, so ~5 ms a query at 10^5). At 10^4 that is
far below the model's own inference; at 10^5 it is comparable to it. An approximate index (HNSW)
would answer in about a millisecond at 10^5, but brings a native dependency, a persistence format of
its own beside the journal, and recall below 1; faiss's exact index would cost what NumPy costs. So:
exact search while galleries stay below ~5 x 10^4 entries (`GalleryStore`'s `max_entries` bounds the
linear cost), an index only if they must grow past that. Rows are float32 in memory because NumPy has
no BLAS float16 product: converting a float16 matrix per query took 63 ms at 10^4 entries.

The vote: each of the k nearest examples casts one vote for its label; a label's score is its share
of the votes (votes / neighbours found, so the scores of all labels sum to 1). Labels with equal
votes are ordered by their best similarity, then by name, so the order never depends on hashing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# The query-by-gallery similarity block is computed in slices of at most this many floats (64 MiB),
# so a large batch of queries against a large gallery does not allocate Q x N scores at once.
_MAX_SCORE_FLOATS = 16 * 1024 * 1024


@dataclass(frozen=True)
class GalleryMatrix:
    """The embeddings of one model version as a query sees them: complete for that version, never
    mixed with rows of another version. Built by `GalleryStore.matrix`; immutable."""

    version: int
    ids: Sequence[str]
    """Entry id of each row."""
    labels: Sequence[str]
    """Label of each row."""
    vectors: np.ndarray
    """float32 [rows, dim], every row L2-normalized; read-only."""
    pending: int
    """Entries of the gallery that have no embedding for this version yet (not searched)."""

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class Neighbour:
    """One gallery example near a query."""

    id: str
    label: str
    similarity: float
    """Cosine similarity to the query, in [-1, 1]."""


@dataclass(frozen=True)
class LabelVote:
    """One label's result of the kNN vote among a query's nearest examples."""

    label: str
    score: float
    """Share of the neighbours' votes, in (0, 1]; the scores of all labels of a query sum to 1."""
    votes: int
    best_similarity: float
    """Similarity of this label's nearest example."""


@dataclass(frozen=True)
class GalleryAnswer:
    """What the gallery says about one query: the labels by vote, and the neighbours that voted."""

    votes: list[LabelVote]
    neighbours: list[Neighbour]
    """The k nearest examples, nearest first."""


def normalize_rows(matrix: np.ndarray) -> np.ndarray:
    """`matrix` [N, D] as float32 with every row scaled to unit L2 norm (a new array).

    Raises ValueError for anything that has no direction: a zero row, or a non-finite value.
    """
    rows = np.asarray(matrix, dtype=np.float32)
    if rows.ndim != 2 or rows.shape[1] == 0:
        raise ValueError(f"expected embeddings of shape [N, D] with D >= 1, got {list(rows.shape)}")
    if not np.isfinite(rows).all():
        raise ValueError("embeddings contain NaN or infinity; expected finite float32 values")
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    if (norms == 0).any():
        zero = int(np.flatnonzero(norms[:, 0] == 0)[0])
        raise ValueError(f"embedding row {zero} is all zeros and has no direction to compare")
    return rows / norms


def nearest(gallery: GalleryMatrix, queries: np.ndarray, k: int) -> list[list[Neighbour]]:
    """The `k` nearest examples of each query row (fewer when the gallery is smaller), nearest first.

    `queries` is [Q, D] with the gallery's D; it is normalized here. An empty gallery gives empty lists.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    unit = normalize_rows(queries)
    if len(gallery) == 0:
        return [[] for _ in range(unit.shape[0])]
    if unit.shape[1] != gallery.dim:
        raise ValueError(
            f"query embeddings have {unit.shape[1]} dimensions but gallery version {gallery.version} "
            f"holds {gallery.dim}; embed the queries with the same model version"
        )
    found = min(k, len(gallery))
    step = max(1, _MAX_SCORE_FLOATS // len(gallery))
    results: list[list[Neighbour]] = []
    for start in range(0, unit.shape[0], step):
        scores = unit[start : start + step] @ gallery.vectors.T
        results.extend(_top_rows(gallery, row, found) for row in scores)
    return results


def _top_rows(gallery: GalleryMatrix, scores: np.ndarray, found: int) -> list[Neighbour]:
    if found < scores.shape[0]:
        candidates = np.argpartition(-scores, found - 1)[:found]
    else:
        candidates = np.arange(scores.shape[0])
    # Nearest first; equal similarities by row order, so results are reproducible.
    ordered = candidates[np.lexsort((candidates, -scores[candidates]))]
    return [
        Neighbour(id=gallery.ids[row], label=gallery.labels[row], similarity=float(scores[row]))
        for row in ordered
    ]


def knn_vote(neighbours: list[Neighbour]) -> list[LabelVote]:
    """Every label among `neighbours` with its vote share, best first (see the module docstring)."""
    tally: dict[str, tuple[int, float]] = {}
    for neighbour in neighbours:
        votes, best = tally.get(neighbour.label, (0, -np.inf))
        tally[neighbour.label] = (votes + 1, max(best, neighbour.similarity))
    total = len(neighbours)
    ranked = sorted(tally.items(), key=lambda item: (-item[1][0], -item[1][1], item[0]))
    return [
        LabelVote(label=label, score=votes / total, votes=votes, best_similarity=best)
        for label, (votes, best) in ranked
    ]


def classify(gallery: GalleryMatrix, queries: np.ndarray, k: int, top_k: int) -> list[GalleryAnswer]:
    """For each query row: the `top_k` labels of the vote among its `k` nearest examples, and those
    examples. An empty gallery answers every query with no votes and no neighbours."""
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    return [
        GalleryAnswer(votes=knn_vote(found)[:top_k], neighbours=found)
        for found in nearest(gallery, queries, k)
    ]
