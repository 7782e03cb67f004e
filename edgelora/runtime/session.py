"""ONNX Runtime sessions and device plumbing (CPU by default, CUDA with onnxruntime-gpu)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgelora.errors import RuntimeFailure, UserInputError

DEVICES = ("cpu", "cuda")
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}
# ORT's exception classes that mean "this file is not a model ONNX Runtime can load": the input.
_BAD_MODEL_ERRORS = ("InvalidProtobuf", "InvalidGraph", "NoSuchFile", "NoModel", "InvalidArgument", "NotImplemented")


@dataclass(frozen=True)
class Device:
    """Where the graph runs and where slot / cache memory lives."""

    kind: str = "cpu"
    index: int = 0

    @property
    def provider(self) -> str:
        return "CUDAExecutionProvider" if self.kind == "cuda" else "CPUExecutionProvider"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


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
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
        if type(exc).__name__ in _BAD_MODEL_ERRORS:
            raise UserInputError(f"{path}: ONNX Runtime cannot load it: {_first_line(exc)}") from exc
        raise RuntimeFailure(f"ONNX Runtime failed to load {path} (not an input problem; out of memory?): "
                             f"{_first_line(exc)}") from exc


@contextlib.contextmanager
def runtime_failures(what: str) -> Iterator[None]:
    """Turn an ONNX Runtime failure during a run (out of memory, a kernel error) into RuntimeFailure."""
    try:
        yield
    except MemoryError as exc:
        raise RuntimeFailure(f"out of memory during {what}") from exc
    except Exception as exc:  # ORT's Fail, RuntimeException, EPFail... derive from Exception only
        if isinstance(exc, RuntimeError) or type(exc).__module__.startswith("onnxruntime"):
            raise RuntimeFailure(f"ONNX Runtime failed during {what} (not an input problem): {_first_line(exc)}") from exc
        raise
