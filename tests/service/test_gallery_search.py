"""Nearest neighbours and the kNN vote on constructed vectors, whose right answers are known by design."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.galleries import search
from service.galleries.search import GalleryMatrix, Neighbour, classify, knn_vote, nearest, normalize_rows
from service.galleries.store import GalleryStore

DIM = 32


def gallery_of(vectors: np.ndarray, labels: list[str], version: int = 1) -> GalleryMatrix:
    ids = tuple(f"id{row}" for row in range(len(labels)))
    return GalleryMatrix(version, ids, tuple(labels), normalize_rows(vectors), pending=0)


def random_unit_rows(count: int, seed: int = 0) -> np.ndarray:
    return normalize_rows(np.random.default_rng(seed).standard_normal((count, DIM)))


def test_nearest_finds_the_row_a_query_was_made_from() -> None:
    rows = random_unit_rows(200)
    gallery = gallery_of(rows, [f"label{row % 7}" for row in range(200)])
    noise = np.random.default_rng(1).standard_normal((3, DIM)) * 0.01
    queries = rows[[5, 77, 199]] * 3.0 + noise  # scaled: the query's length must not matter

    found = nearest(gallery, queries, k=4)

    assert [neighbours[0].id for neighbours in found] == ["id5", "id77", "id199"]
    assert [neighbours[0].label for neighbours in found] == ["label5", "label0", "label3"]
    for neighbours in found:
        assert len(neighbours) == 4
        assert neighbours[0].similarity > 0.99
        similarities = [n.similarity for n in neighbours]
        assert similarities == sorted(similarities, reverse=True)


def test_similarity_is_the_cosine_of_the_angle() -> None:
    gallery = gallery_of(np.array([[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0]]), ["x", "y", "xy"])

    (found,) = nearest(gallery, np.array([[5.0, 5.0]]), k=3)

    assert [(n.label, round(n.similarity, 5)) for n in found] == [
        ("x", round(1 / np.sqrt(2), 5)),
        ("y", round(1 / np.sqrt(2), 5)),
        ("xy", -1.0),
    ]


def test_vote_share_counts_each_neighbour_once_and_sums_to_one() -> None:
    neighbours = [
        Neighbour("a1", "cat", 0.9),
        Neighbour("b1", "dog", 0.95),
        Neighbour("a2", "cat", 0.8),
        Neighbour("c1", "fox", 0.7),
        Neighbour("a3", "cat", 0.6),
    ]

    votes = knn_vote(neighbours)

    assert [(v.label, v.votes, v.score, v.best_similarity) for v in votes] == [
        ("cat", 3, 0.6, 0.9),
        ("dog", 1, 0.2, 0.95),
        ("fox", 1, 0.2, 0.7),
    ]
    assert sum(v.score for v in votes) == pytest.approx(1.0)


def test_equal_votes_are_ordered_by_the_nearest_example() -> None:
    votes = knn_vote([Neighbour("1", "far", 0.5), Neighbour("2", "near", 0.9)])

    assert [v.label for v in votes] == ["near", "far"]
    assert [v.score for v in votes] == [0.5, 0.5]


def test_classify_votes_among_k_and_cuts_to_top_k() -> None:
    # Three tight clusters; the query sits in the "b" cluster, whose 4 examples outvote the rest.
    rng = np.random.default_rng(2)
    centres = random_unit_rows(3, seed=3)
    rows = np.concatenate([centres[c] + rng.standard_normal((4, DIM)) * 0.05 for c in range(3)])
    gallery = gallery_of(rows, ["a"] * 4 + ["b"] * 4 + ["c"] * 4)

    (answer,) = classify(gallery, centres[[1]], k=6, top_k=2)

    assert len(answer.neighbours) == 6
    assert {n.label for n in answer.neighbours[:4]} == {"b"}
    assert answer.votes[0].label == "b"
    assert answer.votes[0].score == pytest.approx(4 / 6)
    assert len(answer.votes) == 2
    assert sum(v.score for v in knn_vote(answer.neighbours)) == pytest.approx(1.0)


def test_k_beyond_the_gallery_returns_every_row_and_an_empty_gallery_returns_none() -> None:
    gallery = gallery_of(random_unit_rows(3), ["a", "b", "c"])
    empty = GalleryMatrix(2, (), (), np.empty((0, 0), np.float32), pending=3)

    assert len(nearest(gallery, random_unit_rows(1), k=10)[0]) == 3
    assert nearest(empty, random_unit_rows(2), k=5) == [[], []]
    assert [a.votes for a in classify(empty, random_unit_rows(1), k=5, top_k=3)] == [[]]


def test_large_query_batches_are_scored_in_slices_with_the_same_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gallery = gallery_of(random_unit_rows(50), [str(row % 5) for row in range(50)])
    queries = random_unit_rows(9, seed=4)
    whole = nearest(gallery, queries, k=5)

    monkeypatch.setattr(search, "_MAX_SCORE_FLOATS", 2 * 50)  # two queries per slice
    sliced = nearest(gallery, queries, k=5)

    # BLAS may round a product differently by batch shape: same neighbours, similarities to float32 precision.
    assert [[n.id for n in found] for found in sliced] == [[n.id for n in found] for found in whole]
    for found_sliced, found_whole in zip(sliced, whole, strict=True):
        assert [n.similarity for n in found_sliced] == pytest.approx(
            [n.similarity for n in found_whole], abs=1e-6
        )


@pytest.mark.parametrize(
    ("queries", "message"),
    [
        (np.ones((1, DIM + 1)), "query embeddings have 33 dimensions but gallery version 1 holds 32"),
        (np.zeros((1, DIM)), "all zeros"),
        (np.full((1, DIM), np.nan), "NaN or infinity"),
        (np.ones(DIM), r"expected embeddings of shape \[N, D\]"),
    ],
)
def test_unusable_queries_are_refused_with_the_reason(queries: np.ndarray, message: str) -> None:
    gallery = gallery_of(random_unit_rows(4), list("abcd"))

    with pytest.raises(ValueError, match=message):
        nearest(gallery, queries, k=2)


def test_search_over_a_stores_matrix_finds_the_added_example(tmp_path: Path) -> None:
    rows = random_unit_rows(30, seed=5)
    with GalleryStore(tmp_path, "tiny", max_entries=100, max_bytes=10**6) as store:
        ids = [
            store.add(f"label{row}", [f"image {row}".encode()], rows[[row]], version=1)[0]
            for row in range(30)
        ]

        (answer,) = classify(store.matrix(1), rows[[17]], k=1, top_k=1)

    assert answer.neighbours[0].id == ids[17]
    assert answer.votes[0].label == "label17"
    assert answer.votes[0].score == 1.0
