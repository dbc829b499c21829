"""Tiny classifier graphs built with the `onnx` helper API: the shapes foreign exporters produce.

A 3x3 convolution (4 filters), ReLU, global average pooling and a dense layer, seeded, on float32
images; options give the NHWC layout of Keras/tf2onnx, a fixed batch, a softmax at the end, and the
broken interfaces `convserve import` must refuse. Its head's tensors keep fixed names a user would pass
to `--embedding-output`: `relu` (the feature map), `pooled` ([N, 4, 1, 1]) and `features` ([N, 4]).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 18
IR_VERSION = 10
FILTERS = 4


def classifier(
    *,
    classes: int = 3,
    size: int | None = 24,
    layout: str = "nchw",
    batch: int | str = "N",
    softmax: bool = False,
    poison: bool = False,
    seed: int = 0,
    input_name: str = "images",
    output_name: str = "class_scores",
) -> onnx.ModelProto:
    """The tiny net; `size` None leaves H and W symbolic, `poison` multiplies the outputs by NaN."""
    rng = np.random.default_rng(seed)
    weights = [
        numpy_helper.from_array(rng.normal(0, 0.5, (FILTERS, 3, 3, 3)).astype(np.float32), "conv_w"),
        numpy_helper.from_array(rng.normal(0, 0.1, FILTERS).astype(np.float32), "conv_b"),
        numpy_helper.from_array(rng.normal(0, 1.0, (FILTERS, classes)).astype(np.float32), "dense_w"),
        numpy_helper.from_array(rng.normal(0, 0.1, classes).astype(np.float32), "dense_b"),
    ]
    nodes = []
    image = input_name
    if layout == "nhwc":
        nodes.append(helper.make_node("Transpose", [input_name], ["nchw"], perm=[0, 3, 1, 2]))
        image = "nchw"
    nodes += [
        helper.make_node("Conv", [image, "conv_w", "conv_b"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["features"]),
        helper.make_node("Gemm", ["features", "dense_w", "dense_b"], ["dense"]),
    ]
    last = "dense"
    if softmax:
        nodes.append(helper.make_node("Softmax", [last], ["probabilities"], axis=1))
        last = "probabilities"
    if poison:
        weights.append(numpy_helper.from_array(np.array([np.nan], dtype=np.float32), "nan"))
        nodes.append(helper.make_node("Mul", [last, "nan"], ["poisoned"]))
        last = "poisoned"
    nodes.append(helper.make_node("Identity", [last], [output_name]))
    side: int | str = size if size is not None else "side"
    dims = [batch, side, side, 3] if layout == "nhwc" else [batch, 3, side, side]
    graph = helper.make_graph(
        nodes,
        "tiny_classifier",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [batch, classes])],
        weights,
    )
    return finish(graph)


def finish(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="tests")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def with_input(model: onnx.ModelProto, element_type: int, dims: list[int | str]) -> onnx.ModelProto:
    """`model` with its input declared as `element_type` `dims` (for refusals: it need not run)."""
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    name = changed.graph.input[0].name
    del changed.graph.input[:]
    changed.graph.input.append(helper.make_tensor_value_info(name, element_type, dims))
    return changed


def with_nodes(
    model: onnx.ModelProto,
    nodes: list[onnx.NodeProto],
    outputs: dict[str, list[int | str | None]] | None = None,
    weights: list[onnx.TensorProto] | None = None,
) -> onnx.ModelProto:
    """`model` with `nodes` appended (reading its tensors) and `outputs` (name -> float32 dims) added to
    the graph's outputs, as an exporter that returns more than the class scores would."""
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    changed.graph.node.extend(nodes)
    changed.graph.initializer.extend(weights or [])
    for name, dims in (outputs or {}).items():
        changed.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, dims))
    onnx.checker.check_model(changed)
    return changed


def with_unit_embedding(model: onnx.ModelProto, batch: int | str = "N") -> onnx.ModelProto:
    """`model` with a second output `embedding`: `features` scaled to unit L2 length per row."""
    normalize = helper.make_node("LpNormalization", ["features"], ["embedding"], axis=1, p=2)
    return with_nodes(model, [normalize], {"embedding": [batch, FILTERS]})


def with_second_input(model: onnx.ModelProto) -> onnx.ModelProto:
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    changed.graph.input.append(helper.make_tensor_value_info("temperature", TensorProto.FLOAT, [1]))
    return changed


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path
