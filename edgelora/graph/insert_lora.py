"""insert-lora: add multi-adapter LoRA branches beside every targeted projection of model.onnx.

The branches take stacked adapter weights and, per stack entry, the tokens routed to it with
their weights (see ``contract``), so one graph serves base rows, single-adapter batches, batches
that mix adapters row by row and rows that mix several adapters with weights; each token costs
its own adapters' ranks, not the whole stack's.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from edgelora.errors import UserInputError
from edgelora.export.branches import where_to_if
from edgelora.formats import contract
from edgelora.formats.fileio import staged_output
from edgelora.formats.fingerprint import METADATA_KEY, export_fingerprint
from edgelora.formats.lora_manifest import LoraManifest, LoraSite
from edgelora.formats.model_spec import ModelSpec
from edgelora.graph.fuse_projections import complete_groups, fuse_projections
from edgelora.graph.static_shapes import fold_static_shapes

log = logging.getLogger(__name__)

NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}
IF_WIDTH = 4  # a LoRA way back this many times the hidden size wide or wider skips base-only steps (_add_all_back)


def _node(graph: gs.Graph, op: str, name: str, inputs: list, attrs: dict | None = None,
          dtype=None, shape=None) -> gs.Variable:
    """Append one node whose single output is named ``{name}/output_0``."""
    output = gs.Variable(f"{name}/output_0", dtype=dtype, shape=shape)
    graph.nodes.append(gs.Node(op=op, name=name, attrs=attrs or {}, inputs=inputs, outputs=[output]))
    return output


def _const(name: str, values: list[int]) -> gs.Constant:
    return gs.Constant(name, np.asarray(values, dtype=np.int64))


def _routed_input(graph: gs.Graph, x: gs.Variable, tokens: gs.Variable, weights: gs.Variable,
                  routed: dict[str, gs.Variable], dtype: str) -> gs.Variable:
    """Each stack entry's tokens of ``x``, times their weights: [entries, per_entry, in], once per input.

    ::

        x [b,s,in] ──GatherND(lora_tokens [E,m,2])──> [E,m,in] ──Mul(lora_weights [E,m,1])──> xw

    q, k and v (and gate and up) read the same activations: they share one gather.
    """
    if x.name not in routed:
        prefix = f"/lora/routed/{len(routed)}"
        float_type = NUMPY_DTYPES[dtype]
        gathered = _node(graph, "GatherND", f"{prefix}/GatherND", [x, tokens], {"batch_dims": 0}, float_type)
        routed[x.name] = _node(graph, "Mul", f"{prefix}/Weights", [gathered, weights], dtype=float_type)
    return routed[x.name]


def _site_delta(graph: gs.Graph, xw: gs.Variable, a: gs.Variable, b: gs.Variable, site: LoraSite,
                dtype: str) -> gs.Variable:
    """Each stack entry's LoRA product over its own tokens: [E, m, out] (``xw`` from ``_routed_input``).

    ::

        xw [E,m,in] ──MatMul(A^T [E,r,in] transposed)──> [E,m,r] ──MatMul(B [E,r,out])──> delta [E,m,out]

    Entry e computes only the tokens routed to it, so a token costs the rank of its own adapters
    whatever else the batch holds (ONNX Runtime folds the Transpose into the MatMul).
    """
    prefix = f"/lora/layers.{site.layer}/{site.module}"
    float_type = NUMPY_DTYPES[dtype]
    a_t = _node(graph, "Transpose", f"{prefix}/A/Transpose", [a], {"perm": [0, 2, 1]}, float_type)
    xa = _node(graph, "MatMul", f"{prefix}/A/MatMul", [xw, a_t], dtype=float_type)
    return _node(graph, "MatMul", f"{prefix}/B/MatMul", [xa, b], dtype=float_type)


def _has_adapters(graph: gs.Graph, a: gs.Variable) -> gs.Variable:
    """0-d bool: the step binds adapter rows (a base-only step binds stacks of rank 0)."""
    rank = _node(graph, "Shape", "/lora/has_adapters/Shape", [a], {"start": 1, "end": 2}, np.int64)
    return _node(graph, "Greater", "/lora/has_adapters/Greater", [rank, _const("/lora/has_adapters/zero", [0])], dtype=bool)


def _add_back(graph: gs.Graph, y: gs.Variable, deltas: list[gs.Variable], back: gs.Variable, prefix: str,
              dtype: str, has_adapters: gs.Variable | None, split: gs.Node | None = None) -> None:
    """Make ``y`` its base value plus each token's own results read back from ``deltas``.

    ::

        producer ──> y_base ──────────────────────────────────────────────────────────────Add──> Where ──> y
        deltas ──Concat(-1)──> [E,m,out] ──GatherND(lora_back [b,s,K,2])──> [b,s,K,out] ──ReduceSum(K)──┘     │
        y_base (has_adapters false) ────────────────────────────────────────────────────────────────────────┘

    The ``Where`` on ``has_adapters`` becomes an ``If`` once the graph is written (``branches.py``):
    a base-only step runs none of the site's LoRA nodes. Without ``has_adapters`` the ``Add`` writes
    ``y`` directly (see ``_add_all_back`` for which sites get the ``If``).
    Where ``y`` is a fused product that ``split`` cuts into q/k/v (gate/up), each side splits its own
    value and the ``Where`` picks the parts: a base step then splits ``y_base`` directly instead of
    first copying it out of the ``If``.

    A token reads its K results (a weighted mix has several; a base token reads a padding item,
    exactly zero). The way back is a gather, never a scatter: ONNX Runtime's CPU ScatterND adds its
    entries on several threads at once, so two entries adding to one token could lose an update.
    Several ``deltas`` (q/k/v, gate/up) go back together onto their fused product's output, one
    gather for the group.
    """
    float_type = NUMPY_DTYPES[dtype]
    producer = y.inputs[0]
    y_base = gs.Variable(f"{prefix}/base_output", dtype=y.dtype, shape=y.shape)
    producer.outputs[producer.outputs.index(y)] = y_base
    delta = deltas[0] if len(deltas) == 1 else _node(graph, "Concat", f"{prefix}/ConcatDeltas", deltas, {"axis": -1},
                                                      float_type)
    per_member = _node(graph, "GatherND", f"{prefix}/Back", [delta, back], {"batch_dims": 0}, float_type)
    summed = _node(graph, "ReduceSum", f"{prefix}/SumMembers", [per_member, _const(f"{prefix}/members_axis", [2])],
                   {"keepdims": 0}, float_type)
    if has_adapters is None:
        graph.nodes.append(gs.Node(op="Add", name=f"{prefix}/Add", inputs=[y_base, summed], outputs=[y]))
        return
    with_lora = _node(graph, "Add", f"{prefix}/Add", [y_base, summed], dtype=float_type)
    if split is None:
        graph.nodes.append(gs.Node(op="Where", name=f"{prefix}/Where", inputs=[has_adapters, with_lora, y_base],
                                   outputs=[y]))
        return
    parts = list(split.outputs)
    base_parts = [gs.Variable(f"{prefix}/base_part{i}", dtype=part.dtype, shape=part.shape) for i, part in enumerate(parts)]
    lora_parts = [gs.Variable(f"{prefix}/lora_part{i}", dtype=part.dtype, shape=part.shape) for i, part in enumerate(parts)]
    split.inputs[0] = y_base
    split.outputs = base_parts
    graph.nodes.append(gs.Node(op="Split", name=f"{prefix}/Split", attrs=dict(split.attrs),
                               inputs=[with_lora, *split.inputs[1:]], outputs=lora_parts))
    for i, part in enumerate(parts):
        graph.nodes.append(gs.Node(op="Where", name=f"{prefix}/Where{i}",
                                   inputs=[has_adapters, lora_parts[i], base_parts[i]], outputs=[part]))


def _add_all_back(graph: gs.Graph, deltas: dict[tuple[int, str], tuple[gs.Variable, gs.Variable]],
                  spec: ModelSpec, back: gs.Variable, dtype: str, has_adapters: gs.Variable) -> int:
    """Add every site's results back: one gather per fused q/k/v or gate/up product whose modules all
    carry LoRA, one per other module. Returns how many groups went back together.

    Only a way back at least ``IF_WIDTH`` times the hidden size wide (the MLP's gate/up) sits in an
    ``If``: in a base-only step its zero results cost a copy of [tokens, width] three times over
    (6% of a base prefill at the bench model's 9,728), while an ``If`` costs each adapter step a
    few microseconds of dispatch (2-4% of a decode step with all seven modules wrapped).
    """
    def condition(modules) -> gs.Variable | None:
        width = sum(spec.module_in_out(module)[1] for module in modules)
        return has_adapters if width >= IF_WIDTH * spec.hidden_size else None

    grouped = 0
    for layer, group, members in list(complete_groups(deltas, spec.num_layers)):
        outputs = [y for _, y in members]
        split = outputs[0].inputs[0] if outputs[0].inputs else None
        if split is None or split.op != "Split" or list(split.outputs) != outputs:
            continue
        _add_back(graph, split.inputs[0], [delta for delta, _ in members], back,
                  f"/lora/layers.{layer}/{''.join(group)}", dtype, condition(group), split)
        for module in group:
            del deltas[(layer, module)]
        grouped += 1
    for (layer, module), (delta, y) in deltas.items():
        _add_back(graph, y, [delta], back, f"/lora/layers.{layer}/{module}", dtype, condition([module]))
    return grouped


def _keep_logits_positions(graph: gs.Graph) -> gs.Variable:
    """Compute logits only at the positions the caller samples from (a new input, [batch, kept]).

    ::

        before:  h [b,s,hidden] ──MatMul(lm_head)──> logits [b,s,vocab]
        after:   logits_positions [b,k] ──Unsqueeze(-1)──> [b,k,1] ─┐
                 h [b,s,hidden] ──GatherND(batch_dims=1)──────────> [b,k,hidden] ──MatMul(lm_head)──> logits [b,k,vocab]

    For a real vocabulary the lm_head over every prompt position is a quarter of prefill's FLOPs
    and [batch, prompt, vocab] floats of memory; the runtime keeps one position per row.
    """
    logits = next((out for out in graph.outputs if out.name == contract.LOGITS), None)
    producer = logits.inputs[0] if logits is not None and logits.inputs else None
    if producer is None or producer.op not in ("MatMul", "MatMulNBits"):  # float, or quantized (edgelora quantize)
        raise UserInputError(f"the graph's '{contract.LOGITS}' output does not come from the lm_head MatMul")
    prefix = "/lora/logits_positions"
    positions = gs.Variable(contract.LOGITS_POSITIONS, dtype=np.int64, shape=["batch", "kept_positions"])
    indices = _node(graph, "Unsqueeze", f"{prefix}/Unsqueeze", [positions, _const(f"{prefix}/axis", [-1])],
                    dtype=np.int64)
    hidden = producer.inputs[0]
    kept = _node(graph, "GatherND", f"{prefix}/GatherND", [hidden, indices], {"batch_dims": 1}, hidden.dtype)
    producer.inputs[0] = kept
    logits.shape = ["batch", "kept_positions", logits.shape[-1] if logits.shape else "vocab"]
    return positions


def resolve_targets(target_modules: list[str] | None) -> tuple[str, ...]:
    if not target_modules:
        return contract.MODULE_NAMES
    try:
        return contract.normalize_module_names(target_modules)
    except ValueError as exc:
        raise UserInputError(
            f"--target-modules: unknown module {exc.args[0]!r}; choose from {', '.join(contract.MODULE_NAMES)}"
            " (or their HF names, e.g. q_proj)"
        ) from None


def insert_lora(onnx_dir: Path, target_modules: list[str] | None = None) -> LoraManifest:
    """Write ``lora_model.onnx`` and ``lora_manifest.json`` into ``onnx_dir``.

    The weights stay in ``model.onnx.data``; ``lora_model.onnx`` points at the same file. Both
    record the export's fingerprint, so the runtime can refuse them once the export changes.
    """
    onnx_dir = Path(onnx_dir)
    source = onnx_dir / contract.MODEL_ONNX
    if not source.is_file():
        raise UserInputError(f"--onnx-dir {onnx_dir}: no {contract.MODEL_ONNX}; run 'edgelora export' first")
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
    if any(inp.name == contract.LORA_TOKENS for inp in graph.inputs):
        raise UserInputError(f"{source}: already has LoRA inputs")

    dtype = spec.dtype
    float_type = NUMPY_DTYPES[dtype]
    tokens = gs.Variable(contract.LORA_TOKENS, dtype=np.int64, shape=[contract.LORA_STACK, contract.LORA_ENTRY_TOKENS, 2])
    weights = gs.Variable(contract.LORA_WEIGHTS, dtype=float_type, shape=[contract.LORA_STACK, contract.LORA_ENTRY_TOKENS, 1])
    manifest = LoraManifest(target_modules=list(targets), num_layers=spec.num_layers, dtype=dtype)
    back = gs.Variable(contract.LORA_BACK, dtype=np.int64, shape=["batch", "sequence", contract.LORA_MEMBERS, 2])
    new_inputs = [tokens, weights, back]
    routed: dict[str, gs.Variable] = {}
    deltas: dict[tuple[int, str], tuple[gs.Variable, gs.Variable]] = {}  # site -> (its results, the projection's output)
    for layer in range(spec.num_layers):
        for module in targets:
            candidates = contract.projection_node_names(layer, module)
            matmul = next((nodes[name] for name in candidates if name in nodes), None)
            if matmul is None:
                raise UserInputError(f"{source}: projection {candidates[0]} not found")
            in_features, out_features = spec.module_in_out(module)
            site = LoraSite(layer, module, contract.lora_a_name(layer, module), contract.lora_b_name(layer, module),
                            in_features, out_features)
            a = gs.Variable(site.a_name, dtype=float_type, shape=[contract.LORA_STACK, contract.LORA_RANK_DIM, in_features])
            b = gs.Variable(site.b_name, dtype=float_type, shape=[contract.LORA_STACK, contract.LORA_RANK_DIM, out_features])
            xw = _routed_input(graph, matmul.inputs[0], tokens, weights, routed, dtype)
            deltas[(layer, module)] = (_site_delta(graph, xw, a, b, site, dtype), matmul.outputs[0])
            new_inputs += [a, b]
            manifest.sites.append(site)
    projections = {(layer, module): nodes[name] for layer in range(spec.num_layers) for module in contract.MODULE_NAMES
                   for name in contract.projection_node_names(layer, module) if name in nodes}
    fused = fuse_projections(graph, projections, spec.num_layers,
                             {module: spec.module_in_out(module)[1] for module in contract.MODULE_NAMES})
    has_adapters = _has_adapters(graph, new_inputs[3])  # the first site's A: every site binds the same rank
    _add_all_back(graph, deltas, spec, back, dtype, has_adapters)
    new_inputs.append(_keep_logits_positions(graph))
    graph.inputs.extend(new_inputs)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()

    rewritten = gs.export_onnx(graph)
    rewritten.graph.initializer.extend(initializers)
    rewritten.ir_version = model.ir_version
    del rewritten.opset_import[:]
    rewritten.opset_import.extend(model.opset_import)
    folded = fold_static_shapes(rewritten)  # model.onnx keeps the traced shape chains; the runtime graph does not
    where_to_if(rewritten, dtype, {has_adapters.name})
    manifest.source_fingerprint = export_fingerprint(onnx_dir)
    onnx.helper.set_model_props(rewritten, {METADATA_KEY: manifest.source_fingerprint})
    with staged_output(onnx_dir) as staging:
        onnx.save_model(rewritten, str(staging / contract.LORA_MODEL_ONNX))
        manifest.save(staging)
    log.info("inserted LoRA into %d projections (%s) of %d layers; %d q/k/v and gate/up groups fused; "
             "%d shape-only nodes folded away", len(manifest.sites), ",".join(targets), spec.num_layers, fused,
             folded["removed"])
    return manifest
