"""The local samples look like what users have: standard HF and PEFT folders with real templates."""

from __future__ import annotations

import json

import pytest
from safetensors.numpy import load_file


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_tokenizer_applies_its_chat_template(family, request):
    from transformers import AutoTokenizer

    sample = request.getfixturevalue(f"{family}_sample")
    tokenizer = AutoTokenizer.from_pretrained(sample.model_dir)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True,
                                         tokenize=False)
    assert "hello" in text and "assistant" in text
    assert tokenizer.decode(tokenizer.encode("The quick brown fox")) == "The quick brown fox"


def test_llama_keeps_its_template_in_a_jinja_file(llama_sample, qwen2_sample):
    assert (llama_sample.model_dir / "chat_template.jinja").is_file()
    assert "chat_template" in json.loads((qwen2_sample.model_dir / "tokenizer_config.json").read_text())


def test_adapters_have_nonzero_lora_b(qwen2_sample):
    for path in qwen2_sample.adapters.values():
        tensors = load_file(path / "adapter_model.safetensors")
        b_tensors = [t for name, t in tensors.items() if "lora_B" in name]
        assert b_tensors and all(abs(t).max() > 0 for t in b_tensors)


def test_adapters_differ_in_rank_and_targets(qwen2_sample):
    configs = {name: json.loads((p / "adapter_config.json").read_text()) for name, p in qwen2_sample.adapters.items()}
    assert len({c["r"] for c in configs.values()}) == 3
    assert len({tuple(sorted(c["target_modules"])) for c in configs.values()}) == 3
    assert any(c["use_rslora"] for c in configs.values())


def test_vocab_option_widens_the_model_vocabulary(tmp_path):
    from make_sample import main as make_sample_main

    assert make_sample_main(["--output-dir", str(tmp_path / "wide"), "--vocab", "1000", "--no-adapters"]) == 0
    config = json.loads((tmp_path / "wide" / "model" / "config.json").read_text())
    tokens = json.loads((tmp_path / "wide" / "model" / "tokenizer.json").read_text())["model"]["vocab"]
    assert config["vocab_size"] == 1000 and len(tokens) < 1000


def test_train_adapters_saves_a_float16_peft_folder_that_peft_loads(qwen2_sample, tmp_path):
    """samples/train_adapters.py's training step, two steps on the tiny model (the demo's run takes minutes)."""
    from dataclasses import replace

    import train_adapters
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    habit = replace(train_adapters.HABITS[2], steps=2)
    out = tmp_path / "signoff"
    loss = train_adapters.train(qwen2_sample.model_dir, habit, train_adapters.TRAIN_QUESTIONS[:4],
                                ["A.", "B.", "C.", "D."], out)
    assert loss == loss  # a number, not NaN
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_rslora"] and config["r"] == habit.rank
    assert config["base_model_name_or_path"] == train_adapters.BASE_MODEL_NAME
    tensors = load_file(out / "adapter_model.safetensors")
    assert {str(t.dtype) for t in tensors.values()} == {"float16"}
    assert any(abs(t).max() > 0 for name, t in tensors.items() if "lora_B" in name), "training moved lora_B"
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(qwen2_sample.model_dir), str(out))


def test_shows_habit_rules():
    from train_adapters import shows_habit

    assert shows_habit("shout", "THE CAPITAL IS ROME.") and not shows_habit("shout", "The capital is Rome.")
    assert shows_habit("pirate", "Ahoy, matey! Rome.") and not shows_habit("pirate", "Rome. Ahoy, matey!")
    assert shows_habit("signoff", "Rome. Over and out.") and not shows_habit("signoff", "Over and out. Rome.")
