"""The KV cache: one preallocated buffer per layer and key/value, bound as both past and present.

The graph writes each step's new keys/values into the buffer at each row's own positions
(ScatterElements sees input == output and skips its copy), so no step copies the cache; rows of
different lengths share the batch.

Attention runs over the whole buffer (masked past each row's length), so a buffer sized for
prompt + max new tokens from the start would make every step pay for the longest context the
batch might reach. Host buffers therefore start at ``initial_len`` and double when a step needs
room: one copy per doubling, never one per step. Device buffers are sized to ``max_len`` at once.
"""

from __future__ import annotations

import numpy as np

from edgelora import contract
from edgelora.model_spec import ModelSpec
from edgelora.runtime.session import NUMPY_DTYPES, Device


class KVCache:
    """Buffers [batch, kv_heads, length, head_dim] for every layer, bound as past and present."""

    def __init__(self, spec: ModelSpec, batch: int, max_len: int, device: Device, initial_len: int | None = None):
        import onnxruntime as ort

        self.max_len = max_len  # the most positions this batch can write
        self.length = max_len if device.kind != "cpu" or initial_len is None else min(max_len, initial_len)
        shape = (batch, spec.num_kv_heads, self.length, spec.head_dim)
        dtype = NUMPY_DTYPES[spec.dtype]
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

    def reserve(self, positions: int, binding) -> None:
        """Make room for positions 0..positions-1: double the host buffers (keeping their contents) and rebind."""
        import onnxruntime as ort

        if positions <= self.length:
            return
        if positions > self.max_len or not self._host:
            raise ValueError(f"cache of {self.length} positions (at most {self.max_len}) cannot hold {positions}")
        length = min(self.max_len, max(positions, 2 * self.length))
        for index, old in enumerate(self._host):
            new = np.zeros(old.shape[:2] + (length,) + old.shape[3:], old.dtype)
            new[:, :, : self.length] = old
            self._host[index] = new
            self._values[index] = ort.OrtValue.ortvalue_from_numpy(new)
        self.length = length
        self.bind(binding)

    def bind(self, binding) -> None:
        """Bind past and present of every layer to the same buffer."""
        for layer in range(self._num_layers):
            key, value = self._values[2 * layer], self._values[2 * layer + 1]
            binding.bind_ortvalue_input(contract.past_key_name(layer), key)
            binding.bind_ortvalue_output(contract.present_key_name(layer), key)
            binding.bind_ortvalue_input(contract.past_value_name(layer), value)
            binding.bind_ortvalue_output(contract.present_value_name(layer), value)
