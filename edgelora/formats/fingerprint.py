"""A cheap fingerprint of an export (config.json, model.onnx, model.onnx.data).

insert-lora records it in lora_manifest.json and lora_model.onnx; the engine recomputes it at
start, so a lora_model.onnx left over from an earlier export (another model, another dtype) is
refused with one line instead of running on weights at the wrong offsets. model.onnx.data can be
gigabytes: its size and 64 evenly spaced 64 KiB blocks are hashed, not the whole file (what an
export rewrites changes both).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from edgelora.formats import contract

BLOCKS = 64
BLOCK_BYTES = 64 << 10
METADATA_KEY = "edgelora.source_fingerprint"  # in lora_model.onnx's metadata_props


def export_fingerprint(onnx_dir: Path) -> str:
    """sha256 hex of the export's description, graph and a sample of its weights; '' if a file is missing."""
    onnx_dir = Path(onnx_dir)
    digest = hashlib.sha256()
    for name in (contract.MODEL_CONFIG, contract.MODEL_ONNX):
        path = onnx_dir / name
        if not path.is_file():
            return ""
        digest.update(name.encode() + b"\0" + path.read_bytes())
    data = onnx_dir / contract.MODEL_ONNX_DATA
    if data.is_file():
        size = data.stat().st_size
        digest.update(f"{contract.MODEL_ONNX_DATA}\0{size}".encode())
        with open(data, "rb") as handle:
            step = max(size // BLOCKS, 1)
            for offset in sorted({min(i * step, max(size - BLOCK_BYTES, 0)) for i in range(BLOCKS + 1)}):
                handle.seek(offset)
                digest.update(handle.read(BLOCK_BYTES))
    return digest.hexdigest()
