"""The C++ runtime (``edgelora._runtime``): adapter slot memory, sampler, bandwidth probe.

Imported through this module so a missing build, or a build without CUDA asked to use CUDA, is
one clear error instead of an ImportError or a C++ message deep inside the engine.
"""

from __future__ import annotations

from edgelora.errors import EdgeLoraError, UserInputError

try:
    from edgelora import _runtime
except ImportError as exc:  # pragma: no cover - only without a build
    _runtime = None
    _IMPORT_ERROR = exc
else:
    _IMPORT_ERROR = None


def _module():
    if _runtime is None:
        raise EdgeLoraError(f"the edgelora native runtime is not built ({_IMPORT_ERROR}); "
                            "run 'pip install -e .' in the source folder")
    return _runtime


def with_cuda() -> bool:
    """Whether the runtime was built with CUDA slot buffers."""
    return bool(_module().with_cuda)


def require_device(device: str) -> None:
    """Refuse --device cuda on a runtime built without CUDA, before anything is loaded."""
    if device == "cuda" and not with_cuda():
        raise UserInputError("--device cuda: this edgelora runtime was built without CUDA; "
                             "reinstall with EDGELORA_CUDA=ON pip install -e '.[gpu]' on a machine with nvcc")


def AdapterPool(sites: list[tuple[int, int]], num_slots: int, max_rank: int, dtype: str = "float32",
                device: str = "cpu"):
    """Slot memory for ``num_slots`` adapters over the graph's LoRA sites, each (in, out) (see runtime/adapter_pool.h)."""
    require_device(device)
    return _module().AdapterPool(sites, num_slots, max_rank, dtype, device)


def Sampler(seed: int):
    """A per-request random stream (mt19937_64)."""
    return _module().Sampler(seed)


def sample_batch(logits, samplers, temperatures, top_ks, top_ps):
    """One int64 token per row of float32 logits [batch, vocab]."""
    return _module().sample_batch(logits, samplers, temperatures, top_ks, top_ps)


def sample_row(logits, sampler, temperature: float, top_k: int = 0, top_p: float = 1.0) -> int:
    return _module().sample_row(logits, sampler, temperature, top_k, top_p)


def read_bandwidth(threads: int = 0, size_bytes: int = 512 << 20, repeats: int = 5) -> float:
    """Memory read bandwidth in bytes/s with ``threads`` threads (0: all cores)."""
    return _module().read_bandwidth(threads, size_bytes, repeats)


def zero_device_memory(address: int, size_bytes: int) -> None:
    """Zero CUDA device memory (KV cache rows); needs a CUDA build."""
    _module().zero_device_memory(address, size_bytes)


def copy_device_memory(target: int, source: int, size_bytes: int) -> None:
    """Copy CUDA device memory (moving a KV cache row when live rows are packed); needs a CUDA build."""
    _module().copy_device_memory(target, source, size_bytes)
