"""Datasets: an ImageFolder on disk or `demo:digits`, split, checked and wrapped for training, and
the loaders that hand each training process its shard.

Every problem that would waste a training run is raised here, before any training: a missing
directory, fewer than two classes, an empty class. Unreadable or corrupt image files are skipped
and counted instead of crashing the run.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from modelcontract import EvalSpec
from training.transforms import eval_transform, train_transform

if TYPE_CHECKING:
    from training.config import RunConfig
    from training.distributed import Ranks

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
_IMAGE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)

# An image source is a file on disk or an image already in memory (demo:digits).
Source = Path | Image.Image
Sample = tuple[Source, int]

Batches = DataLoader[tuple[torch.Tensor, int]]
PARITY_IMAGES = 16
"""Validation images kept for the export parity check (and stored in the checkpoint for `export`)."""

__all__ = ["ImageDataset", "LabelledImages", "Loaders", "eval_transform", "load_dataset", "make_loaders"]


class DatasetError(ValueError):
    """The dataset cannot be trained on; the message says what to fix."""


@dataclass
class LabelledImages:
    """A dataset split into train and validation samples, with the class names and skipped files."""

    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    skipped: list[str] = field(default_factory=list)
    """Files that could not be read (checked before training, or found while training)."""


def load_rgb(source: Source) -> Image.Image:
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    with Image.open(source) as image:
        return image.convert("RGB")


def _readable(path: Path) -> bool:
    """Decode the file (at reduced size for JPEG, which still reads all of it) to catch corruption."""
    try:
        with Image.open(path) as image:
            image.draft("RGB", (64, 64))
            image.load()
    except _IMAGE_ERRORS:
        return False
    return True


def _class_files(directory: Path) -> dict[str, list[Path]]:
    if not directory.is_dir():
        raise DatasetError(f"data directory {directory} does not exist (expected DIR/<class>/*.jpg)")
    classes = sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
    return {
        folder.name: sorted(
            p
            for p in folder.rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
        )
        for folder in classes
    }


def _check_classes(files: dict[str, list[Path]], where: Path) -> None:
    if len(files) < 2:
        raise DatasetError(
            f"{where} has {len(files)} class folder(s) {sorted(files)}; a classifier needs at least 2 "
            "(one sub-folder of images per class)"
        )
    empty = sorted(name for name, paths in files.items() if not paths)
    if empty:
        raise DatasetError(
            f"class folder(s) {empty} in {where} hold no readable images "
            f"({', '.join(sorted(IMAGE_SUFFIXES))}); add images or remove the folder"
        )


def _drop_unreadable(files: dict[str, list[Path]], skipped: list[str]) -> dict[str, list[Path]]:
    kept: dict[str, list[Path]] = {}
    for name, paths in files.items():
        kept[name] = []
        for path in paths:
            if _readable(path):
                kept[name].append(path)
            else:
                skipped.append(str(path))
    return kept


def stratified_split(labels: Sequence[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of a seeded split that holds out `val_fraction` of every class (at least one image
    of any class that has two or more)."""
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    train, val = [], []
    for label in sorted(by_class):
        indices = by_class[label]
        rng.shuffle(indices)
        held_out = min(len(indices) - 1, max(1, round(len(indices) * val_fraction)))
        val += indices[:held_out]
        train += indices[held_out:]
    return sorted(train), sorted(val)


def _folder_dataset(root: Path, val_split: float, seed: int) -> LabelledImages:
    skipped: list[str] = []
    train_dir, val_dir = root / "train", root / "val"
    if train_dir.is_dir() and val_dir.is_dir():
        train_files = _drop_unreadable(_class_files(train_dir), skipped)
        val_files = _drop_unreadable(_class_files(val_dir), skipped)
        _check_classes(train_files, train_dir)
        unknown = sorted(set(val_files) - set(train_files))
        if unknown:
            raise DatasetError(f"{val_dir} has classes {unknown} that {train_dir} does not have")
        classes = sorted(train_files)
        train: list[Sample] = [(p, classes.index(c)) for c in classes for p in train_files[c]]
        val: list[Sample] = [(p, classes.index(c)) for c in classes for p in val_files.get(c, [])]
        if not val:
            raise DatasetError(f"{val_dir} holds no readable images")
        return LabelledImages(classes, train, val, skipped)
    files = _drop_unreadable(_class_files(root), skipped)
    _check_classes(files, root)
    classes = sorted(files)
    samples: list[Sample] = [(p, classes.index(c)) for c in classes for p in files[c]]
    train_idx, val_idx = stratified_split([label for _, label in samples], val_split, seed)
    return LabelledImages(classes, [samples[i] for i in train_idx], [samples[i] for i in val_idx], skipped)


def _digits_dataset(val_split: float, seed: int) -> LabelledImages:
    """scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels) as RGB images; no download."""
    from sklearn.datasets import load_digits  # noqa: PLC0415 (~2 s to import; only demo:digits needs it)

    digits = load_digits()
    images = [
        Image.fromarray(np.asarray(pixels * (255.0 / 16.0), dtype=np.uint8), mode="L").convert("RGB")
        for pixels in digits.images
    ]
    labels = [int(label) for label in digits.target]
    train_idx, val_idx = stratified_split(labels, val_split, seed)
    return LabelledImages(
        classes=[str(d) for d in range(10)],
        train=[(images[i], labels[i]) for i in train_idx],
        val=[(images[i], labels[i]) for i in val_idx],
    )


def load_dataset(data: str, val_split: float = 0.2, seed: int = 0) -> LabelledImages:
    """`data` is an image folder or "demo:digits"; raises `DatasetError` for unusable datasets."""
    if data == "demo:digits":
        dataset = _digits_dataset(val_split, seed)
    elif data.startswith("demo:"):
        raise DatasetError(f"unknown demo dataset {data!r}; the only one is demo:digits")
    else:
        dataset = _folder_dataset(Path(data), val_split, seed)
    if dataset.skipped:
        logger.warning(
            "skipped %d unreadable image file(s), e.g. %s", len(dataset.skipped), dataset.skipped[0]
        )
    logger.info(
        "dataset %s: %d classes, %d training and %d validation images",
        data,
        len(dataset.classes),
        len(dataset.train),
        len(dataset.val),
    )
    return dataset


class ImageDataset(Dataset[tuple[torch.Tensor, int]]):
    """Samples through a transform. A file that fails to decode mid-run is recorded in `skipped`
    and replaced by the next sample, so one bad file never stops training."""

    def __init__(
        self, samples: Sequence[Sample], transform: Callable[[Image.Image], torch.Tensor], skipped: list[str]
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.skipped = skipped

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        for offset in range(len(self.samples)):
            source, label = self.samples[(index + offset) % len(self.samples)]
            try:
                return self.transform(load_rgb(source)), label
            except _IMAGE_ERRORS:
                if str(source) not in self.skipped:
                    self.skipped.append(str(source))
                    logger.warning("skipping unreadable image %s", source)
        raise DatasetError("no image in the dataset could be read")


@dataclass(frozen=True)
class Loaders:
    train: Batches
    """This process's shard of every epoch, reshuffled per epoch (`set_epoch`)."""
    val_shard: Batches
    """This process's share of the validation set, for the per-epoch validation."""
    val: Batches
    """The whole validation set, for rank 0's final metrics and ONNX check."""


def make_loaders(dataset: LabelledImages, config: RunConfig, spec: EvalSpec, ranks: Ranks) -> Loaders:
    train = ImageDataset(dataset.train, train_transform(spec, config.augmentation()), dataset.skipped)
    val = ImageDataset(dataset.val, eval_transform(spec), dataset.skipped)
    # One process or many, the same sampler: epoch e's order is a function of (seed, e), which is
    # what lets a resumed run replay the epochs an uninterrupted one would have seen.
    sampler: DistributedSampler[int] = DistributedSampler(
        train, num_replicas=ranks.world_size, rank=ranks.rank, shuffle=True, seed=config.seed
    )
    train_loader = DataLoader(
        train,
        batch_size=config.batch_size,
        sampler=sampler,
        num_workers=config.workers,
        # A last batch of one breaks BatchNorm layers that train (random-init bases).
        drop_last=len(sampler) > config.batch_size,
    )
    val_all = DataLoader(val, batch_size=config.batch_size, shuffle=False, num_workers=config.workers)
    if ranks.world_size == 1:
        return Loaders(train_loader, val_all, val_all)
    # Strided shards without padding (DistributedSampler would repeat images to even them out).
    shard = list(range(ranks.rank, len(val), ranks.world_size))
    val_shard = DataLoader(val, batch_size=config.batch_size, sampler=shard, num_workers=config.workers)
    return Loaders(train_loader, val_shard, val_all)


def parity_inputs(dataset: LabelledImages, spec: EvalSpec) -> torch.Tensor:
    """Real held-out images for the export check (topped up from training images if val is tiny)."""
    transform = eval_transform(spec)
    samples = (dataset.val + dataset.train)[: max(2, min(PARITY_IMAGES, len(dataset.val)))]
    return torch.stack([ImageDataset(samples, transform, dataset.skipped)[i][0] for i in range(len(samples))])
