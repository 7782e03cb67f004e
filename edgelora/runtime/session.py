"""ONNX Runtime sessions and device plumbing (CPU by default, CUDA with onnxruntime-gpu)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgelora.errors import UserInputError

DEVICES = ("cpu", "cuda")
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}


@dataclass(frozen=True)
class Device:
    """Where the graph runs and where slot / cache memory lives."""

    kind: str = "cpu"
    index: int = 0

    @property
    def provider(self) -> str:
        return "CUDAExecutionProvider" if self.kind == "cuda" else "CPUExecutionProvider"


def make_session(path: Path, device: Device, num_threads: int | None = None):
    """Create the inference session; a missing CUDA provider is a user error, not a silent fallback."""
    import onnxruntime as ort

    if device.kind not in DEVICES:
        raise UserInputError(f"--device {device.kind}: expected one of {', '.join(DEVICES)}")
    if device.kind == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise UserInputError("--device cuda: onnxruntime has no CUDA provider here (install onnxruntime-gpu; needs a GPU)")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if num_threads:
        options.intra_op_num_threads = int(num_threads)
        options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers = [(device.provider, {"device_id": device.index})] if device.kind == "cuda" else []
    providers.append("CPUExecutionProvider")
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
        raise UserInputError(f"{path}: ONNX Runtime cannot load it: {str(exc).splitlines()[0]}") from exc
