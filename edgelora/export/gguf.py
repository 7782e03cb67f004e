"""GGUF in: a llama.cpp file turned into a plain float Hugging Face folder, then exported as usual.

transformers reads GGUF itself (dequantizing with the ``gguf`` package) but refuses
``save_pretrained`` on a model loaded that way, so the dequantized state dict is copied into a
fresh model of the same config and saved; the tokenizer and chat template come from the file.
The float folder is what the rest of the pipeline, and the PEFT reference, read.
"""

from __future__ import annotations

import logging
from pathlib import Path

from edgelora.errors import UnsupportedModelError, UserInputError
from edgelora.export.architectures import FAMILIES, supported_list
from edgelora.formats.fileio import staged_output

log = logging.getLogger(__name__)

# general.architecture of a GGUF -> transformers model_type (Mistral GGUFs say "llama").
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "mistral": "mistral"}


def find_gguf(model_dir: Path, gguf_file: str | None = None) -> Path | None:
    """The GGUF file ``--model-dir`` names (a .gguf file, or a folder holding one); None for an HF folder."""
    model_dir = Path(model_dir)
    if gguf_file is not None:
        path = model_dir / gguf_file if model_dir.is_dir() else Path(gguf_file)
        if not path.is_file():
            raise UserInputError(f"--gguf-file {gguf_file}: no such file in {model_dir}")
        return path
    if model_dir.is_file():
        if model_dir.suffix != ".gguf":
            raise UserInputError(f"--model-dir {model_dir}: expected a folder or a .gguf file")
        return model_dir
    if not model_dir.is_dir() or (model_dir / "config.json").is_file():
        return None
    found = sorted(model_dir.glob("*.gguf"))
    if len(found) > 1:
        raise UserInputError(f"--model-dir {model_dir}: {len(found)} .gguf files; pick one with --gguf-file NAME")
    return found[0] if found else None


def gguf_architecture(path: Path) -> str:
    """``general.architecture`` of a GGUF file (read from its header, no tensors loaded)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except (KeyError, ValueError, OSError, IndexError) as exc:
        raise UserInputError(f"{path}: not a readable GGUF file ({exc})") from exc


def convert_gguf(path: Path, output_dir: Path) -> Path:
    """Write a float Hugging Face folder (config, safetensors, tokenizer, chat template) of a GGUF's weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    architecture = gguf_architecture(path)
    model_type = GGUF_ARCHITECTURES.get(architecture)
    if model_type not in FAMILIES:
        raise UnsupportedModelError(f"{path}: GGUF architecture {architecture!r} is not supported; "
                                    f"supported: {supported_list()}")
    log.info("reading %s (%s), dequantizing", path.name, architecture)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise UserInputError(f"{path}: transformers cannot load this GGUF: {str(exc).splitlines()[0]}") from exc
    config = loaded.config
    for attribute in ("quantization_config", "gguf_file"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    with staged_output(Path(output_dir)) as staging:
        fresh.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    log.info("float Hugging Face folder of %s -> %s", path.name, output_dir)
    return Path(output_dir)
