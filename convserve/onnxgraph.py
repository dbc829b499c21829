"""An ONNX classifier's interface, read and made to fit the served contract (torch-free, `onnx` only).

The service feeds one float32 tensor [N, 3, H, W] and reads one [N, classes] output. `inspect_graph`
reads what a foreign graph declares and refuses what can never fit; `conform` edits it in memory:
H and W fixed to the served size, and for an NHWC graph (Keras, tf2onnx) a Transpose in front, so the
file takes NCHW like every other model in the repository. `expose_embedding` makes a tensor the user
names (a graph output or any intermediate, such as the pooled features) the [N, D] embedding output.
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
    dropped_outputs: tuple[str, ...] = ()
    """Graph outputs that are neither the logits nor the embedding: `conform` removes them, since the
    service serves a graph with no outputs but those its metadata names."""

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


def inspect_graph(
    model: onnx.ModelProto,
    layout: str,
    source: str,
    logits_output: str | None = None,
    embedding_output: str | None = None,
) -> GraphInterface:
    """The interface of `model` if a classifier of images could be served from it; `UsageError` if not.

    `logits_output` names the class scores among several graph outputs; `embedding_output` names a
    tensor to serve as the embedding, which may itself be one of them (`expose_embedding` checks it).
    """
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
    output = _logits_output(graph, logits_output, embedding_output, source)
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
        dropped_outputs=tuple(
            value.name for value in graph.output if value.name not in (output.name, embedding_output)
        ),
    )


def _logits_output(
    graph: onnx.GraphProto, wanted: str | None, embedding: str | None, source: str
) -> onnx.ValueInfoProto:
    """The graph output holding the class scores: `wanted`, else the only output besides the embedding."""
    names = ", ".join(repr(value.name) for value in graph.output) or "none"
    if wanted is not None:
        chosen = next((value for value in graph.output if value.name == wanted), None)
        if chosen is None:
            raise UsageError(f"--logits-output {wanted!r}: {source} has no such output; its outputs: {names}")
        if wanted == embedding:
            raise UsageError(f"--logits-output and --embedding-output both name {wanted!r}; name two tensors")
        return chosen
    candidates = [value for value in graph.output if value.name != embedding]
    if len(candidates) == 1:
        return candidates[0]
    if embedding is None:
        raise UsageError(
            f"{source} has {len(graph.output)} outputs ({names}); convserve serves graphs with one output of "
            "class scores [N, classes]: remove the others when exporting"
        )
    if not candidates:
        raise UsageError(
            f"{source}'s only output {embedding!r} is the one --embedding-output names; the class scores "
            "[N, classes] must be an output too"
        )
    raise UsageError(
        f"{source} has {len(graph.output)} outputs ({names}); pass --logits-output NAME to say which holds "
        "the class scores [N, classes] (the others, the embedding aside, are dropped)"
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
    kept = [value for value in graph.output if value.name not in interface.dropped_outputs]
    del graph.output[:]
    graph.output.extend(kept)
    shape = image.type.tensor_type.shape
    del shape.dim[:]
    for dim in (batch, 3, *size):
        axis = shape.dim.add()
        if isinstance(dim, int):
            axis.dim_value = dim
        else:  # keep a symbolic batch symbolic, and give an undeclared one a name
            axis.dim_param = dim or "N"


POOLED_OPS = ("GlobalAveragePool", "GlobalMaxPool", "Flatten", "ReduceMean", "Squeeze", "Reshape")
"""Operators whose outputs are offered as candidates when `--embedding-output` names no tensor."""
_FLAT_SUFFIX = "_flat"
"""Suffix of the output a Flatten gives a [N, D, 1, 1] embedding tensor."""


@dataclass(frozen=True)
class EmbeddingTensor:
    """Where a graph's embedding is served from."""

    tensor: str
    """The tensor `--embedding-output` named."""
    output: str
    """The graph output serving it: `tensor` itself, or a Flatten of it when it is [N, D, 1, 1]."""
    size: int | None
    """D when the graph fixes it, else None (the smoke run measures it)."""

    @property
    def flattened(self) -> bool:
        return self.output != self.tensor


def expose_embedding(
    model: onnx.ModelProto, name: str, interface: GraphInterface, source: str
) -> EmbeddingTensor:
    """Make tensor `name` of the conformed `model` a graph output [N, D] (editing it in place), or
    `UsageError` if it cannot be one (`_embedding_dims`)."""
    graph = model.graph
    dims = _embedding_dims(model, name, interface, source)
    size = dims[1] if isinstance(dims[1], int) else None
    served = name
    if len(dims) == 4:  # the service reads rank-2 embeddings: flatten the pool's [N, D, 1, 1]
        served = _unused_name(model, name + _FLAT_SUFFIX)
        graph.node.append(helper.make_node("Flatten", [name], [served], name=served, axis=1))
    declared = any(output.name == name and _dims(output) is not None for output in graph.output)
    if served != name or not declared:  # the service reads the rank from the output's declaration
        batch = _dims(next(value for value in graph.input if value.name == interface.input_name))
        output = helper.make_tensor_value_info(served, TensorProto.FLOAT, [batch[0] if batch else "N", size])
        kept = [value for value in graph.output if value.name != name]  # a rank-4 output is replaced
        del graph.output[:]
        graph.output.extend([*kept, output])
    return EmbeddingTensor(name, served, size)


def _embedding_dims(
    model: onnx.ModelProto, name: str, interface: GraphInterface, source: str
) -> tuple[Dim, ...]:
    """The dims of tensor `name` if it can serve as the embedding: computed by a node from the image,
    float32 [N, D] or [N, D, 1, 1], batched like the class scores; `UsageError` saying why not."""
    where = f"--embedding-output {name!r}"
    if name in (interface.input_name, interface.output_name):
        what = "input" if name == interface.input_name else "class scores output"
        raise UsageError(f"{where} is the graph's {what}; name the features the last layer reads instead")
    if any(init.name == name for init in model.graph.initializer):
        raise UsageError(
            f"{where} is a weight of {source}, not computed from the image; name a tensor a node makes"
        )
    if not any(name in node.output for node in model.graph.node):
        raise UsageError(f"{where}: {source} has no such tensor; {_candidates(model.graph)}")
    value = _typed(model, name)
    dims = _dims(value) if value is not None else None
    if value is None or dims is None:
        raise UsageError(
            f"{where}: ONNX shape inference cannot tell the shape of this tensor; name one whose shape is "
            "known, such as the global average pool's output or the Flatten after it"
        )
    element = value.type.tensor_type.elem_type
    expected = "expected float32 features [N, D], or [N, D, 1, 1] as a global average pool makes them"
    if element not in (TensorProto.UNDEFINED, TensorProto.FLOAT):
        kind = helper.tensor_dtype_to_string(element).removeprefix("TensorProto.").lower()
        raise UsageError(f"{where} is {kind} {_shown(dims)}; {expected}")
    if len(dims) == 4 and dims[2:] != (1, 1):
        found = "a feature map" if all(isinstance(d, int) for d in dims[2:]) else "of unknown spatial size"
        raise UsageError(f"{where} is {found} {_shown(dims)}; {expected} (name the pool's output)")
    if len(dims) not in (2, 4):
        raise UsageError(f"{where} is of rank {len(dims)} {_shown(dims)}; {expected}")
    logits_batch = interface.output_dims[0] if isinstance(interface.output_dims[0], int) else interface.batch
    if isinstance(dims[0], int) and dims[0] != logits_batch:
        raise UsageError(
            f"{where} {_shown(dims)} has its batch axis fixed to {dims[0]} while the class scores' batch is "
            f"{logits_batch or 'dynamic'}; expected one embedding row per image, batched like the scores"
        )
    return dims


def _typed(model: onnx.ModelProto, name: str) -> onnx.ValueInfoProto | None:
    """The type of tensor `name`: as the graph declares it, else as ONNX shape inference finds it."""
    declared = next((value for value in model.graph.output if value.name == name), None)
    if declared is not None and _dims(declared) is not None:
        return declared
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # onnx raises several types for graphs it cannot infer (custom domains, bad attrs)
        return declared
    values = (*inferred.graph.output, *inferred.graph.value_info)
    return next((value for value in values if value.name == name), declared)


def _candidates(graph: onnx.GraphProto) -> str:
    """Tensors that look like pooled features, to name instead."""
    found = [node.output[0] for node in graph.node if node.op_type in POOLED_OPS and node.output]
    if not found:
        return "name a graph output or a tensor a node of the main graph makes"
    shown = ", ".join(repr(name) for name in found[-5:])
    return f"tensors that look like pooled features: {shown}"


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
