"""Datasets: clear errors before training, corrupt files skipped and counted, seeded splits."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from modelcontract import EvalSpec
from tests.training.images import TINY_LABELS, write_image_folder
from training.data import DatasetError, ImageDataset, load_dataset, stratified_split
from training.transforms import eval_transform


def _corrupt(folder: Path) -> list[Path]:
    """A truncated JPEG, a text file named .png and an empty .webp."""
    good = next(folder.glob("*.jpg")).read_bytes()
    truncated, garbage, empty = folder / "truncated.jpg", folder / "garbage.png", folder / "empty.webp"
    truncated.write_bytes(good[: len(good) // 3])
    garbage.write_text("not an image")
    empty.write_bytes(b"")
    return [truncated, garbage, empty]


def test_missing_directory_is_reported_before_training(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"does not exist \(expected DIR/<class>/\*\.jpg\)"):
        load_dataset(str(tmp_path / "nowhere"))


def test_a_single_class_is_refused(tmp_path: Path) -> None:
    write_image_folder(tmp_path, per_class=2)
    for label in TINY_LABELS[1:]:
        for file in (tmp_path / label).iterdir():
            file.unlink()
        (tmp_path / label).rmdir()
    with pytest.raises(DatasetError, match=r"1 class folder\(s\) \['cat'\]; a classifier needs at least 2"):
        load_dataset(str(tmp_path))


def test_an_empty_class_is_named_in_the_error(tmp_path: Path) -> None:
    write_image_folder(tmp_path, per_class=2)
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "notes.txt").write_text("no images here")
    with pytest.raises(DatasetError, match=r"\['dog'\].*hold no readable images"):
        load_dataset(str(tmp_path))


def test_a_class_of_only_corrupt_files_counts_as_empty(tmp_path: Path) -> None:
    write_image_folder(tmp_path, per_class=2)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(DatasetError, match=r"\['broken'\]"):
        load_dataset(str(tmp_path))


def test_corrupt_images_are_skipped_and_counted(tmp_path: Path) -> None:
    write_image_folder(tmp_path, per_class=6)
    bad = _corrupt(tmp_path / "coffee")
    dataset = load_dataset(str(tmp_path), val_split=0.34, seed=1)
    assert sorted(dataset.skipped) == sorted(str(p) for p in bad)
    assert len(dataset.train) + len(dataset.val) == 18
    assert dataset.classes == sorted(TINY_LABELS)


def test_an_image_that_breaks_mid_run_is_skipped_not_fatal(tmp_path: Path, tiny_spec: EvalSpec) -> None:
    write_image_folder(tmp_path, per_class=3)
    dataset = load_dataset(str(tmp_path), val_split=0.34)
    victim = dataset.train[0][0]
    assert isinstance(victim, Path)
    victim.write_bytes(b"corrupted after the check")
    images = ImageDataset(dataset.train, eval_transform(tiny_spec), dataset.skipped)
    tensor, _ = images[0]
    assert tensor.shape == (3, 32, 32)
    assert dataset.skipped == [str(victim)]


def test_train_and_val_folders_are_used_as_given(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "train", per_class=4, seed=0)
    write_image_folder(tmp_path / "val", per_class=2, seed=1)
    dataset = load_dataset(str(tmp_path), val_split=0.5)
    assert (len(dataset.train), len(dataset.val)) == (12, 6)
    assert all("val" in str(path) for path, _ in dataset.val)


def test_val_classes_must_exist_in_train(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "train", per_class=2)
    write_image_folder(tmp_path / "val", per_class=1)
    (tmp_path / "val" / "cat").rename(tmp_path / "val" / "tiger")
    with pytest.raises(DatasetError, match=r"classes \['tiger'\]"):
        load_dataset(str(tmp_path))


def test_stratified_split_is_seeded_and_holds_out_every_class() -> None:
    labels = [0] * 50 + [1] * 30 + [2] * 5 + [3] * 2
    train, val = stratified_split(labels, 0.2, seed=7)
    assert stratified_split(labels, 0.2, seed=7) == (train, val)
    assert stratified_split(labels, 0.2, seed=8) != (train, val)
    assert sorted(train + val) == list(range(len(labels)))
    assert Counter(labels[i] for i in val) == {0: 10, 1: 6, 2: 1, 3: 1}


def test_demo_digits_is_the_real_scikit_learn_set_as_rgb() -> None:
    dataset = load_dataset("demo:digits", val_split=0.2, seed=0)
    assert dataset.classes == [str(d) for d in range(10)]
    assert len(dataset.train) + len(dataset.val) == 1797
    assert 355 <= len(dataset.val) <= 365
    image, _ = dataset.train[0]
    assert not isinstance(image, Path) and image.mode == "RGB" and image.size == (8, 8)
    spec = EvalSpec((96, 96), 96, "bicubic", (0.5,) * 3, (0.5,) * 3)
    tensor = eval_transform(spec)(image)
    assert tensor.shape == (3, 96, 96) and torch.equal(tensor[0], tensor[1])


def test_unknown_demo_dataset_is_refused() -> None:
    with pytest.raises(DatasetError, match="only one is demo:digits"):
        load_dataset("demo:cifar")
