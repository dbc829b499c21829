"""Argument parsing and dispatch for `python -m training`; the work happens in library modules."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from training.backbones import DEFAULT_BACKBONE

logger = logging.getLogger("training")

DESCRIPTION = """Fine-tune a pretrained CNN and export it as a verified ONNX model for the service.

commands:
  fit         fine-tune a pretrained CNN on an image folder (or demo:digits) and export it
  export      re-export a checkpoint written by fit
  pretrained  export the ImageNet EfficientNet-Lite0 (the service's out-of-the-box model)
  quantize    publish the INT8 variant of a model as its next version, if it keeps its accuracy

data-parallel on N GPUs or CPU processes: torchrun --nproc_per_node N -m training fit ...
"""


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


def _add_fit(subparsers: argparse._SubParsersAction) -> None:
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


def _add_export(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="re-export a checkpoint written by fit",
        description="Rebuild the model from a fit checkpoint and export it, with the parity check on the "
        "validation images stored in the checkpoint, to OUT/<next version>/model.onnx.",
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        required=True,
        help="checkpoint.pt written by fit, e.g. models/digits/1/checkpoint.pt",
    )
    parser.add_argument("--out", type=Path, required=True, help="model directory, e.g. models/digits")


def _add_pretrained(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "pretrained",
        help="export the ImageNet EfficientNet-Lite0 (1000 classes) as the out-of-the-box model",
        description="Export the ImageNet-pretrained default backbone with its 1000-class head and the "
        "ImageNet class names to OUT/<next version>/model.onnx. Fully offline.",
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="model directory, e.g. models/efficientnet_lite0_imagenet"
    )


def _add_quantize(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "quantize",
        help="publish a static INT8 (QDQ, per-channel) variant of a model as its next version",
        description="Calibrate ONNX Runtime's static quantizer on real images preprocessed as the model's "
        "metadata says, compare FP32 and INT8 top-1, and publish MODEL's parent/<next version>/ with "
        "model.onnx and quantize.json only if INT8 stays within the limit. Nothing is published otherwise.",
    )
    parser.add_argument(
        "--model", type=Path, required=True, help="FP32 version directory, e.g. models/digits/1"
    )
    parser.add_argument(
        "--calibration",
        metavar="DATA",
        help="image folder or demo:digits (calibrate on training images, compare accuracy on the "
        "validation split), or skimage:photos (scikit-image sample photos, compare top-1 agreement); "
        "default: the data in MODEL/config.json, else skimage:photos",
    )
    parser.add_argument(
        "--calibration-images",
        type=int,
        default=128,
        help="images the quantizer observes to choose activation ranges (default: 128)",
    )
    parser.add_argument(
        "--max-accuracy-drop",
        type=float,
        default=1.0,
        help="refuse when FP32 - INT8 top-1 accuracy exceeds this, in percentage points (default: 1.0)",
    )
    parser.add_argument(
        "--min-agreement",
        type=float,
        default=90.0,
        help="with skimage:photos, refuse when FP32 and INT8 agree on top-1 for fewer of all 56 photo "
        "views than this, in percent; the report adds the agreement on views where FP32 is confident "
        "(default: 90)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration sample (default: 0)")
    parser.add_argument(
        "--full-range-layers",
        type=int,
        default=4,
        help="the first this many Conv/Gemm layers that are not depthwise keep full 8-bit weights (uint8, "
        "slower on CPUs without VNNI); the others use 7 bits (default: 4)",
    )
    parser.add_argument(
        "--throughput-seconds",
        type=float,
        default=1.0,
        help="seconds per round of the FP32 vs INT8 images/s check written to quantize.json (batch 1 "
        "and 8, 2 intra-op threads, best of 3 interleaved rounds); 0 skips it (default: 1.0)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_fit(subparsers)
    _add_export(subparsers)
    _add_pretrained(subparsers)
    _add_quantize(subparsers)
    return parser


def _run_fit(args: argparse.Namespace) -> int:
    if args.resume is None and (args.data is None or args.out is None):
        raise ValueError("fit needs --data and --out (or --resume to continue a stopped run)")
    from training.config import RunConfig
    from training.pipeline import fit, resume

    options = {k: v for k, v in vars(args).items() if k not in ("command", "verbose", "resume")}
    if args.resume is not None:
        # Only the options typed on the command line count: they must agree with the run's own.
        defaults = build_parser().parse_args(["fit"])
        resume(args.resume, {k: v for k, v in options.items() if v != getattr(defaults, k)})
        return 0
    fit(RunConfig(**{**options, "out": str(args.out)}))
    return 0


def _run_export(args: argparse.Namespace) -> int:
    from training.pipeline import export_checkpoint

    export_checkpoint(args.checkpoint, args.out)
    return 0


def _run_pretrained(args: argparse.Namespace) -> int:
    from training.imagenet import export_imagenet_model

    version_dir, metadata = export_imagenet_model(args.out)
    logger.info(
        "wrote %s: %d classes, parity max abs softmax diff %.2g",
        version_dir / "model.onnx",
        metadata["num_classes"],
        metadata["parity_max_abs_diff"],
    )
    return 0


def _run_quantize(args: argparse.Namespace) -> int:
    from training.quantize import QuantizeSettings, quantize_model

    options = {k: v for k, v in vars(args).items() if k not in ("command", "verbose")}
    version_dir, report = quantize_model(QuantizeSettings(**options))
    logger.info("wrote %s: %s", version_dir / "model.onnx", report["comparison"])
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Under torchrun every process runs this; rank 0 tells the story, the others only warn.
    quiet = os.environ.get("RANK", "0") != "0"
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # The ONNX exporter's graph passes log every rewrite at INFO; keep the run log readable.
    for chatty in ("onnx_ir", "onnxscript", "torch.onnx"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    commands = {
        "fit": _run_fit,
        "export": _run_export,
        "pretrained": _run_pretrained,
        "quantize": _run_quantize,
    }
    try:
        return commands[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        # User mistakes end with the message that says how to fix them, not a traceback.
        logger.error("%s", error)
        return 2
    except KeyboardInterrupt:
        return 130  # Ctrl-C or SIGTERM; the run directory and the way to resume are logged
