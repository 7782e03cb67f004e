"""The KV cache: one preallocated buffer per layer and key/value, bound as both past and present.

The graph writes each step's new keys/values into the buffer at each row's own positions
(ScatterElements sees input == output and skips its copy), so no step copies the cache; rows of
different lengths share the batch.

Attention runs over the whole buffer (masked past each row's length), so a buffer sized for
prompt + max new tokens from the start would make every step pay for the longest context the
batch might reach. Host buffers therefore start at ``initial_len`` and double when a step needs
room: one copy per doubling, never one per step. Device buffers are sized to ``max_len`` at once.

Positions past a row's length are masked, but an additive mask does not neutralise NaN or inf
(NaN + -big is NaN, and 0 x NaN in probs @ V is NaN), so whatever a buffer held before must never
be seen: ``clear_rows`` zeroes a row's positions in every layer whenever the row is (re)assigned
to a request. That costs one memset of the row (layers x 2 x kv_heads x length x head_dim
elements: 3.9 MB for a 0.5B Qwen2 row of 160 positions in float32) per assignment, and nothing per
step, which a select in the graph would cost on every step.
"""

from __future__ import annotations

import numpy as np

from edgelora import contract
from edgelora.model_spec import ModelSpec
from edgelora.runtime import native
from edgelora.runtime.session import NUMPY_DTYPES, Device


class KVCache:
    """Buffers [batch, kv_heads, length, head_dim] for every layer, bound as past and present."""

    def __init__(self, spec: ModelSpec, batch: int, max_len: int, device: Device, initial_len: int | None = None):
        import onnxruntime as ort

        self.max_len = max_len  # the most positions this batch can write
        self.length = max_len if device.kind != "cpu" or initial_len is None else min(max_len, initial_len)
        shape = (batch, spec.num_kv_heads, self.length, spec.head_dim)
        dtype = NUMPY_DTYPES[spec.dtype]
        self._host: list[np.ndarray] = []  # keeps CPU buffers alive while ORT uses them
        self._values = []
        for _ in range(2 * spec.num_layers):
            if device.kind == "cpu":
                # Not zeroed here: clear_rows zeroes a row when it is assigned, which is the guarantee.
                buffer = np.empty(shape, dtype)
                self._host.append(buffer)
                self._values.append(ort.OrtValue.ortvalue_from_numpy(buffer))
            else:
                self._values.append(ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, "cuda", device.index))
        self._row_bytes = int(np.prod(shape[1:])) * np.dtype(dtype).itemsize
        self._num_layers = spec.num_layers

    def host_buffers(self) -> list[np.ndarray]:
        """The CPU buffers (layer 0 key, layer 0 value, layer 1 key, ...); empty on a device."""
        return list(self._host)

    def clear_rows(self, rows) -> None:
        """Zero every position of these rows in every layer: call when a row is (re)assigned."""
        rows = list(rows)
        if self._host:
            for buffer in self._host:
                buffer[rows] = 0
            return
        for value in self._values:
            for row in rows:
                native.zero_device_memory(value.data_ptr() + row * self._row_bytes, self._row_bytes)

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
