"""What the galleries compare: embeddings from exported ONNX files, and raw pixels as the baseline.

An embedding is what the service would compute for an image: the encoded bytes through the model's
own `ImagePreprocessor` (bounded decode, then the contract's `EvalTransform` from the file's
metadata), the graph's declared embedding output run by ONNX Runtime, unit rows by the metadata's
`unit_embeddings`.

Earlier layers are measured through a derived file: the same graph with the globally averaged output
of the last block of each of `STAGE_BLOCKS`' stages added as outputs (`stage_<C>`), scaled to unit
length here by the contract's `l2_normalize`. EfficientNet-Lite0's block stages end at 16, 24, 40,
80, 112, 192 and 320 channels before its 1280-channel head convolution; the stage is found by its
channel count, so no exporter-made node name is relied on.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, shape_inference

from modelcontract import INPUT_NAME, ModelMetadata, l2_normalize
from service.inference.preprocessing import ImagePreprocessor

STAGE_BLOCKS = {80: 4, 112: 5, 192: 6, 320: 7}
"""Channels of the stages whose pooled outputs are tried as embeddings, and which of EfficientNet-Lite0's
7 block stages each ends."""
BATCH = 32
THREADS = 2


def stage_name(channels: int) -> str:
    """The graph output of a stage's pooled features."""
    return f"stage_{channels}"


def stage_label(channels: int) -> str:
    """How results name a stage: "block 5 (112 ch)"."""
    return f"block {STAGE_BLOCKS[channels]} ({channels} ch)"


def with_stage_outputs(source: Path, target: Path, channels: Sequence[int] = tuple(STAGE_BLOCKS)) -> Path:
    """`source` with the pooled output [N, C] of the last node producing C channels, for each C."""
    proto = onnx.load(str(source))
    inferred = shape_inference.infer_shapes(proto)
    widths = {
        info.name: info.type.tensor_type.shape.dim[1].dim_value
        for info in inferred.graph.value_info
        if len(info.type.tensor_type.shape.dim) == 4
    }
    last: dict[int, str] = {}
    for node in proto.graph.node:
        for output in node.output:
            if widths.get(output) in channels:
                last[widths[output]] = output
    missing = sorted(set(channels) - set(last))
    if missing:
        raise ValueError(f"{source} has no 4-D tensor with {missing} channels; pick STAGE_BLOCKS it has")
    for width, tensor in last.items():
        pooled, name = f"{stage_name(width)}_pooled", stage_name(width)
        proto.graph.node.extend(
            [
                helper.make_node("GlobalAveragePool", [tensor], [pooled]),
                helper.make_node("Flatten", [pooled], [name], axis=1),
            ]
        )
        proto.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", width]))
    onnx.checker.check_model(proto)
    target.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(target))
    return target


class Embedder:
    """One ONNX file's unit embeddings (and extra outputs) of encoded images, as the service sees them."""

    def __init__(self, path: Path) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = THREADS
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.metadata = ModelMetadata.from_props(self.session.get_modelmeta().custom_metadata_map, str(path))
        if self.metadata.embedding_output is None:
            raise ValueError(f"{path} declares no embedding output; export it with python -m training")
        self.preprocess = ImagePreprocessor.from_metadata(self.metadata)
        outputs = {o.name for o in self.session.get_outputs()}
        self.stages = [c for c in STAGE_BLOCKS if stage_name(c) in outputs]

    def inputs(self, encoded: Sequence[bytes]) -> np.ndarray:
        """The model's input rows [N, 3, H, W] of `encoded`, exactly as the service preprocesses them."""
        return np.stack([self.preprocess(data, name=f"image {i}") for i, data in enumerate(encoded)])

    def embed(self, encoded: Sequence[bytes]) -> dict[str, np.ndarray]:
        """Unit rows of every image: under "embedding" the declared output, then each stage's by its
        `stage_label`."""
        names = [self.metadata.embedding_output, *(stage_name(c) for c in self.stages)]
        parts: list[list[np.ndarray]] = [[] for _ in names]
        for start in range(0, len(encoded), BATCH):
            outputs = self.session.run(names, {INPUT_NAME: self.inputs(encoded[start : start + BATCH])})
            for part, output in zip(parts, outputs, strict=True):
                part.append(output)
        rows = {"embedding": self.metadata.unit_embeddings(np.concatenate(parts[0]))}
        for channels, part in zip(self.stages, parts[1:], strict=True):
            rows[stage_label(channels)] = l2_normalize(np.concatenate(part))
        return rows


def pooled_pixels(inputs: np.ndarray, side: int) -> np.ndarray:
    """Raw-pixel rows [N, 3 * side * side]: model input rows [N, 3, H, W] averaged over equal cells
    down to side x side (H and W multiples of `side`)."""
    count, channels, height, width = inputs.shape
    if height % side or width % side:
        raise ValueError(f"input {height}x{width} does not divide into {side}x{side} cells")
    cells = inputs.reshape(count, channels, side, height // side, side, width // side)
    return cells.mean(axis=(3, 5)).reshape(count, -1)
