"""The flags of `python -m training fit`, grouped as the run configuration (`training.config`) is."""

from __future__ import annotations

import argparse
from pathlib import Path

from training.backbone_defaults import DEFAULT_BACKBONE


def _unfreeze_blocks(value: str) -> int | str:
    if value == "all":
        return value
    try:
        count = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of block groups or 'all', got {value!r}"
        ) from None
    if count < 0:
        raise argparse.ArgumentTypeError("the number of block groups must be >= 0")
    return count


def add_fit_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "fit",
        help="fine-tune a pretrained CNN in two phases and export a verified ONNX model",
        description="Phase 1 trains a new head (global pool -> dropout -> linear) on the frozen base; "
        "phase 2 unfreezes the top block groups at a lower learning rate. BatchNorm statistics of a "
        "pretrained base stay frozen throughout. The best validation epoch is exported to "
        "OUT/<next version>/ with metrics.json, training.png, config.json and checkpoint.pt. "
        "Under torchrun (torchrun --nproc_per_node N -m training fit ...) the same recipe runs "
        "data-parallel: --batch-size per process, learning rates unchanged, rank 0 publishes.",
    )
    io = parser.add_argument_group("data and output")
    io.add_argument(
        "--data",
        help="image folder DIR/<class>/*.jpg (or DIR/train + DIR/val), "
        "or demo:digits (scikit-learn's 1,797 8x8 digits; no download); required unless --resume",
    )
    io.add_argument("--out", type=Path, help="model directory, e.g. models/digits; required unless --resume")
    io.add_argument(
        "--val-split",
        type=float,
        default=0.2,
        help="fraction of each class held out for validation when DIR has no train/val "
        "folders (default: 0.2)",
    )
    io.add_argument("--workers", type=int, default=0, help="data loading processes (default: 0 = in process)")

    model = parser.add_argument_group("model")
    model.add_argument(
        "--backbone",
        default=DEFAULT_BACKBONE,
        help=f"lenet5, zfnet, alexnet, vgg16, googlenet, {DEFAULT_BACKBONE} or any timm model name "
        f"(default: {DEFAULT_BACKBONE})",
    )
    model.add_argument(
        "--weights",
        help="local pretrained weights for the backbone (.pth/.safetensors state "
        "dict); default: the bundled ImageNet weights for efficientnet_lite0, else a local cache",
    )
    model.add_argument(
        "--no-pretrained",
        dest="pretrained",
        action="store_false",
        help="start from random weights, then by default no frozen phase and all blocks train "
        "(default: pretrained)",
    )
    model.add_argument(
        "--image-size",
        type=int,
        help="network input side in pixels (default: 96 for demo:digits, whose 8x8 sources gain nothing "
        "from 224 px (5.4x the pixels per image), else the backbone's "
        "pretraining size, 224 for efficientnet_lite0)",
    )
    model.add_argument(
        "--crop-pct",
        type=float,
        help="center-crop fraction of the eval resize (default: 1.0 for demo:digits, else the "
        "backbone's, 0.875 for efficientnet_lite0)",
    )
    model.add_argument("--drop-rate", type=float, default=0.2, help="dropout before the head (default: 0.2)")

    phases = parser.add_argument_group("two-phase schedule")
    phases.add_argument(
        "--frozen-epochs", type=int, help="phase 1 epochs, head only (default: 5; 0 with --no-pretrained)"
    )
    phases.add_argument(
        "--unfrozen-epochs", type=int, default=8, help="phase 2 epochs, top blocks unfrozen (default: 8)"
    )
    phases.add_argument(
        "--unfreeze-blocks",
        type=_unfreeze_blocks,
        help="block groups unfrozen in phase 2, counted from the top, or 'all' "
        "(default: 2; all with --no-pretrained)",
    )
    phases.add_argument(
        "--head-lr",
        type=float,
        default=3e-3,
        help="peak AdamW learning rate of the head in phase 1 (default: 3e-3)",
    )
    phases.add_argument(
        "--unfrozen-head-lr",
        type=float,
        default=1e-3,
        help="peak learning rate of the head in phase 2 (default: 1e-3)",
    )
    phases.add_argument(
        "--base-lr",
        type=float,
        default=3e-4,
        help="peak learning rate of the unfrozen base blocks in phase 2 (default: 3e-4)",
    )
    phases.add_argument(
        "--weight-decay",
        type=float,
        default=1e-2,
        help="AdamW weight decay, not applied to biases/BatchNorm (default: 1e-2)",
    )
    phases.add_argument(
        "--warmup-epochs",
        type=float,
        default=1.0,
        help="linear warmup at the start of each phase, in epochs, then cosine decay (default: 1.0)",
    )
    phases.add_argument(
        "--label-smoothing",
        type=float,
        default=0.1,
        help="label smoothing of the training loss, 0 = off (default: 0.1)",
    )
    phases.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="images per step and process; under torchrun the effective batch is N times this, "
        "at the same learning rates (default: 64)",
    )
    phases.add_argument(
        "--patience",
        type=int,
        default=3,
        help="stop a phase after this many epochs without a lower validation loss (default: 3)",
    )

    augment = parser.add_argument_group("augmentation (training images only)")
    augment.add_argument(
        "--no-augment",
        dest="augment",
        action="store_false",
        help="no flip, rotation or zoom (default: augmentation on)",
    )
    flips = augment.add_mutually_exclusive_group()
    flips.add_argument(
        "--flip",
        dest="horizontal_flip",
        action="store_const",
        const=True,
        help="random horizontal flips (default: on, except demo:digits)",
    )
    flips.add_argument(
        "--no-flip",
        dest="horizontal_flip",
        action="store_const",
        const=False,
        help="no horizontal flips, for classes a mirror image changes such as digits or text "
        "(default: flips on, except demo:digits)",
    )
    augment.add_argument(
        "--rotation",
        dest="rotation_degrees",
        type=float,
        default=10.0,
        help="random rotation range in degrees, +/- (default: 10; 0 = off)",
    )
    augment.add_argument(
        "--min-scale",
        type=float,
        help="smallest area fraction kept by random zoom crops, 1 = off (default: 0.85 for "
        "demo:digits, else 0.7)",
    )

    run = parser.add_argument_group("run")
    run.add_argument(
        "--seed", type=int, default=0, help="seed of split, init, shuffling, augmentation (default: 0)"
    )
    run.add_argument(
        "--resume",
        type=Path,
        metavar="RUN",
        help="continue a stopped run from its last completed epoch: OUT/.run-*/ (or its checkpoint.pt, "
        "or a version's) with the run's own configuration; only --out, --workers and --device may "
        "change (default: a new run)",
    )
    run.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto = CUDA with mixed precision when available, else CPU (default: auto)",
    )
