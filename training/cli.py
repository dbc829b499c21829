"""Argument parsing and dispatch for `python -m training`; the work happens in library modules."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger("training")


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_pretrained(subparsers)
    return parser


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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # The ONNX exporter's graph passes log every rewrite at INFO; keep the run log readable.
    for chatty in ("onnx_ir", "onnxscript", "torch.onnx"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    commands = {"pretrained": _run_pretrained}
    try:
        return commands[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        # User mistakes end with the message that says how to fix them, not a traceback.
        logger.error("%s", error)
        return 2
