"""One GEMM for q/k/v and one for gate/up in ``lora_model.onnx`` (``model.onnx`` keeps them apart).

Projections that read the same activations run as one wider matrix product, then a ``Split``
hands each module its own output again, so the LoRA branches stay per module and one graph
still serves any subset of them. A wider product fills the cores better at small batches
(onnxruntime-genai's graphs do the same) and runs fewer kernels.

The weights are not copied on disk: the fused weight is a ``Concat`` of the export's own
initializers, which ONNX Runtime folds into one constant when the session starts (float
``MatMul`` along N; ``MatMulNBits`` stacks rows of B, scales and zero points, which its layout
keeps per output column).

::

    x ─┬─MatMul(Wq)─> q          x ──MatMul(Concat(Wq, Wk, Wv))──Split──> q, k, v
       ├─MatMul(Wk)─> k    =>
       └─MatMul(Wv)─> v
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypeVar

import numpy as np
import onnx_graphsurgeon as gs

GROUPS = (("q", "k", "v"), ("gate", "up"))
Item = TypeVar("Item")


def complete_groups(items: dict[tuple[int, str], Item],
                    num_layers: int) -> Iterator[tuple[int, tuple[str, ...], list[Item]]]:
    """Each layer's q/k/v and gate/up groups whose modules all have an item, with those items in order."""
    for layer in range(num_layers):
        for group in GROUPS:
            members = [items.get((layer, module)) for module in group]
            if all(member is not None for member in members):
                yield layer, group, members


def _attrs_match(nodes: list[gs.Node]) -> bool:
    first = nodes[0]
    if first.op == "MatMul":
        return all(node.op == "MatMul" for node in nodes)
    keys = ("K", "bits", "block_size", "accuracy_level")
    return all(node.op == "MatMulNBits" and len(node.inputs) == len(first.inputs) and len(node.inputs) <= 4
               and all(node.attrs.get(k) == first.attrs.get(k) for k in keys) for node in nodes)


def _width(node: gs.Node) -> int | None:
    if node.op == "MatMulNBits":
        return int(node.attrs["N"])
    weight = node.inputs[1]
    shape = getattr(weight, "shape", None)
    return int(shape[-1]) if shape and isinstance(shape[-1], int) else None


def fuse_group(graph: gs.Graph, nodes: list[gs.Node], name: str, widths: list[int]) -> bool:
    """Replace ``nodes`` (same input, same kind) by one fused product and a Split; False if they don't fit."""
    if len(nodes) < 2 or not _attrs_match(nodes) or len({id(node.inputs[0]) for node in nodes}) != 1:
        return False
    x = nodes[0].inputs[0]
    outputs = [node.outputs[0] for node in nodes]
    dtype = outputs[0].dtype
    if nodes[0].op == "MatMul":
        weight = gs.Variable(f"{name}/weight", dtype=nodes[0].inputs[1].dtype)
        graph.nodes.append(gs.Node("Concat", f"{name}/ConcatWeights", {"axis": 1}, [n.inputs[1] for n in nodes], [weight]))
        fused_inputs, attrs, op = [x, weight], {}, "MatMul"
    else:
        fused_inputs = [x]
        for position in range(1, len(nodes[0].inputs)):
            part = gs.Variable(f"{name}/input{position}", dtype=nodes[0].inputs[position].dtype)
            graph.nodes.append(gs.Node("Concat", f"{name}/Concat{position}", {"axis": 0},
                                       [n.inputs[position] for n in nodes], [part]))
            fused_inputs.append(part)
        attrs, op = {**nodes[0].attrs, "N": int(sum(widths))}, "MatMulNBits"
    fused = gs.Variable(f"{name}/output", dtype=dtype)
    graph.nodes.append(gs.Node(op, f"{name}/{op}", attrs, fused_inputs, [fused], domain=nodes[0].domain))
    sizes = gs.Constant(f"{name}/sizes", np.asarray(widths, dtype=np.int64))
    for node in nodes:
        node.outputs.clear()
        node.inputs.clear()
    graph.nodes.append(gs.Node("Split", f"{name}/Split", {"axis": -1}, [fused, sizes], outputs))
    return True


def fuse_projections(graph: gs.Graph, projections: dict[tuple[int, str], gs.Node], num_layers: int,
                     module_widths: dict[str, int]) -> int:
    """Fuse each layer's q/k/v and gate/up products; returns how many groups were fused."""
    fused = 0
    for layer, group, nodes in complete_groups(projections, num_layers):
        widths = [_width(node) or module_widths[module] for node, module in zip(nodes, group)]
        fused += fuse_group(graph, nodes, f"/fused/layers.{layer}/{''.join(group)}", widths)
    return fused  # the emptied nodes go with the caller's graph.cleanup()
