"""An ONNX classifier's interface, read and made to fit the served contract (torch-free, `onnx` only).

The service feeds one float32 tensor [N, 3, H, W] and reads one [N, classes] output. `inspect_graph`
reads what a foreign graph declares and refuses what can never fit; `conform` edits it in memory:
H and W fixed to the served size, and for an NHWC graph (Keras, tf2onnx) a Transpose in front, so the
file takes NCHW like every other model in the repository.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import TensorProto, helper

from convserve.errors import UsageError
from convserve.importoptions import AUTO, NCHW, NHWC

_NHWC_TO_NCHW_INPUT = "_nchw"
"""Suffix of the name the original NHWC input takes inside the graph once a Transpose feeds it."""

Dim = int | str | None
"""One axis: a fixed size, a symbolic name, or None when the graph says nothing."""


@dataclass(frozen=True)
class GraphInterface:
    """The one image input and one output of a classifier graph, as the file declares them."""

    input_name: str
    input_dims: tuple[Dim, Dim, Dim, Dim]
    layout: str
    """NCHW or NHWC: where the 3 colour channels are."""
    output_name: str
    output_dims: tuple[Dim, Dim]
    opset: int
    """The graph's opset for the default ONNX domain."""

    @property
    def batch(self) -> int | None:
        """The fixed batch size, or None for a symbolic (or undeclared) batch axis."""
        dim = self.input_dims[0]
        return dim if isinstance(dim, int) else None

    @property
    def spatial(self) -> tuple[Dim, Dim]:
        """(H, W) as declared."""
        if self.layout == NCHW:
            return self.input_dims[2], self.input_dims[3]
        return self.input_dims[1], self.input_dims[2]

    @property
    def fixed_size(self) -> tuple[int, int] | None:
        """(H, W) when the graph fixes both, else None."""
        height, width = self.spatial
        return (height, width) if isinstance(height, int) and isinstance(width, int) else None


def _dims(value: onnx.ValueInfoProto) -> tuple[Dim, ...] | None:
    tensor = value.type.tensor_type
    if not value.type.HasField("tensor_type") or not tensor.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim)


def _shown(dims: tuple[Dim, ...]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def inspect_graph(model: onnx.ModelProto, layout: str, source: str) -> GraphInterface:
    """The interface of `model` if a classifier of images could be served from it; `UsageError` if not."""
    graph = model.graph
    weights = {init.name for init in graph.initializer}
    inputs = [value for value in graph.input if value.name not in weights]  # old exporters list weights too
    if len(inputs) != 1:
        names = ", ".join(repr(value.name) for value in inputs) or "none"
        raise UsageError(
            f"{source} has {len(inputs)} inputs ({names}); convserve serves graphs with exactly one image "
            "input: re-export the model with its other inputs folded into constants"
        )
    image = inputs[0]
    element = image.type.tensor_type.elem_type
    if element != TensorProto.FLOAT:
        kind = (
            helper.tensor_dtype_to_string(element).removeprefix("TensorProto.").lower()
            if element
            else "untyped"
        )
        raise UsageError(
            f"{source}: input {image.name!r} is {kind}; convserve feeds float32 pixels (normalized with "
            "--mean/--std), so re-export the model with a float32 input (cast inside the graph if needed)"
        )
    dims = _dims(image)
    if dims is None or len(dims) != 4:
        shape = "of unknown shape" if dims is None else f"of rank {len(dims)} {_shown(dims)}"
        raise UsageError(
            f"{source}: input {image.name!r} is {shape}; expected an image batch of rank 4, [N, 3, H, W] "
            "(NCHW) or [N, H, W, 3] (NHWC)"
        )
    chosen = _layout(dims, layout, f"{source}: input {image.name!r} {_shown(dims)}")
    if isinstance(dims[0], int) and dims[0] < 1:
        raise UsageError(
            f"{source}: input {image.name!r} has batch size {dims[0]}; expected a symbolic or positive one"
        )
    if len(graph.output) != 1:
        names = ", ".join(repr(value.name) for value in graph.output)
        raise UsageError(
            f"{source} has {len(graph.output)} outputs ({names}); convserve serves graphs with one output of "
            "class scores [N, classes]: remove the others when exporting"
        )
    output = graph.output[0]
    out_dims = _dims(output)
    if out_dims is not None and len(out_dims) != 2:
        raise UsageError(
            f"{source}: output {output.name!r} is {_shown(out_dims)}; expected class scores of rank 2, "
            "[N, classes] (flatten or squeeze it when exporting)"
        )
    opset = next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), 0)
    return GraphInterface(
        input_name=image.name,
        input_dims=(dims[0], dims[1], dims[2], dims[3]),
        layout=chosen,
        output_name=output.name,
        output_dims=(out_dims[0], out_dims[1]) if out_dims is not None else (None, None),
        opset=opset,
    )


def _layout(dims: tuple[Dim, ...], requested: str, where: str) -> str:
    """NCHW or NHWC: the requested one if the channel axis fits it, else the only one that fits."""
    fits = {
        NCHW: dims[1] in (3, None) or isinstance(dims[1], str),
        NHWC: dims[3] in (3, None) or isinstance(dims[3], str),
    }
    certain = {NCHW: dims[1] == 3, NHWC: dims[3] == 3}
    if requested != AUTO:
        if not fits[requested]:
            axis = 1 if requested == NCHW else 3
            raise UsageError(
                f"{where} has {dims[axis]} channels on axis {axis}, not 3, so it is not {requested.upper()}"
            )
        return requested
    if certain[NCHW] and not certain[NHWC]:
        return NCHW
    if certain[NHWC] and not certain[NCHW]:
        return NHWC
    if not fits[NCHW] and not fits[NHWC]:
        raise UsageError(
            f"{where} has no axis of 3 colour channels (axis 1 for NCHW, 3 for NHWC); convserve serves "
            "RGB models"
        )
    raise UsageError(f"{where}: cannot tell NCHW from NHWC; pass --layout nchw or --layout nhwc")


def conform(model: onnx.ModelProto, interface: GraphInterface, size: tuple[int, int]) -> None:
    """Edit `model` in place so its input is float32 [batch, 3, H, W] with `size` = (H, W) fixed."""
    graph = model.graph
    image = next(value for value in graph.input if value.name == interface.input_name)
    batch = interface.input_dims[0]
    if interface.layout == NHWC:
        if interface.output_name == interface.input_name:
            raise UsageError(f"the graph returns its input {interface.input_name!r}; it is not a classifier")
        inner = _unused_name(model, interface.input_name + _NHWC_TO_NCHW_INPUT)
        _rename_uses(graph, interface.input_name, inner)
        transpose = helper.make_node(
            "Transpose", [interface.input_name], [inner], name=inner + "_transpose", perm=[0, 2, 3, 1]
        )
        graph.node.insert(0, transpose)
    shape = image.type.tensor_type.shape
    del shape.dim[:]
    for dim in (batch, 3, *size):
        axis = shape.dim.add()
        if isinstance(dim, int):
            axis.dim_value = dim
        else:  # keep a symbolic batch symbolic, and give an undeclared one a name
            axis.dim_param = dim or "N"


def _unused_name(model: onnx.ModelProto, wanted: str) -> str:
    taken = {name for node in model.graph.node for name in (*node.input, *node.output)}
    taken |= {value.name for value in (*model.graph.input, *model.graph.output, *model.graph.value_info)}
    taken |= {init.name for init in model.graph.initializer}
    name, counter = wanted, 1
    while name in taken:
        name, counter = f"{wanted}_{counter}", counter + 1
    return name


def _rename_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Make every node that reads `old` read `new` instead, subgraphs (If, Loop, Scan bodies) included."""
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name == old:
                node.input[index] = new
        for attribute in node.attribute:
            for subgraph in (*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs):
                _rename_uses(subgraph, old, new)
