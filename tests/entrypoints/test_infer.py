"""edgelora infer and the Python API: mixed-adapter batches equal transformers + PEFT greedy generate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edgelora import LLM, LoraConfig, LoRARequest, SamplingParams
from edgelora.cli import main

MAX_NEW = 10
# Prompts of different lengths; adapters of different ranks/targets and base rows in one batch.
REQUESTS = [
    ("a1", "Write a short poem about the sea."),
    ("a2", "What is the capital of France?"),
    (None, "Hello"),
    ("a3", "Translate to German: good morning, how are you today? Answer briefly and politely."),
    ("a2", "def add(a, b):"),
    ("", "Customers ask about invoices."),
]


def _messages(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _input_file(folder: Path, exported, requests=REQUESTS, **top_level) -> Path:
    payload = {
        "available_lora_weights": {name: str(path) for name, path in exported.processed.items()},
        "temperature": 0,
        "max_generate_length": MAX_NEW,
        **top_level,
        "requests": [{"messages": _messages(text), **({"lora_name": name} if name is not None else {})}
                     for name, text in requests],
    }
    path = folder / "input.json"
    path.write_text(json.dumps(payload))
    return path


def _reference_ids(exported, reference, adapter: str | None, text: str) -> tuple[list[int], list[int]]:
    """Prompt ids from transformers' chat template and PEFT's greedy continuation (cut after eos)."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(exported.model_dir)
    prompt = tokenizer.apply_chat_template(_messages(text), add_generation_prompt=True, tokenize=True,
                                           return_dict=True)["input_ids"]
    model = reference.model(exported.model_dir, exported.adapters[adapter] if adapter else None)
    with torch.no_grad():
        generated = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                   max_new_tokens=MAX_NEW, do_sample=False)[0, len(prompt):].tolist()
    eos = set(exported.spec.eos_token_ids)
    for position, token in enumerate(generated):
        if token in eos:
            return list(prompt), generated[: position + 1]
    return list(prompt), generated


@pytest.fixture(scope="module")
def infer_output(exported, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"infer_{exported.family}")
    output = folder / "output.json"
    code = main(["infer", "--onnx-dir", str(exported.onnx_dir), "--input-file", str(_input_file(folder, exported)),
                 "--output-file", str(output), "--quiet"])
    assert code == 0
    return json.loads(output.read_text())


def test_mixed_batch_greedy_ids_equal_peft_generate(exported, reference, infer_output):
    assert len(infer_output["responses"]) == len(REQUESTS)
    for index, ((name, text), response) in enumerate(zip(REQUESTS, infer_output["responses"])):
        prompt, expected = _reference_ids(exported, reference, name or None, text)
        assert response["prompt_tokens"] == len(prompt), f"request {index}"
        assert response["output_ids"] == expected, f"request {index} ({name or 'base'})"


def test_response_fields(exported, infer_output):
    for (name, _), response in zip(REQUESTS, infer_output["responses"]):
        assert response["lora_name"] == (name or None)
        assert response["finish_reason"] in ("stop", "length")
        assert response["completion_tokens"] == len(response["output_ids"])
        eos = set(exported.spec.eos_token_ids)
        ended_on_eos = response["output_ids"][-1] in eos
        assert response["finish_reason"] == ("stop" if ended_on_eos else "length")
        assert isinstance(response["output_text"], str)
    stats = infer_output["stats"]
    assert stats["requests"] == len(REQUESTS) and stats["prefill_steps"] == 1 and stats["tokens_per_s"] > 0


def test_small_batches_give_the_same_ids(exported, infer_output, tmp_path):
    output = tmp_path / "out.json"
    assert main(["infer", "--onnx-dir", str(exported.onnx_dir), "--input-file", str(_input_file(tmp_path, exported)),
                 "--output-file", str(output), "--max-batch-size", "2", "--quiet"]) == 0
    written = json.loads(output.read_text())
    assert written["stats"]["prefill_steps"] >= 3, "two rows at a time: at least three prefills"
    assert [r["output_ids"] for r in written["responses"]] == [r["output_ids"] for r in infer_output["responses"]]


def _api_generate(exported, kv_cache_initial_len: int | None = None):
    """REQUESTS through the Python API, greedy, one LoRARequest (or None) per prompt."""
    llm = LLM(exported.onnx_dir, lora_config=LoraConfig(max_lora_rank=64, max_loras=3, max_cpu_loras=4))
    if kv_cache_initial_len is not None:
        llm.scheduler.config.kv_cache_initial_len = kv_cache_initial_len
    ids = {"a1": 1, "a2": 2, "a3": 3}
    requests = [LoRARequest(name, ids[name], str(exported.processed[name])) if name else None for name, _ in REQUESTS]
    return llm.generate([_messages(text) for _, text in REQUESTS], SamplingParams(max_tokens=MAX_NEW, temperature=0),
                        lora_request=requests)


def test_python_api_equals_peft_generate(exported, reference):
    outputs = _api_generate(exported)
    for (name, text), output in zip(REQUESTS, outputs):
        prompt, expected = _reference_ids(exported, reference, name or None, text)
        assert output.prompt_token_ids == prompt
        assert output.token_ids == expected


def test_growing_kv_cache_gives_the_same_ids(exported, infer_output, monkeypatch):
    """A host cache that starts one position past the prompt and doubles gives the same greedy ids."""
    from edgelora.runtime import kv_cache

    grown = []
    reserve = kv_cache.KVCache.reserve

    def spy(cache, positions):
        before = cache.length
        changed = reserve(cache, positions)
        if cache.length != before:
            grown.append((before, cache.length))
        return changed

    monkeypatch.setattr(kv_cache.KVCache, "reserve", spy)
    outputs = _api_generate(exported, kv_cache_initial_len=1)
    assert grown and all(after > before for before, after in grown), "the cache grew during decode"
    assert [output.token_ids for output in outputs] == [r["output_ids"] for r in infer_output["responses"]]


def test_kv_cache_reserve_doubles_and_keeps_contents(exported):
    from edgelora.runtime.kv_cache import KVCache
    from edgelora.runtime.session import Device

    cache = KVCache(exported.spec, 2, max_len=20, device=Device("cpu"), initial_len=5)
    assert cache.length == 5
    for index, buffer in enumerate(cache._host):
        buffer[...] = index + 1
    generation = cache.generation
    assert not cache.reserve(5) and cache.generation == generation, "room enough: nothing moves"
    assert cache.reserve(7)
    assert cache.length == 10 and cache.generation > generation
    for index, buffer in enumerate(cache._host):
        assert buffer.shape[2] == 10
        assert (buffer[:, :, :5] == index + 1).all() and (buffer[:, :, 5:] == 0).all()
    cache.reserve(19)
    assert cache.length == 20, "never past max_len"
    with pytest.raises(ValueError):
        cache.reserve(21)


def _ids_of(exported, tmp_path, name: str, **top_level) -> list[list[int]]:
    output = tmp_path / f"{name}.json"
    path = _input_file(tmp_path, exported, **top_level)
    assert main(["infer", "--onnx-dir", str(exported.onnx_dir), "--input-file", str(path),
                 "--output-file", str(output), "--quiet"]) == 0
    return [r["output_ids"] for r in json.loads(output.read_text())["responses"]]


def test_seeded_sampling_is_reproducible_and_really_samples(exported, infer_output, tmp_path):
    sampled = dict(temperature=1.5, top_k=0, top_p=1.0, max_generate_length=MAX_NEW)
    first = _ids_of(exported, tmp_path, "first", seed=1234, **sampled)
    again = _ids_of(exported, tmp_path, "again", seed=1234, **sampled)
    other = _ids_of(exported, tmp_path, "other", seed=99, **sampled)
    greedy = [r["output_ids"] for r in infer_output["responses"]]
    assert first == again, "the same seed gives the same tokens"
    assert first != greedy, "sampling at temperature 1.5 is not greedy"
    assert first != other, "another seed gives other tokens"


def test_per_request_sampling_fields_win(exported, infer_output, tmp_path):
    """Top level samples hot with a seed; request 1 overrides temperature (greedy) and length."""
    requests = [REQUESTS[0], REQUESTS[0]]
    payload = json.loads(_input_file(tmp_path, exported, requests=requests, temperature=1.5, top_k=0,
                                     seed=7).read_text())
    payload["requests"][1]["max_generate_length"] = 3
    payload["requests"][1]["temperature"] = 0
    path = tmp_path / "per_request.json"
    path.write_text(json.dumps(payload))
    output = tmp_path / "out.json"
    assert main(["infer", "--onnx-dir", str(exported.onnx_dir), "--input-file", str(path), "--output-file", str(output),
                 "--quiet"]) == 0
    first, second = json.loads(output.read_text())["responses"]
    greedy = infer_output["responses"][0]["output_ids"]
    assert second["output_ids"] == greedy[:3], "request 1 is greedy and 3 tokens long, as it asked"
    assert first["output_ids"][: len(greedy)] != greedy, "request 0 kept the top level's hot sampling"


# -- bad input: one line, exit code 2, no output file ------------------------------------------


def _refused(exported, tmp_path, capsys, input_path: Path, fragment: str, *extra: str) -> None:
    output = tmp_path / "out.json"
    code = main(["infer", "--onnx-dir", str(exported.onnx_dir), "--input-file", str(input_path),
                 "--output-file", str(output), "--quiet", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert fragment in err and len(err.splitlines()) == 1, err
    assert not output.exists() and not list(tmp_path.glob("out.json*"))


def test_unknown_lora_name_is_refused(exported, tmp_path, capsys):
    path = _input_file(tmp_path, exported, requests=[("a1", "hi"), ("nope", "hi")])
    _refused(exported, tmp_path, capsys, path, "requests[1]")


def test_missing_adapter_files_are_refused(exported, tmp_path, capsys):
    path = _input_file(tmp_path, exported)
    payload = json.loads(path.read_text())
    payload["available_lora_weights"]["a2"] = str(tmp_path / "missing" / "processed_adapter_model.safetensors")
    path.write_text(json.dumps(payload))
    _refused(exported, tmp_path, capsys, path, "requests[1]")


def test_rank_above_max_lora_rank_is_refused(exported, tmp_path, capsys):
    _refused(exported, tmp_path, capsys, _input_file(tmp_path, exported), "rank 8", "--max-lora-rank", "4")


def test_over_long_request_is_refused_before_any_batch_runs(exported, tmp_path, capsys, monkeypatch):
    """Prompt + max tokens beyond the model's positions: refused up front, naming the request."""
    from edgelora.runtime.engine import Engine

    calls = []
    run_step = Engine.run_step

    def spy(engine, binding, *arrays):
        calls.append(arrays[0].shape)
        return run_step(engine, binding, *arrays)

    monkeypatch.setattr(Engine, "run_step", spy)
    path = _input_file(tmp_path, exported)
    payload = json.loads(path.read_text())
    payload["requests"][4]["max_generate_length"] = exported.spec.max_position_embeddings
    path.write_text(json.dumps(payload))
    _refused(exported, tmp_path, capsys, path, "requests[4]", "--max-batch-size", "1")
    assert calls == [], "no model step ran before the check"


@pytest.mark.parametrize("case", ["folder", "missing_parent", "parent_is_a_file"])
def test_unusable_output_file_is_refused_before_loading(exported, tmp_path, capsys, monkeypatch, case):
    import edgelora.entrypoints.infer_file

    monkeypatch.setattr(edgelora.entrypoints.infer_file, "LLM", lambda *a, **k: pytest.fail("the model was loaded"))
    target = {"folder": tmp_path, "missing_parent": tmp_path / "nope" / "out.json",
              "parent_is_a_file": tmp_path / "input.json" / "out.json"}[case]
    path = _input_file(tmp_path, exported)
    code = main(["infer", "--onnx-dir", str(exported.onnx_dir), "--input-file", str(path),
                 "--output-file", str(target), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--output-file" in err and len(err.splitlines()) == 1, err


def test_cuda_without_a_cuda_build_is_one_line(exported, tmp_path, capsys, monkeypatch):
    """onnxruntime offers CUDA but our runtime was built without it: a user error, not a C++ ValueError."""
    import onnxruntime as ort

    from edgelora.runtime import native

    if native.with_cuda():
        pytest.skip("the runtime has CUDA")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    _refused(exported, tmp_path, capsys, _input_file(tmp_path, exported), "built without CUDA", "--device", "cuda")


def test_adapter_for_another_base_model_is_refused(exported_samples, tmp_path, capsys):
    qwen2, llama = exported_samples["qwen2"], exported_samples["llama"]
    path = _input_file(tmp_path, qwen2, requests=[("other", "hi")])
    payload = json.loads(path.read_text())
    payload["available_lora_weights"]["other"] = str(llama.processed["a2"])
    path.write_text(json.dumps(payload))
    _refused(qwen2, tmp_path, capsys, path, "another model")


def test_malformed_json_is_refused(exported, tmp_path, capsys):
    path = tmp_path / "input.json"
    path.write_text('{"requests": [')
    _refused(exported, tmp_path, capsys, path, "malformed JSON")


def test_empty_messages_are_refused(exported, tmp_path, capsys):
    path = _input_file(tmp_path, exported)
    payload = json.loads(path.read_text())
    payload["requests"][2]["messages"] = []
    path.write_text(json.dumps(payload))
    _refused(exported, tmp_path, capsys, path, "requests[2]")


def test_corrupt_adapter_file_is_refused_before_work(exported, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(exported.processed["a1"], broken)
    weights = broken / "processed_adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    path = _input_file(tmp_path, exported, requests=[("a1", "hi")])
    payload = json.loads(path.read_text())
    payload["available_lora_weights"]["a1"] = str(broken)
    path.write_text(json.dumps(payload))
    _refused(exported, tmp_path, capsys, path, "requests[0]")


@pytest.mark.parametrize("where, field, value", [
    ("top", "logit_bias", {"5": -100}), ("top", "apply_chat_template", False), ("request", "presence_penalty", 0.5),
    ("request", "tools", [{"type": "function", "function": {"name": "f"}}]), ("request", "temprature", 0),
])
def test_unknown_or_unsupported_fields_are_refused_by_name(exported, tmp_path, capsys, where, field, value):
    path = _input_file(tmp_path, exported)
    payload = json.loads(path.read_text())
    (payload if where == "top" else payload["requests"][1])[field] = value
    path.write_text(json.dumps(payload))
    _refused(exported, tmp_path, capsys, path, field)


def test_edge_llm_fields_at_their_defaults_are_accepted(exported, tmp_path):
    path = _input_file(tmp_path, exported, requests=[("a1", "hi")])
    payload = json.loads(path.read_text())
    payload.update(batch_size=4, apply_chat_template=True, add_generation_prompt=True, max_generate_length=2)
    path.write_text(json.dumps(payload))
    assert main(["infer", "--onnx-dir", str(exported.onnx_dir), "--input-file", str(path),
                 "--output-file", str(tmp_path / "out.json"), "--quiet"]) == 0


def test_bad_sampling_value_is_refused(exported, tmp_path, capsys):
    _refused(exported, tmp_path, capsys, _input_file(tmp_path, exported, top_p=1.5), "top_p")


@pytest.mark.cuda
def test_cuda_device_matches_cpu(exported, infer_output, tmp_path):
    output = tmp_path / "out.json"
    assert main(["infer", "--onnx-dir", str(exported.onnx_dir), "--input-file", str(_input_file(tmp_path, exported)),
                 "--output-file", str(output), "--device", "cuda", "--quiet"]) == 0
    written = json.loads(output.read_text())
    assert [r["output_ids"] for r in written["responses"]] == [r["output_ids"] for r in infer_output["responses"]]


def test_request_rows_may_constrain_their_answer(exported, tmp_path):
    """infer's rows take the server's structured-output fields; the Python API takes a GrammarSpec."""
    from edgelora.entrypoints.api import LLM, SamplingParams
    from edgelora.runtime.grammar import GrammarSpec

    path = _input_file(tmp_path, exported, requests=[("a1", "hi"), (None, "hello"), ("a2", "bye")],
                       max_generate_length=40)
    payload = json.loads(path.read_text())
    payload["requests"][0]["structured_outputs"] = {"choice": ["left", "right"]}
    payload["requests"][2]["response_format"] = {"type": "json_schema", "json_schema": {"schema": {
        "type": "object", "required": ["n"], "additionalProperties": False,
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}}}}
    path.write_text(json.dumps(payload))
    output = tmp_path / "out.json"
    assert main(["infer", "--onnx-dir", str(exported.onnx_dir), "--input-file", str(path), "--output-file",
                 str(output), "--quiet"]) == 0
    responses = json.loads(output.read_text())["responses"]
    assert responses[0]["output_text"] in ("left", "right")
    assert set(json.loads(responses[2]["output_text"])) == {"n"}
    llm = LLM(exported.onnx_dir, num_threads=1)
    answer = llm.generate("hi", SamplingParams(max_tokens=12, temperature=0, grammar=GrammarSpec.regex("[a-c]{4}")))
    assert len(answer[0].text) == 4 and set(answer[0].text) <= set("abc")
