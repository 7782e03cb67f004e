"""The KV cache: one buffer per layer and key/value for every row the scheduler may run.

Buffers are [rows, kv_heads, length, head_dim] and live as long as the scheduler. The graph
writes each step's new keys/values into them at each row's own positions (ScatterElements sees
input == output and skips its copy), so no step copies the cache; rows of different lengths
share a step. A step binds a view over the rows it runs (``bind_rows(lo, hi)``: leading-row
slices are contiguous), so it never pays for empty rows, and the scheduler keeps live rows packed
at the front (``move_row``: one row copy when a row in the middle leaves).

Attention runs over the whole buffer length (masked past each row's length), so host buffers
start at ``initial_len`` and double when a step needs room (one copy per doubling, never one per
step) up to ``max_len``; ``shrink`` gives the room back once no long row is left. Device buffers
are ``max_len`` long from the start.

Positions past a row's length are masked, but an additive mask does not neutralise NaN or inf
(NaN + -big is NaN, and 0 x NaN in probs @ V is NaN), so whatever a buffer held before must never
be seen: ``clear_rows`` zeroes a row when it is (re)assigned to a request. Each row remembers how
far it was written since its last clear (a fresh buffer counts as written everywhere: device
memory is not initialised), so a clear costs what the previous request wrote, not the buffer.
"""

from __future__ import annotations

import numpy as np

from edgelora.formats import contract
from edgelora.formats.model_spec import ModelSpec
from edgelora.runtime import native
from edgelora.runtime.session import NUMPY_DTYPES, Device


class KVCache:
    """Buffers [rows, kv_heads, length, head_dim] for every layer, bound as past and present."""

    def __init__(self, spec: ModelSpec, batch: int, max_len: int, device: Device, initial_len: int | None = None):
        self.rows = batch
        self.max_len = max_len  # the most positions a row can hold
        self._device = device
        self._spec = spec
        self._dtype = NUMPY_DTYPES[spec.dtype]
        self._num_layers = spec.num_layers
        self.initial_len = max_len if device.kind != "cpu" or initial_len is None else min(max_len, initial_len)
        self._host: list[np.ndarray] = []  # keeps CPU buffers alive while ORT uses them
        self._values: list = []
        self.generation = 0  # bumps when buffers are replaced: views made before are stale
        self._views: dict[tuple[int, int], list] = {}
        self._written = np.zeros(batch, np.int64)  # positions each row may hold old data in
        self._allocate(self.initial_len)

    # -- memory --------------------------------------------------------------------------------
    def _allocate(self, length: int, keep: int = 0) -> None:
        """New buffers of ``length`` positions, keeping positions [0, keep) of every row."""
        import onnxruntime as ort

        shape = (self.rows, self._spec.num_kv_heads, length, self._spec.head_dim)
        host, values = [], []
        for index in range(2 * self._num_layers):
            if self._device.kind == "cpu":
                # np.empty, not zeros: clear_rows zeroes a row when it is assigned, which is the guarantee.
                buffer = np.empty(shape, self._dtype) if not keep else np.zeros(shape, self._dtype)
                if keep:
                    buffer[:, :, :keep] = self._host[index][:, :, :keep]
                host.append(buffer)
                values.append(ort.OrtValue.ortvalue_from_numpy(buffer))
            else:
                values.append(ort.OrtValue.ortvalue_from_shape_and_type(shape, self._dtype, "cuda", self._device.index))
        self._host, self._values = host, values
        self.length = length
        # Kept positions hold what they held; beyond them a grown host buffer is zeros, while a fresh
        # one (np.empty, or device memory) may hold anything: every position counts as written.
        self._written = np.minimum(self._written, keep) if keep else np.full(self.rows, length, np.int64)
        self._head_bytes = length * self._spec.head_dim * np.dtype(self._dtype).itemsize
        self._row_bytes = self._spec.num_kv_heads * self._head_bytes
        self.generation += 1
        self._views.clear()

    @property
    def size_bytes(self) -> int:
        return 2 * self._num_layers * self.rows * self._row_bytes

    def host_buffers(self) -> list[np.ndarray]:
        """The CPU buffers (layer 0 key, layer 0 value, layer 1 key, ...); empty on a device."""
        return list(self._host)

    def reserve(self, positions: int) -> bool:
        """Make room for positions 0..positions-1 (doubling, keeping contents); True if buffers changed."""
        if positions <= self.length:
            return False
        if positions > self.max_len or not self._host:
            raise ValueError(f"cache of {self.length} positions (at most {self.max_len}) cannot hold {positions}")
        self._allocate(min(self.max_len, max(positions, 2 * self.length)), keep=self.length)
        return True

    def shrink(self, positions: int) -> bool:
        """Give back room when every live row fits in a quarter of the buffer (host buffers only)."""
        target = max(self.initial_len, positions)
        if not self._host or self.length <= self.initial_len or 4 * positions > self.length:
            return False
        self._allocate(min(self.length, max(target, 2 * positions)), keep=positions)
        return True

    # -- rows ----------------------------------------------------------------------------------
    def note_written(self, lo: int, extents) -> None:
        """Rows lo.. have now been written up to these positions (a run wrote them)."""
        extents = np.asarray(extents, np.int64)
        rows = slice(lo, lo + len(extents))
        self._written[rows] = np.maximum(self._written[rows], extents)

    def clear_rows(self, rows) -> None:
        """Zero what these rows may hold in every layer: call when a row is (re)assigned."""
        for row in rows:
            written = int(min(self._written[row], self.length))
            if written:
                self._zero(row, 0, written)
            self._written[row] = 0

    def move_row(self, source: int, target: int) -> None:
        """Copy row ``source`` over row ``target`` (packing live rows); ``source`` is left to be cleared."""
        keep = int(min(self._written[source], self.length))
        stale = int(min(self._written[target], self.length))
        if self._host:
            for buffer in self._host:
                buffer[target, :, :keep] = buffer[source, :, :keep]
        else:
            size = keep * self._spec.head_dim * np.dtype(self._dtype).itemsize
            for value in self._values:
                for head in range(self._spec.num_kv_heads):
                    offset = head * self._head_bytes
                    native.copy_device_memory(value.data_ptr() + target * self._row_bytes + offset,
                                              value.data_ptr() + source * self._row_bytes + offset, size)
        if stale > keep:
            self._zero(target, keep, stale)
        self._written[target] = keep

    @property
    def on_host(self) -> bool:
        return bool(self._host)

    def read_positions(self, row: int, start: int, stop: int) -> np.ndarray:
        """A copy of positions [start, stop) of one row, every layer: [2 x layers, kv_heads, n, head_dim]
        (host buffers; the prefix cache's blocks)."""
        return np.stack([buffer[row, :, start:stop] for buffer in self._host])

    def write_positions(self, row: int, start: int, blocks: list[np.ndarray]) -> None:
        """Copy blocks (as ``read_positions`` gives them) into one row from ``start`` on, one after another."""
        for block in blocks:
            stop = start + block.shape[2]
            for index, buffer in enumerate(self._host):
                buffer[row, :, start:stop] = block[index]
            start = stop
        self._written[row] = max(int(self._written[row]), start)

    def _zero(self, row: int, start: int, stop: int) -> None:
        if self._host:
            for buffer in self._host:
                buffer[row, :, start:stop] = 0
            return
        item = self._spec.head_dim * np.dtype(self._dtype).itemsize
        for value in self._values:
            for head in range(self._spec.num_kv_heads):
                native.zero_device_memory(value.data_ptr() + row * self._row_bytes + head * self._head_bytes
                                          + start * item, (stop - start) * item)

    # -- binding -------------------------------------------------------------------------------
    def bind(self, binding) -> None:
        """Bind every row (past and present of every layer to the same buffer)."""
        self.bind_rows(binding, 0, self.rows)

    def bind_rows(self, binding, lo: int, hi: int) -> None:
        """Bind rows lo..hi-1 only: a step over n rows computes n rows."""
        for layer, (key, value) in enumerate(self._row_values(lo, hi)):
            for past, present, buffer in ((contract.past_key_name(layer), contract.present_key_name(layer), key),
                                          (contract.past_value_name(layer), contract.present_value_name(layer), value)):
                if isinstance(buffer, _DeviceView):
                    address = buffer.value.data_ptr() + buffer.offset
                    binding.bind_input(past, "cuda", buffer.device_index, buffer.dtype, buffer.shape, address)
                    binding.bind_output(present, "cuda", buffer.device_index, buffer.dtype, buffer.shape, address)
                else:
                    binding.bind_ortvalue_input(past, buffer)
                    binding.bind_ortvalue_output(present, buffer)

    def _row_values(self, lo: int, hi: int) -> list:
        """(key, value) OrtValues over rows lo..hi-1 of each layer, made once per range and buffer generation."""
        import onnxruntime as ort

        if (lo, hi) not in self._views:
            if lo == 0 and hi == self.rows:
                flat = self._values
            elif self._host:
                flat = [ort.OrtValue.ortvalue_from_numpy(buffer[lo:hi]) for buffer in self._host]
            else:
                shape = [hi - lo, self._spec.num_kv_heads, self.length, self._spec.head_dim]
                flat = [_DeviceView(value, lo * self._row_bytes, shape, self._dtype, self._device.index)
                        for value in self._values]
            self._views[(lo, hi)] = [(flat[2 * layer], flat[2 * layer + 1]) for layer in range(self._num_layers)]
        return self._views[(lo, hi)]


class _DeviceView:
    """Rows of a device buffer, bound by address (OrtValue cannot slice device memory)."""

    def __init__(self, value, offset: int, shape: list[int], dtype, device_index: int):
        self.value, self.offset, self.shape, self.dtype, self.device_index = value, offset, shape, dtype, device_index
