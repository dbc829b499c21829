"""Does serving still compute what the model was evaluated on? Served inputs against torchvision's.

For each real photo, uploaded as the JPEG bytes a client sends, two model inputs are compared:
- served: `service.inference.preprocessing.ImagePreprocessor` (DCT-scaled decode of large JPEGs, then the
  shared `modelcontract.transform.EvalTransform` that training evaluation runs too);
- reference: a full decode, then torchvision's Resize -> CenterCrop -> ToTensor -> Normalize, the
  pipeline the ImageNet weights and models trained with earlier releases were evaluated with.
Reported: the mean absolute difference per photo in normalized units (bound: 0.02) and
whether the model's top-1 class is the same for both inputs (it must be, on every photo).

`python -m benchmarks.peers.parity [--model PATH]` prints the figures as JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmarks.common.corpus import Photo, build_corpus, encode_jpeg, resize_to_megapixels
from modelcontract import MODEL_FILENAME
from service.inference.preprocessing import ImagePreprocessor
from service.models.runtime import load_model

MAX_MEAN_ABS_DIFF = 0.02
# Beyond the benchmark corpus: the same sample photos at phone-camera sizes, where DCT scaling reduces most.
EXTRA_MEGAPIXELS = (3.0, 4.0)


def parity_photos() -> list[Photo]:
    """The benchmark corpus plus larger JPEGs (the largest sizes are where draft decoding reduces most)."""
    photos = build_corpus()
    for index, megapixels in enumerate(EXTRA_MEGAPIXELS * 2):
        source = Image.open(io.BytesIO(photos[index].data)).convert("RGB")
        image = resize_to_megapixels(source, megapixels)
        name = photos[index].filename.split("_")[0]
        photos.append(Photo(f"{name}_{image.width}x{image.height}.jpg", encode_jpeg(image), *image.size))
    return photos


def torchvision_input(data: bytes, metadata: Any) -> np.ndarray:
    """Full decode + torchvision's eval pipeline (the naive server's) from the model metadata: [3, H, W]."""
    # The naive server's pipeline is torchvision's: imported only when a parity run needs it.
    from benchmarks.peers.naive_server import eval_transform  # noqa: PLC0415

    return np.asarray(eval_transform(metadata)(Image.open(io.BytesIO(data)).convert("RGB")), dtype=np.float32)


def measure_parity(model_path: Path, photos: Sequence[Photo] | None = None) -> dict[str, Any]:
    """Served vs reference inputs and top-1 for each photo, and the summary the benchmark reports."""
    model = load_model(model_path, ["CPUExecutionProvider"])
    served_preprocess = ImagePreprocessor.from_metadata(model.metadata)
    photos = list(photos or parity_photos())
    served = np.stack([served_preprocess(photo.data, photo.filename) for photo in photos])
    reference = np.stack([torchvision_input(photo.data, model.metadata) for photo in photos])
    served_top1 = model.run(served).argmax(axis=1)
    reference_top1 = model.run(reference).argmax(axis=1)
    differences = np.abs(served - reference).mean(axis=(1, 2, 3))
    rows = [
        {
            "photo": photo.filename,
            "megapixels": round(photo.megapixels, 2),
            "mean_abs_diff": round(float(difference), 5),
            "same_top1": bool(a == b),
        }
        for photo, difference, a, b in zip(photos, differences, served_top1, reference_top1, strict=True)
    ]
    return {
        "model": str(model_path),
        "photos": len(photos),
        "mean_abs_diff_max": round(float(differences.max()), 5),
        "mean_abs_diff_mean": round(float(differences.mean()), 5),
        "max_abs_diff": round(float(np.abs(served - reference).max()), 4),
        "top1_same": int((served_top1 == reference_top1).sum()),
        "met": bool(differences.max() <= MAX_MEAN_ABS_DIFF and (served_top1 == reference_top1).all()),
        "per_photo": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers.parity", description=__doc__)
    parser.add_argument(
        "--model",
        type=Path,
        default=Path("models/efficientnet_lite0_imagenet/1") / MODEL_FILENAME,
        help="model.onnx to compare with (default: the ImageNet default, version 1)",
    )
    args = parser.parse_args(argv)
    result = measure_parity(args.model)
    print(json.dumps(result, indent=2))
    return 0 if result["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
