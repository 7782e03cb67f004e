"""process-lora: turn a PEFT folder into the runtime's adapter file.

Per projection: ``A = lora_A.T`` ([in, r]) and ``B = (scaling * lora_B).T`` ([r, out]), so the
graph computes ``x @ A @ B`` with no scaling of its own; stored as float16 by default.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgelora import contract
from edgelora.adapters.peft import PeftAdapter, read_peft_adapter
from edgelora.errors import AdapterError, UserInputError
from edgelora.fileio import staged_output
from edgelora.lora_manifest import LoraManifest
from edgelora.model_spec import ModelSpec

log = logging.getLogger(__name__)

PROCESSED_FORMAT = "edgelora-processed-lora"
STORAGE_DTYPES = {"float16": np.float16, "float32": np.float32}


@dataclass
class ProcessedAdapterConfig:
    """``config.json`` beside ``processed_adapter_model.safetensors``."""

    rank: int
    lora_alpha: float
    use_rslora: bool
    target_modules: list[str]
    num_layers: int  # highest adapted layer + 1
    module_shapes: dict[str, list[int]]
    dtype: str
    base_model_name_or_path: str | None = None
    source: str = ""
    dropped_tensors: list[str] = field(default_factory=list)
    format: str = PROCESSED_FORMAT
    version: int = 1

    def save(self, directory: Path) -> None:
        (Path(directory) / contract.PROCESSED_CONFIG).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> "ProcessedAdapterConfig":
        path = Path(directory) / contract.PROCESSED_CONFIG
        if not path.is_file():
            raise AdapterError(f"{directory}: no {contract.PROCESSED_CONFIG}; run 'edgelora process-lora' on the adapter")
        try:
            raw = json.loads(path.read_text())
            if raw.get("format") != PROCESSED_FORMAT:
                raise ValueError("not written by 'edgelora process-lora'")
            raw.pop("format")
            return cls(**raw)
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            raise AdapterError(f"{path}: malformed processed-adapter config: {exc}") from exc

    def check_fits(self, spec: ModelSpec, manifest: LoraManifest | None, where: str,
                   max_rank: int = contract.MAX_LORA_RANK) -> None:
        """Raise if this adapter cannot run on that exported model (sizes, layers, rank, modules)."""
        if self.rank > max_rank:
            raise AdapterError(f"{where}: rank {self.rank} is above the maximum LoRA rank {max_rank}")
        if self.num_layers > spec.num_layers:
            raise AdapterError(f"{where}: adapts layer {self.num_layers - 1} but the base model has {spec.num_layers} layers")
        for module, (in_features, out_features) in self.module_shapes.items():
            expected = spec.module_in_out(module)
            if (in_features, out_features) != expected:
                raise AdapterError(
                    f"{where}: {module} projection is {in_features}x{out_features} in the adapter but "
                    f"{expected[0]}x{expected[1]} in the base model; the adapter was made for another model"
                )
        if manifest is not None:
            missing = [m for m in self.target_modules if m not in manifest.target_modules]
            if missing:
                raise AdapterError(f"{where}: targets {', '.join(missing)} but lora_model.onnx has LoRA only on "
                                   f"{', '.join(manifest.target_modules)}; rerun insert-lora with those modules")


def _module_shapes(adapter: PeftAdapter) -> dict[str, list[int]]:
    """Per module [in, out], checking every layer agrees."""
    shapes: dict[str, list[int]] = {}
    for pair in adapter.pairs:
        shape = [int(pair.lora_a.shape[1]), int(pair.lora_b.shape[0])]
        if shapes.setdefault(pair.module, shape) != shape:
            raise AdapterError(f"{adapter.path}: {pair.module_path} is {shape[0]}x{shape[1]}, other layers "
                               f"{shapes[pair.module][0]}x{shapes[pair.module][1]}")
    return shapes


def _convert(adapter: PeftAdapter, dtype: str) -> dict[str, np.ndarray]:
    """Graph layout, scaling folded in; modules of a smaller rank (rank_pattern) zero-padded to one rank."""
    storage = STORAGE_DTYPES[dtype]
    rank = adapter.max_rank
    tensors = {}
    for pair in adapter.pairs:
        scaling = adapter.config.scaling(pair.module_path, pair.rank)
        # x @ A.T @ B.T * s == x @ (A.T) @ (s * B).T ; A: [r, in] -> [in, r], B: [out, r] -> [r, out]
        a = np.zeros((pair.lora_a.shape[1], rank), storage)
        b = np.zeros((rank, pair.lora_b.shape[0]), storage)
        a[:, : pair.rank] = pair.lora_a.T
        b[: pair.rank] = (pair.lora_b.astype(np.float32) * np.float32(scaling)).T
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise AdapterError(f"{adapter.path}: {pair.module_path} has values that do not fit {dtype}"
                               + ("; try --dtype float32" if dtype == "float16" else ""))
        tensors[contract.lora_a_name(pair.layer, pair.module)] = a
        tensors[contract.lora_b_name(pair.layer, pair.module)] = b
    return tensors


def check_processed_weights(weights: Path, config: ProcessedAdapterConfig, manifest: LoraManifest, where: str) -> None:
    """Read the safetensors header (no data) and check every tensor against the LoRA graph's inputs."""
    from safetensors import SafetensorError, safe_open

    sites = manifest.sites_by_name()
    try:
        with safe_open(str(weights), framework="numpy") as handle:
            shapes = {name: list(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except (OSError, SafetensorError) as exc:
        raise AdapterError(f"{where}: unreadable {contract.PROCESSED_ADAPTER} ({exc})") from exc
    if not shapes:
        raise AdapterError(f"{where}: {contract.PROCESSED_ADAPTER} holds no tensors")
    for name, shape in shapes.items():
        site = sites.get(name)
        if site is None:
            raise AdapterError(f"{where}: tensor {name} has no LoRA input in lora_model.onnx")
        expected = [site.in_features, config.rank] if name == site.a_name else [config.rank, site.out_features]
        if shape != expected:
            raise AdapterError(f"{where}: tensor {name} is {shape}, expected {expected}")


def process_adapter(input_dir: Path, output_dir: Path, onnx_dir: Path | None = None,
                    dtype: str = "float16") -> ProcessedAdapterConfig:
    """Write ``processed_adapter_model.safetensors`` + ``config.json``; check fit when ``onnx_dir`` is given."""
    from safetensors.numpy import save_file

    if dtype not in STORAGE_DTYPES:
        raise UserInputError(f"--dtype {dtype}: expected one of {', '.join(STORAGE_DTYPES)}")
    adapter = read_peft_adapter(Path(input_dir))
    config = ProcessedAdapterConfig(
        rank=adapter.max_rank,
        lora_alpha=float(adapter.config.lora_alpha),
        use_rslora=adapter.config.use_rslora,
        target_modules=adapter.target_modules,
        num_layers=max(pair.layer for pair in adapter.pairs) + 1,
        module_shapes=_module_shapes(adapter),
        dtype=dtype,
        base_model_name_or_path=adapter.config.base_model_name_or_path,
        source=str(Path(input_dir).resolve()),
        dropped_tensors=adapter.dropped,
    )
    if onnx_dir is not None:
        spec = ModelSpec.load(Path(onnx_dir))
        manifest_path = Path(onnx_dir) / contract.LORA_MANIFEST
        manifest = LoraManifest.load(Path(onnx_dir)) if manifest_path.is_file() else None
        config.check_fits(spec, manifest, str(input_dir))
    tensors = _convert(adapter, dtype)
    with staged_output(Path(output_dir)) as staging:
        save_file(tensors, str(staging / contract.PROCESSED_ADAPTER), metadata={"format": PROCESSED_FORMAT})
        config.save(staging)
    log.info("processed %s: rank %d, modules %s, %d tensors -> %s", input_dir, config.rank,
             ",".join(config.target_modules), len(tensors), output_dir)
    return config
