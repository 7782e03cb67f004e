"""The manifest insert-lora writes beside lora_model.onnx: which LoRA inputs exist and their sizes.

process-lora validates adapters against it and the runtime binds its slot buffers from it, so
neither re-derives the graph's LoRA inputs on its own.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgelora.errors import UserInputError
from edgelora.formats import contract

MANIFEST_FORMAT = "edgelora-lora-manifest"
MANIFEST_VERSION = 5  # 2: stacked A/B blocks + lora_rank; 3: + source, logits_positions; 5: per-entry tokens, weights, back


@dataclass(frozen=True)
class LoraSite:
    """One projection of one layer that carries a LoRA branch."""

    layer: int
    module: str
    a_name: str
    b_name: str
    in_features: int
    out_features: int


@dataclass
class LoraManifest:
    target_modules: list[str]
    num_layers: int
    dtype: str
    sites: list[LoraSite] = field(default_factory=list)
    tokens_input: str = contract.LORA_TOKENS
    weights_input: str = contract.LORA_WEIGHTS
    back_input: str = contract.LORA_BACK
    logits_positions_input: str = contract.LOGITS_POSITIONS
    # export_fingerprint() of the folder when insert-lora ran: what lora_model.onnx was built from
    source_fingerprint: str = ""
    format: str = MANIFEST_FORMAT
    version: int = MANIFEST_VERSION

    def save(self, directory: Path) -> Path:
        path = Path(directory) / contract.LORA_MANIFEST
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: Path) -> LoraManifest:
        path = Path(directory) / contract.LORA_MANIFEST
        if not path.is_file():
            raise UserInputError(f"{directory}: no {contract.LORA_MANIFEST}; run 'edgelora insert-lora --onnx-dir {directory}' first")
        try:
            raw = json.loads(path.read_text())
            if raw.get("format") != MANIFEST_FORMAT:
                raise ValueError("not an edgelora LoRA manifest")
            if raw.get("version") != MANIFEST_VERSION:
                raise UserInputError(f"{path}: written by another edgelora version (LoRA input layout "
                                     f"{raw.get('version')}, this one reads {MANIFEST_VERSION}); "
                                     f"re-run 'edgelora insert-lora --onnx-dir {directory}'")
            sites = [LoraSite(**site) for site in raw.pop("sites")]
            raw.pop("format")
            return cls(sites=sites, **raw)
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            raise UserInputError(f"{path}: malformed LoRA manifest: {exc}") from exc

    def check_built_from(self, directory: Path) -> None:
        """Refuse a lora_model.onnx + manifest built from an earlier export of this folder."""
        from edgelora.formats.fingerprint import export_fingerprint

        if self.source_fingerprint != export_fingerprint(directory):
            raise UserInputError(
                f"{directory}: {contract.LORA_MODEL_ONNX} was built from an earlier export (model.onnx, "
                f"model.onnx.data or config.json changed since insert-lora); "
                f"re-run 'edgelora insert-lora --onnx-dir {directory}'")

    def sites_by_name(self) -> dict[str, LoraSite]:
        """Every tensor name (A and B) a processed adapter may hold, mapped to its site."""
        table = {}
        for site in self.sites:
            table[site.a_name] = site
            table[site.b_name] = site
        return table
