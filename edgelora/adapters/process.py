"""process-lora: turn a PEFT folder into the runtime's adapter file.

Per projection: ``A = lora_A.T`` ([in, r]) and ``B = (scaling * lora_B).T`` ([r, out]), so the
graph computes ``x @ A @ B`` with no scaling of its own; stored as float16 by default.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from edgelora.adapters.peft import PeftAdapter, read_peft_adapter
from edgelora.errors import AdapterError, UserInputError
from edgelora.formats import contract
from edgelora.formats.fileio import staged_output
from edgelora.formats.lora_manifest import LoraManifest
from edgelora.formats.model_spec import ModelSpec
from edgelora.formats.processed_adapter import PROCESSED_FORMAT, STORAGE_DTYPES, ProcessedAdapterConfig

log = logging.getLogger(__name__)


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
