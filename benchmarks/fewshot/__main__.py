"""`python -m benchmarks.fewshot`: measure few-shot galleries, write the results JSON and the docs block."""

from __future__ import annotations

import argparse
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

from benchmarks.common.docblock import replace_block
from benchmarks.common.results import read_json, write_json
from benchmarks.fewshot import BLOCK_END, BLOCK_START, DOC, RESULTS
from benchmarks.fewshot.digits import load_digits
from benchmarks.fewshot.measure import export_imagenet, measure_digits, measure_photos
from benchmarks.fewshot.report import render


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fewshot", description=__doc__)
    parser.add_argument("--out", type=Path, default=RESULTS, help="results JSON path")
    parser.add_argument("--no-doc", action="store_true", help="do not rewrite docs/galleries.md's block")
    parser.add_argument(
        "--workdir",
        type=Path,
        help="keep the exported models (and the fine-tune) in this directory and reuse them on the next "
        "run (default: a temporary directory, removed at the end)",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite the docs block from --out without measuring"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for chatty in ("onnx_ir", "onnxscript", "torch.onnx"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    if args.report_only:
        results = read_json(args.out)
    else:
        with tempfile.TemporaryDirectory(prefix="fewshot-bench-") as name:
            workdir = args.workdir or Path(name)
            workdir.mkdir(parents=True, exist_ok=True)
            results = {
                "search": "service/galleries/search.py classify: 1 neighbour, or the vote of k (k5_vote)",
                "photos": measure_photos(export_imagenet(workdir)),
                "digits": measure_digits(workdir, load_digits()),
            }
        write_json(results, args.out)
    if not args.no_doc:
        replace_block(DOC, render(results), BLOCK_START, BLOCK_END)
    print(render(results))


if __name__ == "__main__":
    main()
