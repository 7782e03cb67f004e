"""The KV cache: one preallocated buffer per layer and key/value, bound as both past and present.

The graph writes each step's new keys/values into the buffer at each row's own positions
(ScatterElements sees input == output and skips its copy), so no step copies the cache; rows of
different lengths share the batch.
"""

from __future__ import annotations

import numpy as np

from edgelora import contract
from edgelora.model_spec import ModelSpec
from edgelora.runtime.session import NUMPY_DTYPES, Device


class KVCache:
    """Buffers [batch, kv_heads, max_len, head_dim] for every layer, bound once per batch."""

    def __init__(self, spec: ModelSpec, batch: int, max_len: int, device: Device):
        import onnxruntime as ort

        shape = (batch, spec.num_kv_heads, max_len, spec.head_dim)
        dtype = NUMPY_DTYPES[spec.dtype]
        self.max_len = max_len
        self._host = []  # keeps CPU buffers alive while ORT uses them
        self._values = []
        for _ in range(2 * spec.num_layers):
            if device.kind == "cpu":
                buffer = np.zeros(shape, dtype)
                self._host.append(buffer)
                self._values.append(ort.OrtValue.ortvalue_from_numpy(buffer))
            else:
                self._values.append(ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, "cuda", device.index))
        self._num_layers = spec.num_layers

    def fill_random(self, rng) -> None:
        """Benchmarks only: stand-in keys/values so decode can start at a long context without a prefill."""
        for buffer in self._host:
            buffer[...] = rng.standard_normal(buffer.shape, dtype=np.float32).astype(buffer.dtype)

    def bind(self, binding) -> None:
        """Bind past and present of every layer to the same buffer."""
        for layer in range(self._num_layers):
            key, value = self._values[2 * layer], self._values[2 * layer + 1]
            binding.bind_ortvalue_input(contract.past_key_name(layer), key)
            binding.bind_ortvalue_output(contract.present_key_name(layer), key)
            binding.bind_ortvalue_input(contract.past_value_name(layer), value)
            binding.bind_ortvalue_output(contract.present_value_name(layer), value)
