"""Reading a standard PEFT LoRA folder (adapter_config.json + adapter_model.safetensors|.bin)."""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgelora.errors import AdapterError, UserInputError
from edgelora.formats import contract

log = logging.getLogger(__name__)

# base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight (optionally with an adapter name)
_LORA_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$")
# Tensors PEFT may save that do not belong in a LoRA branch of a projection.
_DROPPABLE_RE = re.compile(r"(norm|lm_head|embed_tokens|wte|embedding)", re.IGNORECASE)


@dataclass
class PeftAdapterConfig:
    """The fields of adapter_config.json that change the math, validated in one pass."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    use_dora: bool = False
    bias: str = "none"
    lora_bias: bool = False
    fan_in_fan_out: bool = False
    peft_type: str = "LORA"
    target_modules: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] | None = None
    base_model_name_or_path: str | None = None

    @classmethod
    def from_json(cls, raw: dict) -> PeftAdapterConfig:
        return cls(
            r=raw.get("r", 8),
            lora_alpha=raw.get("lora_alpha", 8),
            use_rslora=bool(raw.get("use_rslora", False)),
            use_dora=bool(raw.get("use_dora", False)),
            bias=raw.get("bias", "none") or "none",
            lora_bias=bool(raw.get("lora_bias", False)),
            fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)),
            peft_type=str(raw.get("peft_type", "LORA")).upper(),
            target_modules=raw.get("target_modules"),
            rank_pattern=raw.get("rank_pattern") or {},
            alpha_pattern=raw.get("alpha_pattern") or {},
            modules_to_save=raw.get("modules_to_save"),
            base_model_name_or_path=raw.get("base_model_name_or_path"),
        )

    def validate(self, where: str) -> None:
        """Collect every unsupported feature and raise once, naming them all."""
        problems = []
        if self.peft_type != "LORA":
            problems.append(f"peft_type {self.peft_type} (only LORA)")
        if self.use_dora:
            problems.append("DoRA (use_dora=true)")
        if self.bias != "none":
            problems.append(f"bias training (bias={self.bias!r})")
        if self.lora_bias:
            problems.append("LoRA bias (lora_bias=true)")
        if self.fan_in_fan_out:
            problems.append("fan_in_fan_out=true")
        if not isinstance(self.r, int) or self.r <= 0:
            problems.append(f"rank r={self.r!r}")
        if problems:
            raise AdapterError(f"{where}: unsupported PEFT features: {'; '.join(problems)}")

    def _pattern_value(self, patterns: dict, module_path: str, default):
        """PEFT's rule: a pattern key matches a module whose name ends with it (as a regex)."""
        for key, value in patterns.items():
            if re.match(rf"(.*\.)?({key})$", module_path):
                return value
        return default

    def scaling(self, module_path: str, rank: int) -> float:
        """The factor PEFT multiplies ``x @ A @ B`` by for this module."""
        alpha = float(self._pattern_value(self.alpha_pattern, module_path, self.lora_alpha))
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


@dataclass
class LoraPair:
    """One projection's factors as PEFT stores them: A [r, in], B [out, r]."""

    layer: int
    module: str  # our short name
    module_path: str  # e.g. model.layers.3.self_attn.q_proj (for PEFT's pattern rules)
    lora_a: np.ndarray
    lora_b: np.ndarray

    @property
    def rank(self) -> int:
        return int(self.lora_a.shape[0])


@dataclass
class PeftAdapter:
    config: PeftAdapterConfig
    pairs: list[LoraPair]
    dropped: list[str]
    source_dtype: str
    path: Path

    @property
    def max_rank(self) -> int:
        return max(pair.rank for pair in self.pairs)

    @property
    def target_modules(self) -> list[str]:
        present = {pair.module for pair in self.pairs}
        return [m for m in contract.MODULE_NAMES if m in present]


def _load_tensors(directory: Path) -> dict[str, np.ndarray]:
    safetensors_path = directory / contract.PEFT_WEIGHTS
    bin_path = directory / contract.PEFT_WEIGHTS_BIN
    if safetensors_path.is_file():
        from safetensors import SafetensorError

        try:
            return _upcast_bf16(safetensors_path)
        except (SafetensorError, OSError, ValueError, KeyError, TypeError) as exc:
            raise AdapterError(f"{safetensors_path}: corrupt or truncated safetensors file ({exc})") from exc
    if bin_path.is_file():
        try:
            import torch
        except ImportError as exc:
            raise AdapterError(f"{bin_path}: reading .bin adapters needs torch (pip install edgelora[export])") from exc
        try:
            state = torch.load(bin_path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a bad pickle
            raise AdapterError(f"{bin_path}: cannot read: {str(exc).splitlines()[0]}") from exc
        return {k: v.float().numpy() for k, v in state.items()}
    raise UserInputError(f"{directory}: no {contract.PEFT_WEIGHTS} (or {contract.PEFT_WEIGHTS_BIN})")


def _upcast_bf16(path: Path) -> dict[str, np.ndarray]:
    """Load a safetensors file as float32 numpy arrays (bfloat16 through ml_dtypes, which safetensors uses)."""
    from safetensors.numpy import load_file

    return {name: value.astype(np.float32) for name, value in load_file(str(path)).items()}


def _header_dtypes(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        return {name: handle.get_slice(name).get_dtype() for name in handle.keys()}  # noqa: SIM118


def read_peft_adapter(directory: Path) -> PeftAdapter:
    """Read and validate a PEFT LoRA folder; drop norm/lm_head/embedding tensors with a warning."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserInputError(f"{directory}: no such folder")
    config_path = directory / contract.PEFT_CONFIG
    if not config_path.is_file():
        raise UserInputError(f"{directory}: no {contract.PEFT_CONFIG}; expected a PEFT LoRA folder")
    try:
        raw = json.loads(config_path.read_text())
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{config_path}: not valid JSON: {exc}") from exc
    config = PeftAdapterConfig.from_json(raw)
    config.validate(str(directory))
    tensors = _load_tensors(directory)
    source_dtype = ",".join(sorted(_header_dtypes(directory / contract.PEFT_WEIGHTS).values())) \
        if (directory / contract.PEFT_WEIGHTS).is_file() else "bin"

    halves: dict[tuple[int, str], dict[str, object]] = {}
    dropped, unsupported = [], []
    for name, value in tensors.items():
        match = _LORA_RE.search(name)
        module = contract.MODULES_BY_HF_NAME.get(match.group(3)) if match else None
        if match and module is not None and module.block == match.group(2):
            entry = halves.setdefault((int(match.group(1)), module.short), {})
            entry["path"] = name[: match.start(4) - len(".lora_")]
            entry[match.group(4)] = value
        elif "lora_magnitude_vector" in name:
            unsupported.append(f"DoRA tensor {name}")
        elif _DROPPABLE_RE.search(name):
            dropped.append(name)
        else:
            unsupported.append(name)
    if unsupported:
        raise AdapterError(f"{directory}: unsupported tensors: {', '.join(sorted(unsupported)[:3])}"
                           + (f" (+{len(unsupported) - 3} more)" if len(unsupported) > 3 else ""))
    if dropped:
        log.warning("%s: dropping %d tensors that are not LoRA on a projection: %s", directory, len(dropped),
                    ", ".join(sorted(dropped)))
    pairs = []
    for (layer, module), entry in sorted(halves.items(), key=lambda item: (item[0][0], contract.MODULE_NAMES.index(item[0][1]))):
        if "A" not in entry or "B" not in entry:
            raise AdapterError(f"{directory}: {entry['path']} has lora_{'A' if 'A' not in entry else 'B'} missing")
        lora_a, lora_b = entry["A"], entry["B"]
        if lora_a.ndim != 2 or lora_b.ndim != 2 or lora_a.shape[0] != lora_b.shape[1]:
            raise AdapterError(f"{directory}: {entry['path']}: lora_A {list(lora_a.shape)} and lora_B "
                               f"{list(lora_b.shape)} do not form a LoRA pair")
        pairs.append(LoraPair(layer, module, str(entry["path"]).removeprefix("base_model.model."), lora_a, lora_b))
    if not pairs:
        raise AdapterError(f"{directory}: no LoRA tensors on q/k/v/o/gate/up/down projections")
    adapter = PeftAdapter(config, pairs, sorted(dropped), source_dtype, directory)
    if adapter.max_rank > contract.MAX_LORA_RANK:
        raise AdapterError(f"{directory}: rank {adapter.max_rank} is above the maximum {contract.MAX_LORA_RANK}")
    return adapter
