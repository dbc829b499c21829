"""Argument parsing and dispatch for `python -m training`; the work happens in library modules."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from modelcontract import FLOAT32, INPUT_DTYPES, MODEL_FILENAME
from training.fit_arguments import add_fit_command

logger = logging.getLogger("training")

DESCRIPTION = """Fine-tune a pretrained CNN and export it as a verified ONNX model for the service.

commands:
  fit         fine-tune a pretrained CNN on an image folder (or demo:digits) and export it
  export      re-export a checkpoint written by fit
  pretrained  export the ImageNet EfficientNet-Lite0 (the service's out-of-the-box model)
  quantize    publish the INT8 variant of a model as its next version, if it keeps its accuracy

data-parallel on N GPUs or CPU processes: torchrun --nproc_per_node N -m training fit ...
"""


def _add_export(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="re-export a checkpoint written by fit",
        description="Rebuild the model from a fit checkpoint and export it, with the parity check on the "
        f"validation images stored in the checkpoint, to OUT/<next version>/{MODEL_FILENAME}.",
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        required=True,
        help="checkpoint.pt written by fit, e.g. models/digits/1/checkpoint.pt",
    )
    parser.add_argument("--out", type=Path, required=True, help="model directory, e.g. models/digits")
    _add_input_dtype(parser)


def _add_input_dtype(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input-dtype",
        choices=INPUT_DTYPES,
        default=FLOAT32,
        help="what the graph's input holds: float32, the normalized rows; or uint8, the RGB pixels after "
        "resize and crop, normalized inside the graph (a quarter of the bytes to copy to a GPU, see "
        "docs/gpu.md; no INT8 variant) (default: float32)",
    )


def _add_pretrained(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "pretrained",
        help="export the ImageNet EfficientNet-Lite0 (1000 classes) as the out-of-the-box model",
        description="Export the ImageNet-pretrained default backbone with its 1000-class head and the "
        f"ImageNet class names to OUT/<next version>/{MODEL_FILENAME}. Fully offline.",
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="model directory, e.g. models/efficientnet_lite0_imagenet"
    )
    _add_input_dtype(parser)


def _add_quantize(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "quantize",
        help="publish a static INT8 (QDQ, per-channel) variant of a model as its next version",
        description="Calibrate ONNX Runtime's static quantizer on real images preprocessed as the model's "
        "metadata says, compare FP32 and INT8 top-1, and publish MODEL's parent/<next version>/ with "
        f"{MODEL_FILENAME} and quantize.json only if INT8 stays within the limit. Nothing is published "
        "otherwise.",
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
    add_fit_command(subparsers)
    _add_export(subparsers)
    _add_pretrained(subparsers)
    _add_quantize(subparsers)
    return parser


def _run_fit(args: argparse.Namespace) -> int:
    if args.resume is None and (args.data is None or args.out is None):
        raise ValueError("fit needs --data and --out (or --resume to continue a stopped run)")
    # The commands import torch (~3 s) only when they run: `--help` and argument errors answer at once.
    from training.config import RunConfig  # noqa: PLC0415
    from training.pipeline import fit, resume  # noqa: PLC0415

    options = {k: v for k, v in vars(args).items() if k not in ("command", "verbose", "resume")}
    if args.resume is not None:
        # Only the options typed on the command line count: they must agree with the run's own.
        defaults = build_parser().parse_args(["fit"])
        resume(args.resume, {k: v for k, v in options.items() if v != getattr(defaults, k)})
        return 0
    fit(RunConfig(**{**options, "out": str(args.out)}))
    return 0


def _run_export(args: argparse.Namespace) -> int:
    from training.pipeline import export_checkpoint  # noqa: PLC0415 (torch, see _run_fit)

    export_checkpoint(args.checkpoint, args.out, args.input_dtype)
    return 0


def _run_pretrained(args: argparse.Namespace) -> int:
    from training.imagenet import export_imagenet_model  # noqa: PLC0415 (torch, see _run_fit)

    version_dir, metadata = export_imagenet_model(args.out, args.input_dtype)
    logger.info(
        "wrote %s: %d classes, parity max abs softmax diff %.2g",
        version_dir / MODEL_FILENAME,
        metadata.num_classes,
        metadata.parity_max_abs_diff,
    )
    return 0


def _run_quantize(args: argparse.Namespace) -> int:
    from training.quantize import QuantizeSettings, quantize_model  # noqa: PLC0415 (torch, see _run_fit)

    options = {k: v for k, v in vars(args).items() if k not in ("command", "verbose")}
    version_dir, report = quantize_model(QuantizeSettings(**options))
    logger.info("wrote %s: %s", version_dir / MODEL_FILENAME, report["comparison"])
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
