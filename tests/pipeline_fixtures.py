"""Session fixtures for the toolchain: each tiny sample exported, LoRA-inserted and its adapters processed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from edgelora.adapters import process_adapter
from edgelora.export import ExportOptions, export_model
from edgelora.formats.lora_manifest import LoraManifest
from edgelora.formats.model_spec import ModelSpec
from edgelora.graph import insert_lora

FAMILIES = ("qwen2", "llama")


@dataclass
class ExportedSample:
    family: str
    model_dir: Path
    adapters: dict[str, Path]  # PEFT folders
    onnx_dir: Path
    processed: dict[str, Path]  # processed adapter folders
    spec: ModelSpec
    manifest: LoraManifest


def build_exported(sample, family: str, root: Path) -> ExportedSample:
    onnx_dir = root / "onnx"
    spec = export_model(sample.model_dir, onnx_dir, ExportOptions(progress=False))
    manifest = insert_lora(onnx_dir)
    processed = {}
    for name, path in sample.adapters.items():
        processed[name] = onnx_dir / "lora_weights" / name
        process_adapter(path, processed[name], onnx_dir)
    return ExportedSample(family, Path(sample.model_dir), dict(sample.adapters), onnx_dir, processed, spec, manifest)


@pytest.fixture(scope="session")
def exported_samples(request, tmp_path_factory) -> dict[str, ExportedSample]:
    samples = {}
    for family in FAMILIES:
        sample = request.getfixturevalue(f"{family}_sample")
        samples[family] = build_exported(sample, family, tmp_path_factory.mktemp(f"{family}_exported"))
    return samples


@pytest.fixture(scope="session", params=FAMILIES)
def exported(request, exported_samples) -> ExportedSample:
    return exported_samples[request.param]


class Reference:
    """HF transformers (+ PEFT) in float32, models cached per (model, adapter)."""

    def __init__(self):
        self._models = {}

    def model(self, model_dir: Path, adapter_dir: Path | None = None):
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        key = (str(model_dir), str(adapter_dir))
        if key not in self._models:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            if adapter_dir is not None:
                model = PeftModel.from_pretrained(model, str(adapter_dir))
            self._models[key] = model.eval()
        return self._models[key]

    def logits(self, model_dir: Path, adapter_dir: Path | None, input_ids: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.model(model_dir, adapter_dir)(torch.as_tensor(input_ids)).logits.numpy()


@pytest.fixture(scope="session")
def reference() -> Reference:
    return Reference()
