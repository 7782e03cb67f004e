"""The processed-adapter format: ``config.json`` + ``processed_adapter_model.safetensors``.

process-lora writes it; the runtime reads it. Both import this module, so the format and its
checks exist once, and the runtime never imports the processing stage (or torch).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgelora.errors import AdapterError, UserInputError
from edgelora.formats import contract
from edgelora.formats.lora_manifest import LoraManifest
from edgelora.formats.model_spec import ModelSpec

PROCESSED_FORMAT = "edgelora-processed-lora"
STORAGE_DTYPES = {"float16": np.float16, "float32": np.float32}


def resolve_adapter_path(path: Path) -> tuple[Path, Path]:
    """Accept a processed folder or its safetensors file; return (folder, weights file)."""
    path = Path(path)
    folder = path.parent if path.suffix == ".safetensors" else path
    weights = path if path.suffix == ".safetensors" else path / contract.PROCESSED_ADAPTER
    if not weights.is_file():
        raise UserInputError(f"{path}: no {contract.PROCESSED_ADAPTER}; run 'edgelora process-lora' on the adapter")
    return folder, weights


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
    def load(cls, directory: Path) -> ProcessedAdapterConfig:
        path = Path(directory) / contract.PROCESSED_CONFIG
        if not path.is_file():
            raise AdapterError(f"{directory}: no {contract.PROCESSED_CONFIG}; run 'edgelora process-lora' on the adapter")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise AdapterError(f"{path}: cannot read it ({exc.strerror or exc})") from exc
        return cls.parse(data, path)

    @classmethod
    def parse(cls, data: bytes, path: Path) -> ProcessedAdapterConfig:
        """The config from the bytes of ``path`` (named in errors)."""
        try:
            raw = json.loads(data)
            if not isinstance(raw, dict) or raw.get("format") != PROCESSED_FORMAT:
                raise ValueError("not written by 'edgelora process-lora'")
            raw.pop("format")
            return cls(**raw)
        except (ValueError, TypeError, AttributeError) as exc:
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


def check_processed_tensors(shapes: dict[str, list[int]], config: ProcessedAdapterConfig, manifest: LoraManifest,
                            where: str) -> None:
    """Check every tensor's name and shape against the LoRA graph's inputs."""
    sites = manifest.sites_by_name()
    if not shapes:
        raise AdapterError(f"{where}: {contract.PROCESSED_ADAPTER} holds no tensors")
    for name, shape in shapes.items():
        site = sites.get(name)
        if site is None:
            raise AdapterError(f"{where}: tensor {name} has no LoRA input in lora_model.onnx")
        expected = [site.in_features, config.rank] if name == site.a_name else [config.rank, site.out_features]
        if shape != expected:
            raise AdapterError(f"{where}: tensor {name} is {shape}, expected {expected}")
    for name in shapes:
        site = sites[name]
        if (site.a_name in shapes) != (site.b_name in shapes):
            raise AdapterError(f"{where}: {name} has no matching {site.b_name if name == site.a_name else site.a_name}")


def parse_processed_tensors(data: bytes, where: str) -> dict[str, np.ndarray]:
    """Every tensor of a processed adapter file's bytes (float16, bfloat16 via ml_dtypes, or float32).

    From bytes already read (not the path), so the tensors are exactly the bytes that were hashed.
    """
    from safetensors import SafetensorError, deserialize

    dtypes = {"F32": np.float32, "F16": np.float16}
    try:
        views = deserialize(data)
    except (SafetensorError, ValueError, TypeError) as exc:
        raise AdapterError(f"{where}: unreadable {contract.PROCESSED_ADAPTER} ({exc})") from exc
    tensors = {}
    for name, view in views:
        if view["dtype"] == "BF16" and "BF16" not in dtypes:
            import ml_dtypes  # half a second to import: only when a file holds bfloat16

            dtypes["BF16"] = ml_dtypes.bfloat16
        dtype = dtypes.get(view["dtype"])
        if dtype is None:
            raise AdapterError(f"{where}: tensor {name} is {view['dtype']}; processed adapters are F16, BF16 or F32")
        tensors[name] = np.frombuffer(view["data"], dtype=dtype).reshape(view["shape"])
    return tensors


@dataclass(frozen=True)
class ProcessedAdapterFiles:
    """A processed adapter's two files as read at one moment, and the version their bytes make.

    The version is a content digest, not file stamps: a copy that keeps modification times
    (``cp -p``, rsync, tar, object-store syncs) or a retrain written within the clock's
    granularity changes the bytes but not the stamps. Every read reads the whole file anyway, so
    hashing what was read costs little and proves that the bytes parsed are the bytes registered.
    """

    folder: Path
    weights: Path
    config_bytes: bytes
    weights_bytes: bytes

    @property
    def version(self) -> str:
        return content_version(self.config_bytes, self.weights_bytes)

    @classmethod
    def read(cls, path: Path) -> ProcessedAdapterFiles:
        folder, weights = resolve_adapter_path(path)
        config_path = folder / contract.PROCESSED_CONFIG
        if not config_path.is_file():
            raise AdapterError(f"{folder}: no {contract.PROCESSED_CONFIG}; run 'edgelora process-lora' on the adapter")
        try:
            return cls(folder, weights, config_path.read_bytes(), weights.read_bytes())
        except OSError as exc:
            raise AdapterError(f"{path}: cannot read the adapter ({exc.strerror or exc})") from exc

    def config(self) -> ProcessedAdapterConfig:
        return ProcessedAdapterConfig.parse(self.config_bytes, self.folder / contract.PROCESSED_CONFIG)

    def tensors(self, where: str) -> dict[str, np.ndarray]:
        return parse_processed_tensors(self.weights_bytes, where)


VERSION_HEX = 16  # 64 bits of sha256: unique across any one adapter's history of versions


def content_version(*parts: bytes) -> str:
    """A short sha256 hex digest of byte strings, each framed by its length (no two splits collide)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest.hexdigest()[:VERSION_HEX]
