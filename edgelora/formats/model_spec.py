"""ModelSpec: our description of an exported model (``config.json`` beside ``model.onnx``).

Written by export, read by insert-lora, process-lora and the runtime.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from edgelora.errors import UserInputError
from edgelora.formats.contract import MODEL_CONFIG, MODULE_NAMES

SPEC_FORMAT = "edgelora-model"
SPEC_VERSION = 1
DTYPES = ("float32", "float16")


@dataclass
class ModelSpec:
    """Shapes and ids the later stages need, without reading the graph or the HF config."""

    architecture: str
    family: str  # HF model_type; not named so, or AutoTokenizer would take this file for a HF config
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    dtype: str
    eos_token_ids: list[int]
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    # short module name -> [in_features, out_features]
    module_shapes: dict[str, list[int]] = field(default_factory=dict)
    tie_word_embeddings: bool = False
    source_model: str = ""
    quantization: str | None = None  # e.g. "int4, blocks of 32, symmetric" (edgelora quantize); None: float
    format: str = SPEC_FORMAT
    version: int = SPEC_VERSION

    def module_in_out(self, module: str) -> tuple[int, int]:
        in_features, out_features = self.module_shapes[module]
        return int(in_features), int(out_features)

    def save(self, directory: Path) -> Path:
        path = Path(directory) / MODEL_CONFIG
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: Path) -> ModelSpec:
        """Read ``config.json`` of an exported model folder, with one clear error if it is not one."""
        path = Path(directory) / MODEL_CONFIG
        if not path.is_file():
            raise UserInputError(f"{directory}: no {MODEL_CONFIG} here; is this a folder written by 'edgelora export'?")
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UserInputError(f"{path}: cannot read: {exc}") from exc
        if not isinstance(raw, dict) or raw.get("format") != SPEC_FORMAT:
            raise UserInputError(f"{path}: not an edgelora model config (run 'edgelora export' first)")
        known = {f.name for f in fields(cls)}
        try:
            spec = cls(**{k: v for k, v in raw.items() if k in known})
        except TypeError as exc:
            raise UserInputError(f"{path}: incomplete model config: {exc}") from exc
        missing = [m for m in MODULE_NAMES if m not in spec.module_shapes]
        if missing or spec.dtype not in DTYPES:
            raise UserInputError(f"{path}: malformed model config (module shapes {missing} / dtype {spec.dtype!r})")
        return spec
