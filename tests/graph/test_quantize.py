"""edgelora quantize: MatMulNBits projections, insert-lora on top, the same processed adapters serve both bases."""

from __future__ import annotations

import numpy as np
import pytest

from edgelora.cli import main
from edgelora.entrypoints.api import LLM, LoraConfig, LoRARequest, SamplingParams
from edgelora.errors import UserInputError
from edgelora.formats.model_spec import ModelSpec
from edgelora.graph import insert_lora
from edgelora.graph.quantize import QuantizeOptions, quantize_export

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
    """An unknown mode, a folder that is not an export, an already quantized graph, a bad block size:
    each exits 2 with one line and writes nothing."""
    _, folder = quantized
    not_export = tmp_path / "not_export"
    not_export.mkdir()
    (not_export / "notes.txt").write_text("hello")
    half_export = tmp_path / "half_export"  # a model.onnx without the export's config.json
    half_export.mkdir()
    (half_export / "model.onnx").write_bytes((qwen2.onnx_dir / "model.onnx").read_bytes())
    cases = [(["--onnx-dir", str(qwen2.onnx_dir), "--mode", "int3"], "--mode"),
             (["--onnx-dir", str(not_export)], "no model.onnx"),
             (["--onnx-dir", str(half_export)], "config.json"),
             (["--onnx-dir", str(folder)], "already quantized"),
             (["--onnx-dir", str(qwen2.onnx_dir), "--block-size", "24"], "--block-size 24"),
             (["--onnx-dir", str(qwen2.onnx_dir), "--gguf-file", str(tmp_path / "nope.gguf")], "--gguf-file")]
    for index, (flags, message) in enumerate(cases):
        target = tmp_path / f"out{index}"
        code = main(["quantize", *flags, "--output-dir", str(target), "--quiet"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and message in err and len(err.splitlines()) == 1, (flags, err)
        assert not target.exists(), flags
    with pytest.raises(UserInputError, match="must differ"):
        quantize_export(qwen2.onnx_dir, qwen2.onnx_dir)


def _plain_greedy(folder, spec, prompt: list[int], processed, max_new: int) -> list[int]:
    """One row through a bare ONNX Runtime session of the quantized lora_model.onnx, its adapter fed
    directly as the LoRA inputs: no engine, no slot pool, no scheduler."""
    from graph_runner import empty_past, lora_feeds, past_from_outputs, session, token_feeds

    from edgelora.formats.lora_manifest import LoraManifest

    run = session(folder / "lora_model.onnx")
    manifest = LoraManifest.load(folder)
    past = empty_past(spec, 1, len(prompt) + max_new)
    tokens, ids, generated = np.array([prompt]), list(prompt), []
    eos = set(spec.eos_token_ids)
    while len(generated) < max_new:
        feeds = {**token_feeds(tokens, len(ids) - tokens.shape[1]), **past,
                 **lora_feeds(manifest, [processed], tokens.shape[1])}
        outputs = run.run(None, feeds)
        token = int(np.argmax(outputs[0][0, -1]))
        generated.append(token)
        if token in eos:
            break
        ids.append(token)
        past = past_from_outputs(spec, outputs)
        tokens = np.array([[token]])
    return generated


def test_infer_mixed_batch_equals_a_plain_run_of_the_quantized_graph(qwen2, quantized, tmp_path):
    """Greedy ids of a mixed batch through 'edgelora infer' on the quantized folder equal a plain ONNX Runtime
    run of the same lora_model.onnx, one row at a time: the runtime's binding is right on quantized graphs."""
    import json

    from transformers import AutoTokenizer

    _, folder = quantized
    requests = [("a1", "The sea is"), ("a2", "Hello there"), (None, "One two three"), ("a3", "Good morning to you")]
    max_new = 8
    payload = {"available_lora_weights": {name: str(path) for name, path in qwen2.processed.items()},
               "temperature": 0, "max_generate_length": max_new,
               "requests": [{"messages": [{"role": "user", "content": text}], **({"lora_name": name} if name else {})}
                            for name, text in requests]}
    (tmp_path / "input.json").write_text(json.dumps(payload))
    code = main(["infer", "--onnx-dir", str(folder), "--input-file", str(tmp_path / "input.json"),
                 "--output-file", str(tmp_path / "output.json"), "--threads", "1", "--quiet"])
    assert code == 0
    responses = json.loads((tmp_path / "output.json").read_text())["responses"]
    tokenizer = AutoTokenizer.from_pretrained(qwen2.model_dir)
    for (name, text), response in zip(requests, responses):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                               tokenize=True, return_dict=True)["input_ids"]
        assert response["prompt_tokens"] == len(prompt)
        want = _plain_greedy(folder, qwen2.spec, list(prompt), qwen2.processed[name] if name else None, max_new)
        assert response["output_ids"] == want, name or "base"


def test_serve_takes_the_quantized_folder_unchanged(qwen2, quantized):
    """The real server on the quantized folder: concurrent requests on different adapters (one mixed batch)
    answer what LLM.generate gives on that folder."""
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI
    from server_process import running_server

    _, folder = quantized
    modules = [f"{name}={path}" for name, path in qwen2.processed.items()]
    names = [None, *qwen2.processed]
    with running_server("--onnx-dir", str(folder), "--served-model-name", "base", "--lora-modules", *modules,
                        "--max-num-seqs", "4", "--threads", "1") as (url, _):
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)

        def ask(name):
            return client.completions.create(model=name or "base", prompt="The sea is", max_tokens=6, temperature=0,
                                             extra_body={"ignore_eos": True}).choices[0].text

        with ThreadPoolExecutor(len(names)) as pool:
            got = list(pool.map(ask, names))
    llm = LLM(folder, LoraConfig(max_loras=3, max_cpu_loras=3), num_threads=1)
    lora = [LoRARequest(name, index + 1, str(path)) if name else None
            for index, (name, path) in enumerate(zip(names, [None, *qwen2.processed.values()]))]
    want = llm.generate(["The sea is"] * len(names), SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), lora)
    assert got == [output.text for output in want]


def test_bench_takes_the_quantized_folder_unchanged(qwen2, quantized, tmp_path):
    import json

    _, folder = quantized
    out = tmp_path / "bench.json"
    code = main(["bench", "--onnx-dir", str(folder), "--adapters", *map(str, qwen2.processed.values()),
                 "--rows", "a1,a2,a3,-", "--prompt-len", "4", "--max-tokens", "3", "--repeats", "1", "--contexts", "8",
                 "--context-steps", "1", "--context-batch", "1", "--threads", "1", "--json", str(out), "--quiet"])
    assert code == 0
    (config,) = json.loads(out.read_text())["configs"]
    assert config["kind"] == "mixed" and config["decode_tokens_per_s"] > 0 and len(config["tokens"]) == 4


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
