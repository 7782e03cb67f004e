"""insert-lora: add multi-adapter LoRA branches beside every targeted projection of model.onnx.

The branches take stacked adapter weights and a per-row adapter index (see ``contract``), so one
graph serves base rows, single-adapter batches and batches that mix adapters row by row, with
any rank up to the maximum (smaller ranks are zero-padded by whoever binds the stack).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from edgelora import contract
from edgelora.errors import UserInputError
from edgelora.fileio import staged_output
from edgelora.lora_manifest import LoraManifest, LoraSite
from edgelora.model_spec import ModelSpec

log = logging.getLogger(__name__)

NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}
ONNX_DTYPES = {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16}


def _node(graph: gs.Graph, op: str, name: str, inputs: list, attrs: dict | None = None,
          dtype=None, shape=None) -> gs.Variable:
    """Append one node whose single output is named ``{name}/output_0``."""
    output = gs.Variable(f"{name}/output_0", dtype=dtype, shape=shape)
    graph.nodes.append(gs.Node(op=op, name=name, attrs=attrs or {}, inputs=inputs, outputs=[output]))
    return output


def _const(name: str, values: list[int]) -> gs.Constant:
    return gs.Constant(name, np.asarray(values, dtype=np.int64))


def _add_row_mask(graph: gs.Graph, first_a: gs.Variable, lora_index: gs.Variable, dtype: str) -> gs.Variable:
    """Build the [n_stack, batch, 1, 1] mask that routes each row to its stack entry, once per graph.

    ::

        Shape(A)[0:1] = n ──Range(1, n+1)──> [n] ──Unsqueeze(1)──> [n,1] ─┐
        lora_index [b] ─────────────────────Unsqueeze(0)──> [1,b] ─────── Equal ──> [n,b] bool
            ──Cast(float)──> ──Unsqueeze(2,3)──> mask [n,b,1,1]
    """
    prefix = "/lora/row_mask"
    int64 = np.int64
    float_type = NUMPY_DTYPES[dtype]
    n_stack = _node(graph, "Shape", f"{prefix}/StackSize", [first_a], {"start": 0, "end": 1}, int64, [1])
    n_plus_one = _node(graph, "Add", f"{prefix}/StackEnd", [n_stack, _const(f"{prefix}/one", [1])], dtype=int64)
    start = gs.Constant(f"{prefix}/start", np.asarray(1, dtype=np.int64))
    delta = gs.Constant(f"{prefix}/delta", np.asarray(1, dtype=np.int64))
    end = _node(graph, "Squeeze", f"{prefix}/StackEndScalar", [n_plus_one, _const(f"{prefix}/axis0", [0])], dtype=int64)
    entries = _node(graph, "Range", f"{prefix}/Entries", [start, end, delta], dtype=int64)
    entries_col = _node(graph, "Unsqueeze", f"{prefix}/EntriesColumn", [entries, _const(f"{prefix}/axis1", [1])], dtype=int64)
    index_row = _node(graph, "Unsqueeze", f"{prefix}/IndexRow", [lora_index, _const(f"{prefix}/axis0b", [0])], dtype=int64)
    hits = _node(graph, "Equal", f"{prefix}/Equal", [entries_col, index_row], dtype=np.bool_)
    hits_float = _node(graph, "Cast", f"{prefix}/Cast", [hits], {"to": ONNX_DTYPES[dtype]}, float_type)
    return _node(graph, "Unsqueeze", f"{prefix}/Unsqueeze", [hits_float, _const(f"{prefix}/axes23", [2, 3])],
                 dtype=float_type)


def _routed_input(graph: gs.Graph, x: gs.Tensor, mask: gs.Variable, dtype: str, cache: dict) -> gs.Variable:
    """Each row of ``x`` copied into its adapter's stack entry (zeros elsewhere), once per distinct ``x``.

    Projections that read the same activation (q/k/v, gate/up) share this::

        x [b,s,in] ──Unsqueeze(0)──> [1,b,s,in] ──Mul(mask [n,b,1,1])──> x_routed [n,b,s,in]
    """
    if x.name not in cache:
        prefix = f"/lora/route/{len(cache)}"
        float_type = NUMPY_DTYPES[dtype]
        x_4d = _node(graph, "Unsqueeze", f"{prefix}/Unsqueeze", [x, _const(f"{prefix}/axis0", [0])], dtype=float_type)
        cache[x.name] = _node(graph, "Mul", f"{prefix}/RowMask", [x_4d, mask], dtype=float_type)
    return cache[x.name]


def _attach_branch(graph: gs.Graph, matmul: gs.Node, a: gs.Variable, b: gs.Variable, x_routed: gs.Variable,
                   site: LoraSite, dtype: str) -> None:
    """Add ``x @ A @ B`` (per row, its own stack entry) to a projection's output: four nodes.

    ::

        x [b,s,in] ──MatMul(W)─────────────────────────────────────────────────> y_base ──Add──> y
        x_routed [n,b,s,in] ─MatMul(A [n,1,in,r])─> [n,b,s,r] ─MatMul(B [n,1,r,out])─>     │
            [n,b,s,out] ─ReduceSum(axis 0)─> delta [b,s,out] ──────────────────────────────┘
    """
    prefix = f"/lora/layers.{site.layer}/{site.module}"
    float_type = NUMPY_DTYPES[dtype]
    y = matmul.outputs[0]
    y_base = gs.Variable(f"{prefix}/base_output", dtype=y.dtype, shape=y.shape)
    matmul.outputs = [y_base]
    xa = _node(graph, "MatMul", f"{prefix}/A/MatMul", [x_routed, a], dtype=float_type)
    xab = _node(graph, "MatMul", f"{prefix}/B/MatMul", [xa, b], dtype=float_type)
    delta = _node(graph, "ReduceSum", f"{prefix}/SumStack", [xab, _const(f"{prefix}/stack_axis", [0])],
                  {"keepdims": 0}, float_type)
    graph.nodes.append(gs.Node(op="Add", name=f"{prefix}/Add", inputs=[y_base, delta], outputs=[y]))


def resolve_targets(target_modules: list[str] | None) -> tuple[str, ...]:
    if not target_modules:
        return contract.MODULE_NAMES
    try:
        return contract.normalize_module_names(target_modules)
    except ValueError as exc:
        raise UserInputError(
            f"--target_modules: unknown module {exc.args[0]!r}; choose from {', '.join(contract.MODULE_NAMES)}"
            " (or their HF names, e.g. q_proj)"
        ) from None


def insert_lora(onnx_dir: Path, target_modules: list[str] | None = None) -> LoraManifest:
    """Write ``lora_model.onnx`` and ``lora_manifest.json`` into ``onnx_dir``.

    The weights stay in ``model.onnx.data``; ``lora_model.onnx`` points at the same file.
    """
    onnx_dir = Path(onnx_dir)
    source = onnx_dir / contract.MODEL_ONNX
    if not source.is_file():
        raise UserInputError(f"--onnx_dir {onnx_dir}: no {contract.MODEL_ONNX}; run 'edgelora export' first")
    spec = ModelSpec.load(onnx_dir)
    targets = resolve_targets(target_modules)
    try:
        model = onnx.load(str(source), load_external_data=False)
    except Exception as exc:  # onnx raises bare DecodeError and friends
        raise UserInputError(f"{source}: not a readable ONNX model: {exc}") from exc
    # Weights never change here: keep them aside so the rewrite handles only the graph's structure.
    initializers = list(model.graph.initializer)
    del model.graph.initializer[:]
    graph = gs.import_onnx(model)
    nodes = {node.name: node for node in graph.nodes}
    tensors = graph.tensors()
    if contract.INPUT_IDS not in tensors:
        raise UserInputError(f"{source}: no '{contract.INPUT_IDS}' input; was it written by 'edgelora export'?")
    if any(inp.name == contract.LORA_INDEX for inp in graph.inputs):
        raise UserInputError(f"{source}: already has LoRA inputs")

    dtype = spec.dtype
    lora_index = gs.Variable(contract.LORA_INDEX, dtype=np.int64, shape=["batch"])
    manifest = LoraManifest(target_modules=list(targets), num_layers=spec.num_layers, dtype=dtype)
    new_inputs = [lora_index]
    mask = None
    routed: dict[str, gs.Variable] = {}
    for layer in range(spec.num_layers):
        for module in targets:
            node_name = contract.projection_node_name(layer, module)
            matmul = nodes.get(node_name)
            if matmul is None:
                raise UserInputError(f"{source}: projection {node_name} not found")
            in_features, out_features = spec.module_in_out(module)
            site = LoraSite(layer, module, contract.lora_a_name(layer, module), contract.lora_b_name(layer, module),
                            in_features, out_features)
            a = gs.Variable(site.a_name, dtype=NUMPY_DTYPES[dtype],
                            shape=list(contract.lora_a_shape("lora_stack", in_features, "lora_rank")))
            b = gs.Variable(site.b_name, dtype=NUMPY_DTYPES[dtype],
                            shape=list(contract.lora_b_shape("lora_stack", "lora_rank", out_features)))
            if mask is None:
                mask = _add_row_mask(graph, a, lora_index, dtype)
            x_routed = _routed_input(graph, matmul.inputs[0], mask, dtype, routed)
            _attach_branch(graph, matmul, a, b, x_routed, site, dtype)
            new_inputs += [a, b]
            manifest.sites.append(site)
    graph.inputs.extend(new_inputs)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()

    rewritten = gs.export_onnx(graph)
    rewritten.graph.initializer.extend(initializers)
    rewritten.ir_version = model.ir_version
    del rewritten.opset_import[:]
    rewritten.opset_import.extend(model.opset_import)
    with staged_output(onnx_dir) as staging:
        onnx.save_model(rewritten, str(staging / contract.LORA_MODEL_ONNX))
        manifest.save(staging)
    log.info("inserted LoRA into %d projections (%s) of %d layers", len(manifest.sites), ",".join(targets), spec.num_layers)
    return manifest
