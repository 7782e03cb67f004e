"""Reading a Hugging Face model folder exactly as users have it, with clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from edgelora.errors import UnsupportedModelError, UserInputError
from edgelora.export.architectures import FAMILIES, supported_list

# Files a runtime needs besides the graph: tokenizer, chat template, generation defaults.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


def read_hf_config(model_dir: Path) -> dict:
    """Validate the folder and return its config.json as a dict."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UserInputError(f"--model_dir {model_dir}: no such folder")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise UserInputError(f"--model_dir {model_dir}: no config.json; expected a Hugging Face model folder")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserInputError(f"{config_path}: not valid JSON: {exc}") from exc
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"{model_dir}: model_type {model_type!r} is not supported; supported: {supported_list()}"
        )
    if config.get("quantization_config"):
        raise UnsupportedModelError(f"{model_dir}: quantized checkpoints are not supported; export the float model")
    if not any(any(model_dir.glob(pattern)) for pattern in WEIGHT_PATTERNS):
        raise UserInputError(f"--model_dir {model_dir}: no weights (*.safetensors or pytorch_model*.bin)")
    return config


def eos_token_ids(model_dir: Path, config: dict) -> list[int]:
    """All ids that end generation: generation_config.json's and config.json's, in that order."""
    ids: list[int] = []
    sources = [config.get("eos_token_id")]
    generation_path = Path(model_dir) / "generation_config.json"
    if generation_path.is_file():
        try:
            sources.insert(0, json.loads(generation_path.read_text()).get("eos_token_id"))
        except json.JSONDecodeError as exc:
            raise UserInputError(f"{generation_path}: not valid JSON: {exc}") from exc
    for value in sources:
        for token in value if isinstance(value, list) else [value]:
            if isinstance(token, int) and token not in ids:
                ids.append(token)
    return ids


def copy_tokenizer_files(model_dir: Path, output_dir: Path) -> list[str]:
    """Copy the tokenizer and chat template files that exist; return their names."""
    copied = []
    for name in TOKENIZER_FILES:
        source = Path(model_dir) / name
        if source.is_file():
            shutil.copy2(source, Path(output_dir) / name)
            copied.append(name)
    return copied
