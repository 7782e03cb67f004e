"""edgelora quantize: MatMulNBits projections, insert-lora on top, the same processed adapters serve both bases."""

from __future__ import annotations

import numpy as np
import pytest

from edgelora.api import LLM, LoraConfig, LoRARequest, SamplingParams
from edgelora.cli import main
from edgelora.errors import UserInputError
from edgelora.graph import insert_lora
from edgelora.graph.quantize import QuantizeOptions, quantize_export
from edgelora.model_spec import ModelSpec

PROMPTS = ["Hello there", "The sea is", "One two three"]


@pytest.fixture(scope="module")
def qwen2(exported_samples):
    return exported_samples["qwen2"]


@pytest.fixture(scope="module", params=["int8", "int4"])
def quantized(request, qwen2, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"q_{request.param}") / "onnx"
    quantize_export(qwen2.onnx_dir, folder, QuantizeOptions(mode=request.param))
    insert_lora(folder)
    return request.param, folder


def _outputs(onnx_dir, processed: dict, max_tokens: int = 6) -> list[list[int]]:
    llm = LLM(onnx_dir, LoraConfig(max_loras=3, max_cpu_loras=3), num_threads=1)
    lora = [None] + [LoRARequest(name, index + 1, str(path)) for index, (name, path) in enumerate(processed.items())]
    prompts = [prompt for prompt in PROMPTS for _ in lora]
    outputs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
                           lora * len(PROMPTS))
    return [output.token_ids for output in outputs]


def test_every_projection_and_the_lm_head_become_matmulnbits(qwen2, quantized):
    import onnx

    mode, folder = quantized
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("MatMulNBits") == qwen2.spec.num_layers * len(qwen2.spec.module_shapes) + 1
    assert "Gather" in ops, "the embedding lookup stays an exact float Gather"
    assert ModelSpec.load(folder).quantization.startswith(f"{mode}, blocks of 32, symmetric")


def test_the_same_processed_adapters_serve_the_quantized_base(qwen2, quantized):
    """Base, single-adapter and mixed rows on the quantized graph; adapters still change the answer,
    and int8 stays close to the float base (greedy ids mostly equal)."""
    mode, folder = quantized
    got = _outputs(folder, qwen2.processed)
    want = _outputs(qwen2.onnx_dir, qwen2.processed)
    per_prompt = len(qwen2.processed) + 1
    for start in range(0, len(got), per_prompt):
        assert len({tuple(ids) for ids in got[start:start + per_prompt]}) == per_prompt, "each adapter differs"
    agreement = np.mean([a == b for row_a, row_b in zip(got, want) for a, b in zip(row_a, row_b)])
    if mode == "int8":  # int4 on a random-weight model flips near-flat greedy choices; its quality is measured on real models
        assert agreement >= 0.9, agreement


def test_bad_settings_and_a_quantized_source_are_refused(qwen2, quantized, tmp_path, capsys):
    _, folder = quantized
    with pytest.raises(UserInputError, match="already quantized"):
        quantize_export(folder, tmp_path / "again")
    with pytest.raises(UserInputError, match="must differ"):
        quantize_export(qwen2.onnx_dir, qwen2.onnx_dir)
    code = main(["quantize", "--onnx-dir", str(qwen2.onnx_dir), "--output-dir", str(tmp_path / "x"),
                 "--block-size", "24", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--block-size 24" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_chat_takes_the_quantized_folder_unchanged(qwen2, quantized):
    """The piped chat answer on the quantized folder equals LLM.generate on it (one engine for both kinds)."""
    import subprocess
    import sys

    _, folder = quantized
    result = subprocess.run([sys.executable, "-m", "edgelora", "chat", "--onnx-dir", str(folder), "--temperature", "0",
                             "--max-tokens", "6", "--threads", "1"], input="Hello there", capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    expected = LLM(folder, num_threads=1).generate([[{"role": "user", "content": "Hello there"}]],
                                                   SamplingParams(max_tokens=6, temperature=0))[0].text
    assert result.stdout == expected + "\n"
