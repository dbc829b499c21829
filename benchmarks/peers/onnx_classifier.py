"""The BentoML peer's model: an ONNX file, its contract's eval transform, and top-5 answers.

Kept apart from `bento_service` so it imports nothing but numpy, Pillow, ONNX Runtime and
`modelcontract`: the peer's own virtualenv (which has no torch and none of the project's locked
packages) runs it with the repository root on PYTHONPATH, and the project's tests import it without
BentoML installed.

Preprocessing is the service's, at the service's quality and cost: a JPEG is decoded at reduced size
with Pillow's draft mode (DCT scaling, which any Pillow user making thumbnails reaches for), down to
no less than `DRAFT_MARGIN` x the resize size, then `modelcontract.EvalTransform` itself lays out the
resize and crop on the full picture. A full decode would cost the peer several times the service's
decode time on the corpus's larger photos, and the benchmark would compare decoders, not servers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image

from modelcontract import EvalTransform, ModelMetadata

DRAFT_MARGIN = 1.25
"""How far draft mode may shrink a JPEG, as a multiple of the resize size: the service's margin
(`service.inference.preprocessing.DRAFT_MARGIN`, which this venv cannot import; a test keeps them
equal), so both resample the same number of pixels to the same quality."""
TOP_K = 5
"""Classes per answer: the service's default `top_k`, so both answers cost the same JSON."""


def ranked(
    probabilities: np.ndarray, labels: Sequence[str], top_k: int = TOP_K
) -> list[list[dict[str, Any]]]:
    """The top-k of each row, best first, as `{"label", "index", "score"}` (the service's shape)."""
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, : min(top_k, len(labels))]
    return [
        [{"label": labels[i], "index": int(i), "score": float(row[i])} for i in indices]
        for row, indices in zip(probabilities, order, strict=True)
    ]


def answer(predictions: list[dict[str, Any]], model: dict[str, Any]) -> dict[str, Any]:
    """One image's JSON answer, shaped like the service's `/predict` answer for a single upload."""
    return {"model": model, "predictions": [predictions]}


@dataclass(frozen=True)
class OnnxClassifier:
    """A loaded model: decoded images in, one list of top-k predictions per image out."""

    session: ort.InferenceSession
    metadata: ModelMetadata
    transform: EvalTransform
    model: dict[str, Any]
    """`{"name", "version"}` from the repository layout (`<name>/<version>/model.onnx`), for the answers."""

    @classmethod
    def load(cls, model_file: Path) -> OnnxClassifier:
        """Load `model_file` on the CPU with ONNX Runtime's default options (one intra-op thread per
        core), as a user's service would: the peer is tuned no further than a user would tune it."""
        session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
        metadata = ModelMetadata.from_props(session.get_modelmeta().custom_metadata_map, str(model_file))
        version = model_file.parent.name
        model = {
            "name": model_file.parent.parent.name,
            "version": int(version) if version.isdigit() else None,
        }
        return cls(session, metadata, EvalTransform.from_spec(metadata.eval_spec), model)

    def inputs(self, images: Sequence[Image.Image]) -> np.ndarray:
        """The model's [N, 3, H, W] float32 batch from opened, not yet decoded, images."""
        height, width = self.metadata.eval_spec.input_size
        batch = np.empty((len(images), 3, height, width), dtype=np.float32)
        for row, image in zip(batch, images, strict=True):
            decoded, source_size = self.decode(image)
            self.transform(decoded, out=row, source_size=source_size)
        return batch

    def decode(self, image: Image.Image) -> tuple[Image.Image, tuple[int, int] | None]:
        """The RGB pixels of an opened image, and its full (width, height) when draft mode reduced it."""
        full_size = image.size
        if image.format == "JPEG":
            spec = self.metadata.eval_spec
            target = math.ceil(DRAFT_MARGIN * max(spec.resize_size, *spec.input_size))
            image.draft("RGB", (target, target))
        reduced = image.size != full_size
        return (image if image.mode == "RGB" else image.convert("RGB")), (full_size if reduced else None)

    def classify(self, images: Sequence[Image.Image]) -> list[list[dict[str, Any]]]:
        """Top-k predictions of every image, in order."""
        (outputs,) = self.session.run(
            [self.metadata.output_name], {self.metadata.input_name: self.inputs(images)}
        )
        return ranked(self.metadata.scores(outputs), self.metadata.labels)
