"""process-lora: scaling folded into B, graph layout, fp16, and every bad input refused cleanly."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from edgelora.adapters import process_adapter
from edgelora.cli import main
from edgelora.formats import contract


def _peft_tensors(adapter_dir: Path) -> dict[str, np.ndarray]:
    return load_file(str(adapter_dir / contract.PEFT_WEIGHTS))


def _peft_name(layer: int, module: str, half: str) -> str:
    info = contract.MODULES_BY_SHORT[module]
    return f"base_model.model.model.layers.{layer}.{info.block}.{info.hf_name}.lora_{half}.weight"


def _copy_adapter(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def _run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = main([*args, "--quiet"])
    return code, capsys.readouterr().err


def _assert_refused(args, capsys, output_dir: Path, fragment: str) -> None:
    code, err = _run_cli(args, capsys)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert fragment in err, err
    assert not output_dir.exists() or not any(output_dir.iterdir())


@pytest.mark.parametrize("adapter,expected_scale", [("a1", 16 / 8), ("a2", 8 / 16), ("a3", 4 / math.sqrt(4))])
def test_scaling_is_folded_into_b(exported, adapter, expected_scale):
    processed = load_file(str(exported.processed[adapter] / contract.PROCESSED_ADAPTER))
    peft = _peft_tensors(exported.adapters[adapter])
    config = json.loads((exported.processed[adapter] / contract.PROCESSED_CONFIG).read_text())
    module = config["target_modules"][0]
    a = processed[contract.lora_a_name(0, module)]
    b = processed[contract.lora_b_name(0, module)]
    np.testing.assert_allclose(a, peft[_peft_name(0, module, "A")].T, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(b, peft[_peft_name(0, module, "B")].T * expected_scale, rtol=1e-3, atol=1e-6)


def test_processed_tensors_are_float16_in_graph_layout(exported):
    processed = load_file(str(exported.processed["a2"] / contract.PROCESSED_ADAPTER))
    config = json.loads((exported.processed["a2"] / contract.PROCESSED_CONFIG).read_text())
    in_features, out_features = exported.spec.module_in_out("gate")
    assert processed[contract.lora_a_name(1, "gate")].shape == (in_features, 16)
    assert processed[contract.lora_b_name(1, "gate")].shape == (16, out_features)
    assert {t.dtype for t in processed.values()} == {np.dtype(np.float16)}
    assert config["rank"] == 16 and config["target_modules"] == list(contract.MODULE_NAMES)


def test_float32_storage_on_request(tmp_path, exported):
    config = process_adapter(exported.adapters["a1"], tmp_path / "fp32", dtype="float32")
    processed = load_file(str(tmp_path / "fp32" / contract.PROCESSED_ADAPTER))
    assert config.dtype == "float32" and {t.dtype for t in processed.values()} == {np.dtype(np.float32)}


def test_norm_and_lm_head_tensors_are_dropped_with_a_warning(tmp_path, exported, caplog):
    adapter = _copy_adapter(exported.adapters["a1"], tmp_path / "extra")
    tensors = _peft_tensors(adapter)
    tensors["base_model.model.lm_head.weight"] = np.ones((4, 4), np.float32)
    tensors["base_model.model.model.norm.weight"] = np.ones(4, np.float32)
    save_file(tensors, str(adapter / contract.PEFT_WEIGHTS))
    with caplog.at_level(logging.WARNING):
        config = process_adapter(adapter, tmp_path / "out")
    assert "base_model.model.lm_head.weight" in caplog.text and "base_model.model.model.norm.weight" in caplog.text
    assert len(config.dropped_tensors) == 2
    assert not any("lm_head" in name for name in load_file(str(tmp_path / "out" / contract.PROCESSED_ADAPTER)))


def test_missing_input_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    _assert_refused(["process-lora", "--input_dir", str(tmp_path / "nope"), "--output_dir", str(out)], capsys, out,
                    "no such folder")


def test_empty_input_folder_is_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    _assert_refused(["process-lora", "--input_dir", str(tmp_path / "empty"), "--output_dir", str(out)], capsys, out,
                    "no adapter_config.json")


def test_truncated_safetensors_is_refused(tmp_path, exported, capsys):
    adapter = _copy_adapter(exported.adapters["a2"], tmp_path / "truncated")
    data = (adapter / contract.PEFT_WEIGHTS).read_bytes()
    (adapter / contract.PEFT_WEIGHTS).write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    _assert_refused(["process-lora", "--input_dir", str(adapter), "--output_dir", str(out)], capsys, out,
                    "corrupt or truncated")


def test_corrupt_safetensors_header_is_refused(tmp_path, exported, capsys):
    adapter = _copy_adapter(exported.adapters["a1"], tmp_path / "corrupt")
    data = bytearray((adapter / contract.PEFT_WEIGHTS).read_bytes())
    data[8:24] = b"\x00garbage-garbage"
    (adapter / contract.PEFT_WEIGHTS).write_bytes(bytes(data))
    out = tmp_path / "out"
    _assert_refused(["process-lora", "--input_dir", str(adapter), "--output_dir", str(out)], capsys, out,
                    "corrupt or truncated")


def test_adapter_for_another_base_model_is_refused(tmp_path, exported_samples, capsys):
    llama_adapter = exported_samples["llama"].adapters["a2"]
    out = tmp_path / "out"
    _assert_refused(["process-lora", "--input_dir", str(llama_adapter), "--output_dir", str(out),
                     "--onnx_dir", str(exported_samples["qwen2"].onnx_dir)], capsys, out, "made for another model")


def test_rank_above_64_is_refused(tmp_path, exported, capsys):
    adapter = _copy_adapter(exported.adapters["a1"], tmp_path / "r72")
    config = json.loads((adapter / contract.PEFT_CONFIG).read_text())
    config["r"] = 72
    (adapter / contract.PEFT_CONFIG).write_text(json.dumps(config))
    in_features, out_features = exported.spec.module_in_out("q")
    save_file({_peft_name(0, "q", "A"): np.ones((72, in_features), np.float32),
               _peft_name(0, "q", "B"): np.ones((out_features, 72), np.float32)}, str(adapter / contract.PEFT_WEIGHTS))
    out = tmp_path / "out"
    _assert_refused(["process-lora", "--input_dir", str(adapter), "--output_dir", str(out)], capsys, out,
                    "rank 72 is above the maximum 64")


@pytest.mark.parametrize("field,value,fragment", [
    ("use_dora", True, "DoRA"),
    ("bias", "all", "bias training"),
    ("bias", "lora_only", "bias training"),
])
def test_unsupported_peft_features_are_refused(tmp_path, exported, capsys, field, value, fragment):
    adapter = _copy_adapter(exported.adapters["a1"], tmp_path / "feature")
    config = json.loads((adapter / contract.PEFT_CONFIG).read_text())
    config[field] = value
    (adapter / contract.PEFT_CONFIG).write_text(json.dumps(config))
    out = tmp_path / "out"
    _assert_refused(["process-lora", "--input_dir", str(adapter), "--output_dir", str(out)], capsys, out, fragment)


def test_module_missing_from_lora_graph_is_refused(tmp_path, exported, capsys):
    onnx_dir = tmp_path / "qv_only"
    shutil.copytree(exported.onnx_dir, onnx_dir, ignore=shutil.ignore_patterns("lora_*"))
    assert main(["insert-lora", "--onnx_dir", str(onnx_dir), "--target_modules", "q", "v", "--quiet"]) == 0
    out = tmp_path / "out"
    _assert_refused(["process-lora", "--input_dir", str(exported.adapters["a2"]), "--output_dir", str(out),
                     "--onnx_dir", str(onnx_dir)], capsys, out, "has LoRA only on q, v")


def test_processing_succeeds_through_the_cli(tmp_path, exported, capsys):
    out = tmp_path / "ok"
    code, err = _run_cli(["process-lora", "--input_dir", str(exported.adapters["a3"]), "--output_dir", str(out),
                          "--onnx_dir", str(exported.onnx_dir)], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted([contract.PROCESSED_ADAPTER, contract.PROCESSED_CONFIG])


def test_bfloat16_peft_adapter_is_read(qwen2_sample, tmp_path):
    """PEFT adapters trained in bf16 (read through ml_dtypes) give the bf16 values, transposed and scaled."""
    import ml_dtypes

    adapter = _copy_adapter(qwen2_sample.adapters["a1"], tmp_path / "bf16")
    tensors = {name: value.astype(ml_dtypes.bfloat16) for name, value in _peft_tensors(adapter).items()}
    save_file(tensors, str(adapter / contract.PEFT_WEIGHTS))
    config = process_adapter(adapter, tmp_path / "out", dtype="float32")
    processed = load_file(str(tmp_path / "out" / contract.PROCESSED_ADAPTER))
    lora_a = tensors[_peft_name(0, "q", "A")].astype(np.float32)
    np.testing.assert_array_equal(processed[contract.lora_a_name(0, "q")], lora_a.T)
    assert config.rank == lora_a.shape[0]
