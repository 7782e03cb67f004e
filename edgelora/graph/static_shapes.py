"""Fold the shape arithmetic a traced graph carries into constants: fewer nodes a decode step runs.

A TorchScript export computes every reshape target from ``Shape -> Gather -> Unsqueeze -> Concat``
of the live tensors, because batch and sequence are symbolic. ONNX Runtime folds a ``Shape`` only
when the whole shape is static, so those chains (about 25 of the ~96 nodes a layer runs) execute
on every step, each paying a fixed dispatch cost that a batch-1 int4 step feels most.

With ONNX Runtime's symbolic shape inference (``onnxruntime.tools.symbolic_shape_infer``):

* ``Gather(Shape(x), i)`` where dimension ``i`` of ``x`` is a number becomes that number;
* a ``Reshape`` target becomes a constant: numbers stay, a dimension equal to the input's at the
  same index becomes ``0`` (copy), the one remaining dimension ``-1``;
* an ``Expand`` target becomes a constant: numbers stay, dimensions the input already has ``1``;

then nodes whose outputs nobody reads are dropped, and ONNX Runtime's own constant folding takes
what is left of the chains at session start. Nothing about values changes: the outputs are the
same numbers, bit for bit.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgelora.export.branches import node_reads

log = logging.getLogger(__name__)


def _shape_view(model: onnx.ModelProto) -> onnx.ModelProto:
    """A weightless copy for shape inference: external (large) initializers become typed graph inputs."""
    view = onnx.ModelProto()
    view.CopyFrom(model)
    keep, moved = [], []
    for init in view.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL or len(init.raw_data) > 4096:
            moved.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        else:
            keep.append(init)
    del view.graph.initializer[:]
    view.graph.initializer.extend(keep)
    view.graph.input.extend(moved)
    return view


def _dims(model: onnx.ModelProto) -> dict[str, list]:
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    # Its warnings are about symbols it cannot compare (a slice to the mask's width): not the user's concern.
    infer_log = logging.getLogger("onnxruntime.tools.symbolic_shape_infer")
    level = infer_log.level
    infer_log.setLevel(logging.ERROR)
    try:
        inferred = SymbolicShapeInference.infer_shapes(_shape_view(model), auto_merge=True, guess_output_rank=True)
    finally:
        infer_log.setLevel(level)
    dims = {}
    for info in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        tensor = info.type.tensor_type
        if tensor.HasField("shape"):
            dims[info.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                               for d in tensor.shape.dim]
    return dims


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer
              if init.data_location != onnx.TensorProto.EXTERNAL and len(init.raw_data) <= 4096}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _reshape_target(source: list, target: list) -> list[int] | None:
    out, unknown = [], 0
    for index, dim in enumerate(target):
        if isinstance(dim, int) and dim > 0:
            out.append(dim)
        elif dim is not None and index < len(source) and source[index] == dim:
            out.append(0)
        else:
            out.append(-1)
            unknown += 1
    return out if unknown <= 1 else None


def _expand_target(source: list, target: list) -> list[int] | None:
    if len(source) != len(target):
        return None
    out = []
    for have, want in zip(source, target):
        if isinstance(want, int) and want > 0:
            out.append(want)
        elif want is not None and have == want:
            out.append(1)
        else:
            return None
    return out


def fold_static_shapes(model: onnx.ModelProto) -> dict[str, int]:
    """Rewrite ``model`` in place; returns how many nodes of each kind were folded and how many removed."""
    dims = _dims(model)
    constants = _constants(model)
    producers = {output: node for node in model.graph.node for output in node.output}
    replaced: dict[int, onnx.NodeProto] = {}
    counts = {"gather": 0, "reshape": 0, "expand": 0}

    def constant_node(name: str, value: np.ndarray) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [name], name=f"{name}/static", value=numpy_helper.from_array(value))

    extra: list[onnx.NodeProto] = []
    for index, node in enumerate(model.graph.node):
        if node.op_type == "Gather" and node.input[1] in constants:
            shape_node = producers.get(node.input[0])
            if shape_node is None or shape_node.op_type != "Shape" or shape_node.attribute:
                continue
            source = dims.get(shape_node.input[0])
            position = constants[node.input[1]]
            if source is None or position.ndim != 0:
                continue
            dim = source[int(position)]
            if isinstance(dim, int) and dim > 0:
                replaced[index] = constant_node(node.output[0], np.asarray(dim, dtype=np.int64))
                counts["gather"] += 1
        elif node.op_type in ("Reshape", "Expand") and node.input[1] not in constants:
            source, target = dims.get(node.input[0]), dims.get(node.output[0])
            if source is None or target is None:
                continue
            if node.op_type == "Reshape":
                if any(a.name == "allowzero" and a.i for a in node.attribute):
                    continue
                static = _reshape_target(source, target)
            else:
                static = _expand_target(source, target)
            if static is None:
                continue
            name = f"{node.output[0]}/static_shape"
            extra.append(constant_node(name, np.asarray(static, dtype=np.int64)))
            node.input[1] = name
            counts[node.op_type.lower()] += 1
    for index, node in replaced.items():
        model.graph.node[index].CopyFrom(node)
    for node in reversed(extra):
        model.graph.node.insert(0, node)
    counts["removed"] = _drop_dead_nodes(model)
    log.info("static shapes: %s", counts)
    return counts


def _drop_dead_nodes(model: onnx.ModelProto) -> int:
    """Remove nodes none of whose outputs is read by a node or is a graph output (repeatedly)."""
    outputs = {output.name for output in model.graph.output}
    removed = 0
    while True:
        read = set(outputs)
        for node in model.graph.node:
            read.update(node_reads(node))
        dead = [i for i, node in enumerate(model.graph.node) if not any(o in read for o in node.output)]
        if not dead:
            return removed
        for index in reversed(dead):
            del model.graph.node[index]
        removed += len(dead)
