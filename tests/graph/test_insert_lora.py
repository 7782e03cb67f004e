"""insert-lora: lora_model.onnx + processed adapters reproduce PEFT, alone and mixed in one batch."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graph_runner import all_nodes, empty_past, lora_feeds, session, token_feeds

from edgelora.errors import UserInputError
from edgelora.formats import contract
from edgelora.formats.lora_manifest import LoraManifest
from edgelora.graph import insert_lora

TOLERANCE = 1e-4
ADAPTERS = ("a1", "a2", "a3")


def _ids(spec, batch, seq, seed=0):
    return np.random.default_rng(seed).integers(0, spec.vocab_size, size=(batch, seq), dtype=np.int64)


def _lora_logits(exported, ids, processed_dirs):
    feeds = {**token_feeds(ids), **empty_past(exported.spec, ids.shape[0], ids.shape[1]),
             **lora_feeds(exported.manifest, processed_dirs, ids.shape[1])}
    return session(exported.onnx_dir / contract.LORA_MODEL_ONNX).run([contract.LOGITS], feeds)[0]


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_single_adapter_matches_peft(exported, reference, adapter):
    ids = _ids(exported.spec, 2, 6)
    logits = _lora_logits(exported, ids, [exported.processed[adapter]] * 2)
    expected = reference.logits(exported.model_dir, exported.adapters[adapter], ids)
    base = reference.logits(exported.model_dir, None, ids)
    assert np.abs(expected - base).max() > 1e-2, "the adapter changes the logits (the test can fail)"
    np.testing.assert_allclose(logits, expected, atol=TOLERANCE, rtol=0)


def test_mixed_batch_matches_peft_row_by_row(exported, reference):
    ids = _ids(exported.spec, 4, 6, seed=3)
    rows = ["a1", "a2", "a3", None]
    logits = _lora_logits(exported, ids, [exported.processed[r] if r else None for r in rows])
    for row, adapter in enumerate(rows):
        adapter_dir = exported.adapters[adapter] if adapter else None
        expected = reference.logits(exported.model_dir, adapter_dir, ids[row:row + 1])
        np.testing.assert_allclose(logits[row:row + 1], expected, atol=TOLERANCE, rtol=0, err_msg=f"row {row} ({adapter})")


def test_no_adapter_equals_model_onnx(exported):
    ids = _ids(exported.spec, 3, 5, seed=4)
    base = session(exported.onnx_dir / contract.MODEL_ONNX).run(
        [contract.LOGITS], {**token_feeds(ids), **empty_past(exported.spec, 3, ids.shape[1])})[0]
    empty_stack = _lora_logits(exported, ids, [None, None, None])
    np.testing.assert_array_equal(empty_stack, base)
    # An adapter bound but every token's weight 0: still exactly the base model.
    feeds = {**token_feeds(ids), **empty_past(exported.spec, 3, ids.shape[1]),
             **lora_feeds(exported.manifest, [exported.processed["a2"], None, None], ids.shape[1])}
    feeds[contract.LORA_WEIGHTS] = np.zeros_like(feeds[contract.LORA_WEIGHTS])
    unrouted = session(exported.onnx_dir / contract.LORA_MODEL_ONNX).run([contract.LOGITS], feeds)[0]
    np.testing.assert_array_equal(unrouted, base)


def test_lora_graph_runs_no_shape_arithmetic_for_static_dimensions(exported):
    """Reshape / Expand targets are constants in lora_model.onnx (graph/static_shapes.py); model.onnx keeps
    the traced Shape -> Gather -> Concat chains. Fewer nodes, same numbers (the equality tests above)."""
    import onnx

    def computed_targets(name: str) -> tuple[int, int]:
        model = onnx.load(str(exported.onnx_dir / name), load_external_data=False)
        constant = {init.name for init in model.graph.initializer}
        nodes = all_nodes(model.graph)
        constant |= {out for node in nodes if node.op_type == "Constant" for out in node.output}
        reshapes = [node for node in nodes if node.op_type in ("Reshape", "Expand") and "/layers." in node.name]
        return sum(node.input[1] not in constant for node in reshapes), len(nodes)

    traced, traced_nodes = computed_targets(contract.MODEL_ONNX)
    folded, lora_nodes = computed_targets(contract.LORA_MODEL_ONNX)
    assert traced > 0 and folded == 0
    branch_nodes = 4 * len(exported.manifest.sites)  # each LoRA branch adds a few nodes; folding removes more
    assert lora_nodes < traced_nodes + branch_nodes - 40 * exported.spec.num_layers, (traced_nodes, lora_nodes)


def test_logits_only_at_the_kept_positions(exported):
    """lora_model.onnx computes logits [batch, kept, vocab] at logits_positions, equal to those of every position."""
    ids = _ids(exported.spec, 3, 6, seed=5)
    every = _lora_logits(exported, ids, [exported.processed["a2"], None, exported.processed["a1"]])
    feeds = {**token_feeds(ids), **empty_past(exported.spec, 3, ids.shape[1]),
             **lora_feeds(exported.manifest, [exported.processed["a2"], None, exported.processed["a1"]], ids.shape[1])}
    feeds[contract.LOGITS_POSITIONS] = np.array([[5], [2], [0]], np.int64)
    kept = session(exported.onnx_dir / contract.LORA_MODEL_ONNX).run([contract.LOGITS], feeds)[0]
    assert kept.shape == (3, 1, exported.spec.vocab_size)
    for row, position in enumerate((5, 2, 0)):
        np.testing.assert_allclose(kept[row, 0], every[row, position], atol=1e-5, rtol=0)


def test_manifest_and_graph_record_the_export_they_were_built_from(exported):
    from edgelora.formats.fingerprint import METADATA_KEY, export_fingerprint

    manifest = LoraManifest.load(exported.onnx_dir)
    assert manifest.source_fingerprint and manifest.source_fingerprint == export_fingerprint(exported.onnx_dir)
    model = onnx.load(str(exported.onnx_dir / contract.LORA_MODEL_ONNX), load_external_data=False)
    assert {p.key: p.value for p in model.metadata_props}[METADATA_KEY] == manifest.source_fingerprint


def test_lora_graph_shares_the_weight_file(exported):
    model = onnx.load(str(exported.onnx_dir / contract.LORA_MODEL_ONNX), load_external_data=False)
    locations = {entry.value for init in model.graph.initializer for entry in init.external_data if entry.key == "location"}
    assert locations == {contract.MODEL_ONNX_DATA}


def test_manifest_lists_every_lora_input(exported):
    model = onnx.load(str(exported.onnx_dir / contract.LORA_MODEL_ONNX), load_external_data=False)
    inputs = {i.name for i in model.graph.input}
    manifest = LoraManifest.load(exported.onnx_dir)
    assert len(manifest.sites) == exported.spec.num_layers * len(contract.MODULE_NAMES)
    for site in manifest.sites:
        assert site.a_name in inputs and site.b_name in inputs
    assert contract.LORA_TOKENS in inputs and contract.LORA_WEIGHTS in inputs


def test_subset_of_target_modules(tmp_path, exported):
    import shutil

    onnx_dir = tmp_path / "subset"
    shutil.copytree(exported.onnx_dir, onnx_dir, ignore=shutil.ignore_patterns("lora_*"))
    manifest = insert_lora(onnx_dir, ["q_proj", "v"])
    assert manifest.target_modules == ["q", "v"]
    assert {site.module for site in manifest.sites} == {"q", "v"}


def test_unknown_target_module_is_refused(tmp_path, exported):
    with pytest.raises(UserInputError, match="unknown module 'lm_head'"):
        insert_lora(exported.onnx_dir, ["q", "lm_head"])


def test_missing_model_onnx_is_refused(tmp_path):
    with pytest.raises(UserInputError, match="no model.onnx"):
        insert_lora(tmp_path)


def test_manifest_of_another_layout_version_is_refused(exported, tmp_path):
    import json
    import shutil

    shutil.copy(exported.onnx_dir / contract.LORA_MANIFEST, tmp_path / contract.LORA_MANIFEST)
    raw = json.loads((tmp_path / contract.LORA_MANIFEST).read_text())
    raw["version"] = 1
    (tmp_path / contract.LORA_MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(UserInputError, match="re-run 'edgelora insert-lora"):
        LoraManifest.load(tmp_path)


def test_lora_results_come_back_by_gather_not_scatter(exported):
    """ONNX Runtime's CPU ScatterND adds its entries on several threads: two entries adding to one token
    (a mix's members, padding) lose updates (measured: 142 of 200 runs at a prefill's size). The branches
    read their results back with GatherND instead."""
    model = onnx.load(str(exported.onnx_dir / contract.LORA_MODEL_ONNX), load_external_data=False)
    ops = {node.op_type for node in all_nodes(model.graph) if node.name.startswith("/lora/")}
    assert "ScatterND" not in ops and "ScatterElements" not in ops
    assert "GatherND" in ops and "ReduceSum" in ops


def test_a_base_only_step_skips_the_wide_lora_way_back(exported):
    """The gate/up way back (IF_WIDTH x hidden or wider) is an If on 'the stack has rows': with rank-0
    stacks (no adapter in the step) it only splits the fused product into its parts (the equality with
    model.onnx is tested above); narrower ones run as plain nodes."""
    from edgelora.graph.insert_lora import IF_WIDTH

    spec = exported.spec
    assert 2 * spec.intermediate_size >= IF_WIDTH * spec.hidden_size, "the fixture has a wide site"
    model = onnx.load(str(exported.onnx_dir / contract.LORA_MODEL_ONNX), load_external_data=False)
    sites = [node for node in model.graph.node if node.op_type == "If" and node.name.startswith("/lora/")]
    assert sorted(node.name.split("/")[2] for node in sites) == sorted(f"layers.{layer}" for layer in range(spec.num_layers))
    assert {node.name.split("/")[3] for node in sites} == {"gateup"} and len({node.input[0] for node in sites}) == 1
    for node in sites:
        branches = {attribute.name: [inner.op_type for inner in attribute.g.node] for attribute in node.attribute}
        assert branches["else_branch"] == ["Split"]
        assert {"MatMul", "GatherND", "ReduceSum", "Add", "Split"} <= set(branches["then_branch"])
