"""Image transforms: the eval transform (the service's own, from an `EvalSpec`) and the training one.

The training transform is torchvision's. Interpolation names are the contract's `INTERPOLATIONS`, which
are also `InterpolationMode` values, so `InterpolationMode(spec.interpolation)` needs no map here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from modelcontract import EvalSpec
from modelcontract.transform import EvalTransform


def eval_transform(spec: EvalSpec) -> Callable[[Image.Image], torch.Tensor]:
    """PIL RGB image -> normalized CHW float tensor, by the very code the service runs.

    `modelcontract.transform.EvalTransform`: resize (shorter side to `resize_size`, antialiased PIL
    filter) -> center crop -> [0, 1] -> normalize, as torchvision's Resize/CenterCrop/ToTensor/
    Normalize within rounding. The model's metadata carries `spec`, and the service rebuilds the same
    object from it.
    """
    shared = EvalTransform.from_spec(spec)
    return transforms.Compose([shared, torch.from_numpy])


@dataclass(frozen=True)
class Augmentation:
    """Random training-time changes, the Keras/fastai seeds: flip, rotation, zoom."""

    horizontal_flip: bool = True
    """Mirror half of the images left-right; turn off when mirroring changes the class (digits)."""
    rotation_degrees: float = 10.0
    """Rotate by a uniform angle in [-rotation_degrees, +rotation_degrees] degrees; 0 turns it off."""
    min_scale: float = 0.7
    """Smallest fraction of the image area a random crop keeps (zoom in up to 1/min_scale); 1 = off."""


NO_AUGMENTATION = Augmentation(horizontal_flip=False, rotation_degrees=0.0, min_scale=1.0)


def train_transform(spec: EvalSpec, augmentation: Augmentation) -> Callable[[Image.Image], torch.Tensor]:
    """The eval pipeline with random zoom (resized crop), rotation and flip mixed in."""
    if augmentation == NO_AUGMENTATION:
        return eval_transform(spec)
    interpolation = InterpolationMode(spec.interpolation)
    steps: list[object] = [transforms.Resize(spec.resize_size, interpolation=interpolation, antialias=True)]
    if augmentation.min_scale < 1.0:
        steps.append(
            transforms.RandomResizedCrop(
                spec.input_size,
                scale=(augmentation.min_scale, 1.0),
                interpolation=interpolation,
                antialias=True,
            )
        )
    else:
        steps.append(transforms.CenterCrop(spec.input_size))
    if augmentation.rotation_degrees > 0:
        # Bilinear: bicubic rotation was the costliest augmentation step (~0.9 ms per 96 px image)
        # and the difference does not matter for a random perturbation.
        steps.append(
            transforms.RandomRotation(augmentation.rotation_degrees, interpolation=InterpolationMode.BILINEAR)
        )
    if augmentation.horizontal_flip:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize(spec.mean, spec.std)]
    return transforms.Compose(steps)
