"""merge-lora: fold one PEFT adapter into the base weights and write a plain HF model folder."""

from __future__ import annotations

import logging
from pathlib import Path

from edgelora.adapters.peft import read_peft_adapter
from edgelora.errors import AdapterError, UserInputError
from edgelora.export.hf_folder import copy_tokenizer_files, read_hf_config
from edgelora.formats import contract
from edgelora.formats.fileio import staged_output

log = logging.getLogger(__name__)


def merge_lora(model_dir: Path, lora_dir: Path, output_dir: Path, overwrite: bool = False) -> Path:
    """Write ``output_dir`` with ``W + scaling * B @ A`` in every adapted projection.

    Refuses a non-empty ``output_dir`` unless ``overwrite``; even then only the files it writes
    are replaced (nothing is deleted).
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir, lora_dir, output_dir = Path(model_dir), Path(lora_dir), Path(output_dir)
    config = read_hf_config(model_dir)
    adapter = read_peft_adapter(lora_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise UserInputError(f"--output_dir {output_dir} is not empty; pass --overwrite to replace its files")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    layers = model.model.layers
    for pair in adapter.pairs:
        if pair.layer >= len(layers):
            raise AdapterError(f"{lora_dir}: adapts layer {pair.layer} but the model has {len(layers)} layers")
        info = contract.MODULES_BY_SHORT[pair.module]
        linear = getattr(getattr(layers[pair.layer], info.block), info.hf_name)
        out_features, in_features = linear.weight.shape
        if (pair.lora_a.shape[1], pair.lora_b.shape[0]) != (in_features, out_features):
            raise AdapterError(f"{lora_dir}: {pair.module_path} is {pair.lora_a.shape[1]}x{pair.lora_b.shape[0]} "
                               f"but the base model's is {in_features}x{out_features}")
    merged = PeftModel.from_pretrained(model, str(lora_dir)).merge_and_unload()
    saved_dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    merged = merged.to(getattr(torch, saved_dtype, torch.float32))
    with staged_output(output_dir) as staging:
        merged.save_pretrained(staging)
        copy_tokenizer_files(model_dir, staging)
    log.info("merged %s into %s -> %s (%s)", lora_dir, model_dir, output_dir, saved_dtype)
    return output_dir
