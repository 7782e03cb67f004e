"""export: model.onnx reproduces HF float32 logits, names its projections, describes the model."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from graph_runner import empty_past, past_from_outputs, session, token_feeds

from edgelora.cli import main
from edgelora.errors import UnsupportedModelError, UserInputError
from edgelora.export import export_model
from edgelora.formats import contract

TOLERANCE = 1e-4


def _prompt(spec, batch: int, seq: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, spec.vocab_size, size=(batch, seq), dtype=np.int64)


def test_prefill_logits_match_hf(exported, reference):
    ids = _prompt(exported.spec, 2, 7)
    logits = session(exported.onnx_dir / contract.MODEL_ONNX).run(
        [contract.LOGITS], {**token_feeds(ids), **empty_past(exported.spec, 2, ids.shape[1])})[0]
    expected = reference.logits(exported.model_dir, None, ids)
    np.testing.assert_allclose(logits, expected, atol=TOLERANCE, rtol=0)


def test_decode_step_with_past_matches_hf(exported, reference):
    ids = _prompt(exported.spec, 2, 8, seed=1)
    graph = session(exported.onnx_dir / contract.MODEL_ONNX)
    prefill = graph.run(None, {**token_feeds(ids[:, :7]), **empty_past(exported.spec, 2, ids.shape[1])})
    decode = graph.run(None, {**token_feeds(ids[:, 7:], past_len=7), **past_from_outputs(exported.spec, prefill)})
    expected = reference.logits(exported.model_dir, None, ids)
    np.testing.assert_allclose(decode[0][:, 0], expected[:, 7], atol=TOLERANCE, rtol=0)


def _run_in_shared_buffers(exported, ids: np.ndarray, spans, capacity: int = 16):
    """Feed ``ids`` span by span into one preallocated buffer per layer bound as past and present."""
    import onnxruntime as ort

    spec = exported.spec
    graph = session(exported.onnx_dir / contract.MODEL_ONNX)
    cache = [np.zeros((ids.shape[0], spec.num_kv_heads, capacity, spec.head_dim), np.float32)
             for _ in range(2 * spec.num_layers)]
    values = [ort.OrtValue.ortvalue_from_numpy(buffer) for buffer in cache]
    binding = graph.io_binding()
    outputs = []
    for start, end in spans:
        feeds = token_feeds(ids[:, start:end], past_len=start)
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for layer in range(spec.num_layers):
            for offset, (past, present) in enumerate(((contract.past_key_name(layer), contract.present_key_name(layer)),
                                                     (contract.past_value_name(layer), contract.present_value_name(layer)))):
                binding.bind_ortvalue_input(past, values[2 * layer + offset])
                binding.bind_ortvalue_output(present, values[2 * layer + offset])
        binding.bind_output(contract.LOGITS)
        graph.run_with_iobinding(binding)
        outputs.append(binding.copy_outputs_to_cpu()[-1])
    return outputs, cache


def test_decode_in_shared_cache_buffers_matches_hf(exported, reference):
    """The in-place cache: past and present are one preallocated buffer per layer."""
    ids = _prompt(exported.spec, 1, 6, seed=2)
    outputs, cache = _run_in_shared_buffers(exported, ids, [(0, 5), (5, 6)])
    expected = reference.logits(exported.model_dir, None, ids)
    np.testing.assert_allclose(outputs[1][:, 0], expected[:, 5], atol=TOLERANCE, rtol=0)
    assert np.abs(cache[0][:, :, 5]).sum() > 0, "the decode step wrote its key into the shared buffer"


def test_chunks_on_a_past_in_a_larger_buffer_match_hf(exported, reference):
    """Steps of several tokens on top of a cache (the buffer sliced to the mask's width), then decode."""
    ids = _prompt(exported.spec, 2, 9, seed=3)
    spans = [(0, 3), (3, 7), (7, 8), (8, 9)]
    outputs, _ = _run_in_shared_buffers(exported, ids, spans)
    expected = reference.logits(exported.model_dir, None, ids)
    for (start, end), logits in zip(spans, outputs):
        np.testing.assert_allclose(logits, expected[:, start:end], atol=TOLERANCE, rtol=0)


def test_each_layer_runs_one_attention_form_per_step(exported):
    """The trace's Where(several tokens, ...) became one If per layer: a step computes one form only."""
    graph = onnx.load(str(exported.onnx_dir / contract.MODEL_ONNX), load_external_data=False).graph
    branches = [node for node in graph.node if node.op_type == "If"]
    assert len(branches) == exported.spec.num_layers
    assert len({node.input[0] for node in branches}) == 1, "one condition for every layer"
    for node in branches:
        forms = {attribute.name: [inner.op_type for inner in attribute.g.node] for attribute in node.attribute}
        assert forms["then_branch"].count("Slice") == 2 and forms["then_branch"].count("MatMul") == 2
        assert "Slice" not in forms["else_branch"] and forms["else_branch"].count("MatMul") == 2
    assert not [node for node in graph.node if node.op_type == "Where" and node.input[0] == branches[0].input[0]]


def test_projections_are_separate_named_matmuls(exported):
    graph = onnx.load(str(exported.onnx_dir / contract.MODEL_ONNX), load_external_data=False).graph
    matmuls = {node.name for node in graph.node if node.op_type == "MatMul"}
    for layer in range(exported.spec.num_layers):
        for module in contract.MODULE_NAMES:
            assert contract.projection_node_name(layer, module) in matmuls


def test_graph_interface_names(exported):
    graph = onnx.load(str(exported.onnx_dir / contract.MODEL_ONNX), load_external_data=False).graph
    inputs = [i.name for i in graph.input]
    outputs = [o.name for o in graph.output]
    assert inputs[:3] == [contract.INPUT_IDS, contract.ATTENTION_MASK, contract.POSITION_IDS]
    assert contract.past_key_name(exported.spec.num_layers - 1) in inputs
    assert outputs[0] == contract.LOGITS and contract.present_value_name(0) in outputs
    # the cache is written in place by ScatterElements, one per layer and key/value
    assert sum(node.op_type == "ScatterElements" for node in graph.node) == 2 * exported.spec.num_layers


def test_config_json_describes_the_model(exported):
    raw = json.loads((exported.onnx_dir / contract.MODEL_CONFIG).read_text())
    hf = json.loads((exported.model_dir / "config.json").read_text())
    assert raw["num_layers"] == hf["num_hidden_layers"]
    assert raw["num_heads"] == hf["num_attention_heads"]
    assert raw["num_kv_heads"] == hf["num_key_value_heads"]
    assert raw["hidden_size"] == hf["hidden_size"] and raw["vocab_size"] == hf["vocab_size"]
    assert raw["module_shapes"]["k"] == [hf["hidden_size"], hf["num_key_value_heads"] * raw["head_dim"]]
    assert raw["module_shapes"]["down"] == [hf["intermediate_size"], hf["hidden_size"]]
    assert raw["eos_token_ids"], "eos ids are recorded"
    assert raw["dtype"] == "float32"


def test_tokenizer_and_chat_template_are_copied(exported):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(exported.onnx_dir)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    original = AutoTokenizer.from_pretrained(exported.model_dir).apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text == original


def test_weights_live_in_one_external_data_file(exported):
    assert (exported.onnx_dir / contract.MODEL_ONNX_DATA).stat().st_size > (exported.onnx_dir / contract.MODEL_ONNX).stat().st_size


def test_unsupported_architecture_is_refused(tmp_path):
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UnsupportedModelError, match="supported: .*qwen2"):
        export_model(tmp_path / "gpt2", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_model_folder_exits_2_with_one_line(tmp_path, capsys):
    code = main(["export", "--model_dir", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no such folder" in err
    assert not (tmp_path / "out").exists()


def test_empty_model_folder_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match="no config.json"):
        export_model(tmp_path / "empty", tmp_path / "out")


def test_folder_without_weights_is_refused(tmp_path, qwen2_sample):
    folder = tmp_path / "noweights"
    folder.mkdir()
    (folder / "config.json").write_text((qwen2_sample.model_dir / "config.json").read_text())
    with pytest.raises(UserInputError, match="no weights"):
        export_model(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_sliding_window_and_rows_of_different_lengths_match_hf(tmp_path, reference):
    """Mistral with a 3-token window; a right-padded batch whose rows have 9 and 5 real tokens."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=97, hidden_size=40, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=5, num_key_value_heads=1, head_dim=8, sliding_window=3,
                           max_position_embeddings=64, initializer_range=0.2)
    model_dir = tmp_path / "mistral"
    MistralForCausalLM(config).save_pretrained(model_dir)
    spec = export_model(model_dir, tmp_path / "onnx")
    ids = _prompt(spec, 2, 9, seed=5)
    lengths = [9, 5]
    feeds = token_feeds(ids)
    feeds[contract.ATTENTION_MASK] = (np.arange(9)[None] < np.array(lengths)[:, None]).astype(np.int64)
    logits = session(tmp_path / "onnx" / contract.MODEL_ONNX).run(
        [contract.LOGITS], {**feeds, **empty_past(spec, 2, 12)})[0]
    for row, length in enumerate(lengths):
        expected = reference.logits(model_dir, None, ids[row: row + 1, :length])
        np.testing.assert_allclose(logits[row, :length], expected[0], atol=TOLERANCE, rtol=0)


def _qwen3_config():
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=101, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=6, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                       initializer_range=0.2, tie_word_embeddings=True)


def _llama3_rope_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=101, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=256,
                       initializer_range=0.2, rope_parameters={
                           "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 32})


@pytest.mark.parametrize("make_config", [_qwen3_config, _llama3_rope_config], ids=["qwen3", "llama3_rope_parameters"])
def test_other_families_match_hf(tmp_path, reference, make_config):
    """Qwen3's q/k norms; transformers 5 rope_parameters with llama3 scaling, past the original context."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    AutoModelForCausalLM.from_config(make_config()).save_pretrained(model_dir)
    spec = export_model(model_dir, tmp_path / "onnx")
    ids = _prompt(spec, 1, 40, seed=6)
    logits = session(tmp_path / "onnx" / contract.MODEL_ONNX).run(
        [contract.LOGITS], {**token_feeds(ids), **empty_past(spec, 1, 40)})[0]
    np.testing.assert_allclose(logits, reference.logits(model_dir, None, ids), atol=TOLERANCE, rtol=0)
