"""The run configuration of `fit`: one frozen dataclass, resolved once, written as `config.json`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from modelcontract import EvalSpec
from training.backbone_defaults import DEFAULT_BACKBONE, backbone_defaults
from training.transforms import Augmentation

DEMO_DIGITS = "demo:digits"
DEMO_DIGITS_IMAGE_SIZE = 96
"""`demo:digits` images are 8x8 px: 96 px reaches >= 0.97 within the time budget on 2 CPU cores
(224 px has 5.4x the pixels per image, and the sources are only 8x8)."""


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines a `fit` run; `None` fields are resolved by `resolve()`."""

    data: str
    """Image folder (DIR/<class>/*.jpg or DIR/train + DIR/val) or "demo:digits"."""
    out: str
    """Model directory; the run is published as out/<next version>/."""
    backbone: str = DEFAULT_BACKBONE
    """Backbone name: lenet5, zfnet, alexnet, vgg16, googlenet or any timm model (e.g. resnet50)."""
    weights: str | None = None
    """Local pretrained weights file for the backbone (.pth/.safetensors); None = built-in source."""
    pretrained: bool = True
    """Start from pretrained weights (False = random init, trained from scratch)."""
    image_size: int | None = None
    """Network input side in px; None = 96 for demo:digits, else the backbone's pretraining size."""
    crop_pct: float | None = None
    """Center-crop fraction of the eval resize; None = 1.0 for demo:digits, else the backbone's."""
    frozen_epochs: int | None = None
    """Phase 1 epochs (new head on the frozen base); None = 5, or 0 when not pretrained."""
    unfrozen_epochs: int = 8
    """Phase 2 epochs: top `unfreeze_blocks` block groups unfrozen."""
    unfreeze_blocks: int | str | None = None
    """Block groups unfrozen in phase 2, from the top, or "all"; None = 2, or "all" when not
    pretrained (a random base must train everywhere)."""
    head_lr: float = 3e-3
    """Peak AdamW learning rate of the head in phase 1."""
    unfrozen_head_lr: float = 1e-3
    """Peak learning rate of the head in phase 2."""
    base_lr: float = 3e-4
    """Peak learning rate of the unfrozen base blocks in phase 2 (lower than the head's)."""
    weight_decay: float = 1e-2
    """AdamW decoupled weight decay on weights (not on biases or BatchNorm)."""
    warmup_epochs: float = 1.0
    """Linear warmup length at the start of each phase, in epochs; then cosine decay to 0."""
    label_smoothing: float = 0.1
    """Label smoothing of the training loss (0 = off); validation loss is plain cross-entropy."""
    drop_rate: float = 0.2
    """Dropout probability before the head's linear layer."""
    batch_size: int = 64
    """Images per training step of each process (the effective batch is batch_size x world_size)."""
    val_split: float = 0.2
    """Fraction of each class held out for validation when DIR has no train/ and val/ folders."""
    patience: int = 3
    """Stop a phase after this many epochs without a lower validation loss."""
    seed: int = 0
    """Seed of the split, the initialization, the shuffling and the augmentation."""
    device: str = "auto"
    """auto (CUDA if available), cpu or cuda."""
    horizontal_flip: bool | None = None
    """Random horizontal flips; None = on, except for demo:digits (a mirrored digit is wrong)."""
    rotation_degrees: float = 10.0
    """Random rotation range in degrees (+/-); 0 = off."""
    min_scale: float | None = None
    """Smallest area fraction kept by random zoom crops; None = 0.85 for demo:digits, else 0.7."""
    augment: bool = True
    """False disables flip, rotation and zoom."""
    workers: int = 0
    """DataLoader worker processes (0 = load in the training process)."""
    world_size: int = 1
    """Data-parallel training processes (torchrun's WORLD_SIZE; not a flag). Learning rates are not
    scaled with it: N processes at batch B take the same steps as one process at batch N x B with the
    same rates. The linear scaling rule is an SGD heuristic (AdamW's step size does not grow with the
    gradient), and a hidden rescale would make one command train differently on another machine."""

    @property
    def effective_batch_size(self) -> int:
        """Images per optimizer step over all processes."""
        return self.batch_size * self.world_size

    @property
    def is_demo_digits(self) -> bool:
        return self.data == DEMO_DIGITS

    @property
    def unfreeze_count(self) -> int | None:
        """Block groups to unfreeze in phase 2 (None = all)."""
        if self.unfreeze_blocks is None or self.unfreeze_blocks == "all":
            return None
        return int(self.unfreeze_blocks)

    def resolve(self) -> RunConfig:
        """Fill the `None` defaults that depend on the dataset or the backbone, and validate."""
        defaults = backbone_defaults(self.backbone)
        digits = self.is_demo_digits
        resolved = RunConfig(
            **{
                **asdict(self),
                "image_size": self.image_size or (DEMO_DIGITS_IMAGE_SIZE if digits else defaults.image_size),
                "crop_pct": self.crop_pct or (1.0 if digits else defaults.crop_pct),
                "horizontal_flip": (not digits) if self.horizontal_flip is None else self.horizontal_flip,
                "min_scale": self.min_scale or (0.85 if digits else 0.7),
                "frozen_epochs": (5 if self.pretrained else 0)
                if self.frozen_epochs is None
                else self.frozen_epochs,
                "unfreeze_blocks": self._resolved_unfreeze_blocks(),
            }
        )
        resolved.validate()
        if (resolved.image_size or 0) < defaults.min_image_size:
            raise ValueError(
                f"--image-size {resolved.image_size} is too small for {self.backbone}: "
                f"it needs at least {defaults.min_image_size} px"
            )
        return resolved

    def _resolved_unfreeze_blocks(self) -> int | str:
        if self.unfreeze_blocks is None:
            return 2 if self.pretrained else "all"
        if isinstance(self.unfreeze_blocks, str) and self.unfreeze_blocks != "all":
            try:
                return int(self.unfreeze_blocks)
            except ValueError:
                raise ValueError(
                    f"--unfreeze-blocks must be a number or 'all', got {self.unfreeze_blocks!r}"
                ) from None
        return self.unfreeze_blocks

    def validate(self) -> None:
        problems = []
        frozen = self.frozen_epochs or 0
        if self.image_size is not None and self.image_size < 32:
            problems.append(f"--image-size must be at least 32 px, got {self.image_size}")
        if self.crop_pct is not None and not 0.1 <= self.crop_pct <= 1.0:
            problems.append(f"crop_pct must be in [0.1, 1], got {self.crop_pct}")
        if frozen < 0 or self.unfrozen_epochs < 0 or frozen + self.unfrozen_epochs < 1:
            problems.append("--frozen-epochs and --unfrozen-epochs must be >= 0 and not both 0")
        if (self.unfreeze_count or 0) < 0:
            problems.append(f"--unfreeze-blocks must be >= 0 or 'all', got {self.unfreeze_blocks}")
        if not 0.0 < self.val_split < 1.0:
            problems.append(f"--val-split must be between 0 and 1, got {self.val_split}")
        if min(self.head_lr, self.unfrozen_head_lr, self.base_lr) <= 0:
            problems.append("learning rates must be positive")
        if self.batch_size < 1 or self.patience < 1:
            problems.append("--batch-size and --patience must be at least 1")
        if self.device not in ("auto", "cpu", "cuda"):
            problems.append(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if problems:
            raise ValueError("invalid configuration: " + "; ".join(problems))

    def eval_spec(self, interpolation: str, mean: tuple[float, ...], std: tuple[float, ...]) -> EvalSpec:
        assert self.image_size is not None and self.crop_pct is not None, "call resolve() first"
        return EvalSpec.from_crop_pct(
            self.image_size,
            self.crop_pct,
            interpolation,
            (mean[0], mean[1], mean[2]),
            (std[0], std[1], std[2]),
        )

    def augmentation(self) -> Augmentation:
        if not self.augment:
            return Augmentation(horizontal_flip=False, rotation_degrees=0.0, min_scale=1.0)
        return Augmentation(
            horizontal_flip=bool(self.horizontal_flip),
            rotation_degrees=self.rotation_degrees,
            min_scale=self.min_scale if self.min_scale is not None else 0.7,
        )

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "effective_batch_size": self.effective_batch_size}

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> RunConfig:
        known = {field.name for field in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
