"""Turn ``Where(condition, a, b)`` on a 0-d condition into ``If``: a step runs only one branch.

A TorchScript trace cannot emit control flow, and a graph rewrite is simpler to write as data
flow, so both write the two alternatives and pick one with ``Where``: ``attention.py`` computes
two forms of the attention core (condition ``Greater(Gather(Shape(position_ids), 1), 1)``: several
tokens per row), insert-lora a projection with and without its LoRA results (condition: the
adapter stack has rows). Run as is, every step would compute both. For each such ``Where`` this
pass moves the nodes that only feed one of its inputs into that branch of an ``If`` (they read the
rest from the outer scope, which ONNX allows), so the other alternative costs nothing; a branch
with nothing of its own returns its input through an ``Identity``.

Values are unchanged: the ``If`` returns exactly the tensor the ``Where`` selected.
"""

from __future__ import annotations

import heapq

import onnx
from onnx import helper

from edgelora.errors import UnsupportedModelError
from edgelora.formats import contract

ONNX_FLOAT_TYPES = {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16}


def _several_tokens_conditions(graph: onnx.GraphProto) -> set[str]:
    """Names of ``Greater(Gather(Shape(position_ids), 1), 1)`` outputs."""
    producer = {out: node for node in graph.node for out in node.output}
    constants = {init.name: init for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute:
            constants[node.output[0]] = node.attribute[0].t

    def constant(name: str) -> int | None:
        tensor = constants.get(name)
        if tensor is None:
            return None
        values = onnx.numpy_helper.to_array(tensor).reshape(-1)
        return int(values[0]) if values.size == 1 else None

    found = set()
    for node in graph.node:
        if node.op_type != "Greater" or constant(node.input[1]) != 1:
            continue
        gather = producer.get(node.input[0])
        if gather is None or gather.op_type != "Gather" or constant(gather.input[1]) != 1:
            continue
        shape = producer.get(gather.input[0])
        if shape is not None and shape.op_type == "Shape" and shape.input[0] == contract.POSITION_IDS:
            found.add(node.output[0])
    return found


def _exclusive_nodes(nodes: list[onnx.NodeProto], roots: list[str], wheres: set[int], producer: dict[str, int],
                     consumers: dict[str, list[int]], graph_outputs: set[str]) -> list[int]:
    """Indices (in graph order) of the nodes whose outputs reach the ``Where`` nodes ``wheres`` only
    as ``roots``, and nothing else.

    Nodes are visited from the last to the first, so every consumer of a node is decided before it.
    """
    taken: set[int] = set()
    heap = sorted({-producer[root] for root in roots if root in producer})
    seen = set(heap)
    while heap:
        index = -heapq.heappop(heap)
        outputs = nodes[index].output
        if any(out in graph_outputs for out in outputs):
            continue
        users = {user for out in outputs for user in consumers.get(out, [])}
        if not users <= taken | wheres:
            continue
        if any(out not in roots for out in outputs if wheres & set(consumers.get(out, []))):
            continue  # also feeds a condition or the other branch
        taken.add(index)
        for name in nodes[index].input:
            if name in producer and -producer[name] not in seen:
                seen.add(-producer[name])
                heapq.heappush(heap, -producer[name])
    return sorted(taken)


def _groups(nodes: list[onnx.NodeProto], wheres: list[int], producer: dict[str, int]) -> list[list[int]]:
    """``Where`` nodes that become one ``If`` with several outputs: same condition, and their
    inputs on each side made by one node (the outputs of a Split, say)."""
    groups: dict[tuple, list[int]] = {}
    for index in wheres:
        where = nodes[index]
        sides = tuple(producer.get(name, name) for name in where.input[1:])
        groups.setdefault((where.input[0], *sides), []).append(index)
    return list(groups.values())


def where_to_if(model: onnx.ModelProto, dtype: str, conditions: set[str] | None = None) -> int:
    """Rewrite every ``Where`` on one of ``conditions`` (default: the several-tokens condition) in
    place; returns how many ``If`` nodes it made. ``dtype``: the model's float type (``float32``/
    ``float16``), the selected tensors' type."""
    elem_type = ONNX_FLOAT_TYPES[dtype]
    graph = model.graph
    conditions = _several_tokens_conditions(graph) if conditions is None else conditions
    wheres = [i for i, node in enumerate(graph.node) if node.op_type == "Where" and node.input[0] in conditions]
    if not wheres:
        return 0
    nodes = list(graph.node)
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        for name in node.input:
            consumers.setdefault(name, []).append(i)
    graph_outputs = {out.name for out in graph.output}
    moved: set[int] = set()
    replacement: dict[int, onnx.NodeProto] = {}
    groups = _groups(nodes, wheres, producer)
    for group in groups:
        first = nodes[group[0]]
        branches = []
        for side, label in ((1, "then"), (2, "else")):
            roots = [nodes[index].input[side] for index in group]
            inside = _exclusive_nodes(nodes, roots, set(group), producer, consumers, graph_outputs)
            if moved & set(inside):
                raise UnsupportedModelError(f"{first.name}: its branches share nodes with another's")
            moved.update(inside)
            body, outputs = [nodes[i] for i in inside], []
            for root in roots:
                if producer.get(root) not in inside:  # nothing of its own: pass the outer value through
                    passed = f"{first.name}/{label}/{root}"
                    body.append(helper.make_node("Identity", [root], [passed], name=f"{passed}/Identity"))
                    root = passed
                outputs.append(helper.make_tensor_value_info(root, elem_type, None))
            branches.append(helper.make_graph(body, f"{first.name}/{label}", [], outputs))
        # The If takes the place of the group's last Where: every input of the moved nodes is made before it.
        replacement[max(group)] = helper.make_node(
            "If", [first.input[0]], [nodes[index].output[0] for index in group], name=first.name + "/If",
            then_branch=branches[0], else_branch=branches[1])
        moved.update(index for index in group if index != max(group))
    kept = [replacement.get(i, node) for i, node in enumerate(nodes) if i not in moved or i in replacement]
    del graph.node[:]
    graph.node.extend(_topological(kept))
    return len(groups)


def node_reads(node: onnx.NodeProto) -> set[str]:
    """What a node reads: its inputs and, for ``If`` and the like, what its subgraphs read from outside."""
    names = set(node.input)
    for attribute in node.attribute:
        for graph in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
            made = {out for inner in graph.node for out in inner.output} | {i.name for i in graph.initializer}
            for inner in graph.node:
                names.update(name for name in node_reads(inner) if name not in made)
    return names


def _topological(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """``nodes`` in an order where each comes after what it reads (subgraphs' outer reads included),
    as close to the given order as that allows."""
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    waiting = [{producer[name] for name in node_reads(node) if name in producer} for node in nodes]
    users: dict[int, list[int]] = {}
    for i, needs in enumerate(waiting):
        for need in needs:
            users.setdefault(need, []).append(i)
    ready = [i for i, needs in enumerate(waiting) if not needs]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(nodes[i])
        for user in users.get(i, []):
            waiting[user].discard(i)
            if not waiting[user]:
                heapq.heappush(ready, user)
    if len(order) != len(nodes):
        raise UnsupportedModelError("graph rewrite left a cycle")
    return order
