"""merge-lora: the merged HF folder reproduces PEFT; bad input leaves nothing behind."""

from __future__ import annotations

import numpy as np
import pytest

from edgelora.adapters.merge import merge_lora
from edgelora.cli import main

TOLERANCE = 1e-4


@pytest.mark.parametrize("adapter", ["a2", "a3"])
def test_merged_logits_equal_peft(tmp_path, exported, reference, adapter):
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    merge_lora(exported.model_dir, exported.adapters[adapter], out)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = np.random.default_rng(5).integers(0, exported.spec.vocab_size, size=(2, 7), dtype=np.int64)
    with torch.no_grad():
        logits = merged(torch.as_tensor(ids)).logits.numpy()
    expected = reference.logits(exported.model_dir, exported.adapters[adapter], ids)
    assert np.abs(expected - reference.logits(exported.model_dir, None, ids)).max() > 1e-2
    np.testing.assert_allclose(logits, expected, atol=TOLERANCE, rtol=0)
    assert (out / "tokenizer.json").is_file()


def test_non_empty_output_folder_is_refused(tmp_path, exported, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code = main(["merge-lora", "--model_dir", str(exported.model_dir), "--lora_dir", str(exported.adapters["a1"]),
                 "--output_dir", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "not empty" in err and len(err.strip().splitlines()) == 1
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_adapter_for_another_model_is_refused(tmp_path, exported_samples, capsys):
    out = tmp_path / "merged"
    code = main(["merge-lora", "--model_dir", str(exported_samples["qwen2"].model_dir),
                 "--lora_dir", str(exported_samples["llama"].adapters["a2"]), "--output_dir", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "base model" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
