"""The model step: one ORT session over lora_model.onnx, adapter slots bound per step.

A step may mix adapters row by row: the slots its rows use are bound as one contiguous stack
(a zero-copy view of the pool) and ``lora_index`` routes each row; base rows get index 0. The
graph computes logits only at ``logits_positions`` (each row's last token), never over the prompt.
Which rows run, and when, is the scheduler's business (``scheduler.py``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from edgelora import contract
from edgelora.errors import UserInputError
from edgelora.fingerprint import METADATA_KEY
from edgelora.lora_manifest import LoraManifest
from edgelora.model_spec import ModelSpec
from edgelora.runtime import native
from edgelora.runtime.adapter_cache import AdapterCache
from edgelora.runtime.config import EngineConfig
from edgelora.runtime.kv_cache import KVCache
from edgelora.runtime.session import NUMPY_DTYPES, Device, make_session, runtime_failures


class Engine:
    """One session with shared base weights, the adapter cache, and what binding a step needs."""

    def __init__(self, onnx_dir: Path, config: EngineConfig | None = None):
        self.config = config or EngineConfig()
        self.config.validate()
        onnx_dir = Path(onnx_dir)
        graph = onnx_dir / contract.LORA_MODEL_ONNX
        native.require_device(self.config.device)
        if not graph.is_file():
            raise UserInputError(f"{onnx_dir}: no {contract.LORA_MODEL_ONNX}; run 'edgelora insert-lora --onnx-dir {onnx_dir}'")
        self.spec = ModelSpec.load(onnx_dir)
        self.manifest = LoraManifest.load(onnx_dir)
        self.manifest.check_built_from(onnx_dir)
        self.device = Device(self.config.device)
        self.session = make_session(graph, self.device, self.config.num_threads or os.cpu_count())
        recorded = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        if recorded != self.manifest.source_fingerprint:
            raise UserInputError(f"{onnx_dir}: {contract.LORA_MODEL_ONNX} and {contract.LORA_MANIFEST} come from "
                                 f"different insert-lora runs; re-run 'edgelora insert-lora --onnx-dir {onnx_dir}'")
        self.float_dtype = NUMPY_DTYPES[self.spec.dtype]
        self.pool = native.AdapterPool([(s.in_features, s.out_features) for s in self.manifest.sites],
                                       self.config.max_loras, self.config.max_lora_rank, self.spec.dtype,
                                       self.device.kind)
        self.adapters = AdapterCache(self.pool, self.spec, self.manifest, self.config.max_lora_rank,
                                     self.config.host_loras, self.float_dtype)
        self._no_adapter = {site.a_name: np.zeros(contract.lora_a_shape(1, site.in_features, 0), self.float_dtype)
                            for site in self.manifest.sites}
        self._no_adapter.update({site.b_name: np.zeros(contract.lora_b_shape(1, 0, site.out_features), self.float_dtype)
                                 for site in self.manifest.sites})
        self._stack_cache: dict[tuple[int, int], list] = {}
        self._rank_scalars: dict[int, np.ndarray] = {}
        self._stack_generation = -1
        self.eos_ids = sorted(set(self.spec.eos_token_ids))
        self.pad_id = self.spec.pad_token_id if self.spec.pad_token_id is not None else 0

    # -- requests ------------------------------------------------------------------------------
    def check_prompt(self, prompt_ids: list[int], where: str) -> None:
        """Refuse a prompt the model cannot read: empty, or a token id outside the vocabulary."""
        if not prompt_ids:
            raise UserInputError(f"{where}: the prompt has no tokens")
        if any(not isinstance(t, int) or isinstance(t, bool) for t in prompt_ids) \
                or min(prompt_ids) < 0 or max(prompt_ids) >= self.spec.vocab_size:
            raise UserInputError(f"{where}: token id out of the vocabulary (0..{self.spec.vocab_size - 1})")

    # -- adapters ------------------------------------------------------------------------------
    def bind_adapters(self, binding, slots: list[int]) -> np.ndarray:
        """Bind the pool slots the rows use as one stack; return lora_index for the rows.

        The stack is a zero-copy view of slots first..last of the pool; nothing is copied per step.
        """
        used = sorted({slot for slot in slots if slot})
        if not used or self.pool.rank_capacity == 0:
            for name, empty in self._no_adapter.items():
                binding.bind_cpu_input(name, empty)
            binding.bind_cpu_input(contract.LORA_RANK, self._rank_scalar(0))
            return np.zeros(len(slots), np.int64)
        first, last = used[0], used[-1]
        binding.bind_cpu_input(contract.LORA_RANK, self._rank_scalar(self.pool.rank_capacity))
        if self.device.kind == "cpu":
            for name, value in self._stack_values(first, last):
                binding.bind_ortvalue_input(name, value)
        else:
            stack, rank = last - first + 1, self.pool.rank_capacity
            for index, site in enumerate(self.manifest.sites):
                binding.bind_input(site.a_name, "cuda", self.device.index, self.float_dtype,
                                   list(contract.lora_a_shape(stack, site.in_features, rank)),
                                   self.pool.a_pointer(index, first, last))
                binding.bind_input(site.b_name, "cuda", self.device.index, self.float_dtype,
                                   list(contract.lora_b_shape(stack, rank, site.out_features)),
                                   self.pool.b_pointer(index, first, last))
        return np.array([slot - first + 1 if slot else 0 for slot in slots], np.int64)

    def _rank_scalar(self, rank: int) -> np.ndarray:
        """The lora_rank input; kept referenced because ORT reads bound host arrays in place."""
        if rank not in self._rank_scalars:
            self._rank_scalars[rank] = np.array(rank, np.int64)
        return self._rank_scalars[rank]

    def _stack_values(self, first: int, last: int) -> list:
        """OrtValues over pool memory for slots first..last, made once per range and pool layout.

        Each is made from a numpy view whose base keeps the pool's buffer alive. Binding a ready
        OrtValue costs a fifth of ``bind_input`` with a raw pointer, so switching between cached
        adapters stays well under a millisecond even with hundreds of LoRA inputs.
        """
        import onnxruntime as ort

        if self._stack_generation != self.pool.generation:
            self._stack_cache.clear()
            self._stack_generation = self.pool.generation
        key = (first, last)
        if key not in self._stack_cache:
            values = []
            for index, site in enumerate(self.manifest.sites):
                values.append((site.a_name, ort.OrtValue.ortvalue_from_numpy(self.pool.a_view(index, first, last))))
                values.append((site.b_name, ort.OrtValue.ortvalue_from_numpy(self.pool.b_view(index, first, last))))
            self._stack_cache[key] = values
        return self._stack_cache[key]

    # -- steps -------------------------------------------------------------------------------
    def new_cache(self, batch: int, max_len: int, initial_len: int | None = None) -> KVCache:
        """A KV cache for ``batch`` rows, every row cleared (assigned)."""
        cache = KVCache(self.spec, batch, max_len, self.device, initial_len=initial_len)
        cache.clear_rows(range(batch))
        return cache

    def bind_logits(self, binding, positions: np.ndarray, buffer: np.ndarray | None = None) -> np.ndarray:
        """Bind ``logits_positions`` [batch, kept] and a host buffer [batch, kept, vocab] for the logits.

        Runs write into the buffer until another is bound. Pass the same contiguous ``positions``
        and ``buffer`` again to rebind without allocating (the caller keeps both alive: ORT reads
        and writes them in place).
        """
        import onnxruntime as ort

        positions = np.ascontiguousarray(positions, dtype=np.int64)
        self._bound_positions = positions  # ORT reads bound host arrays in place: keep it alive
        binding.bind_cpu_input(contract.LOGITS_POSITIONS, positions)
        if buffer is None:
            buffer = np.empty(positions.shape + (self.spec.vocab_size,), self.float_dtype)
        binding.bind_ortvalue_output(contract.LOGITS, ort.OrtValue.ortvalue_from_numpy(buffer))
        return buffer

    def run_step(self, binding, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> None:
        """One run; logits land in the buffer last bound with ``bind_logits``."""
        # The arrays stay referenced here until the run ends: ORT reads their memory in place.
        position_ids = np.ascontiguousarray(position_ids, dtype=np.int64)
        binding.bind_cpu_input(contract.INPUT_IDS, input_ids)
        binding.bind_cpu_input(contract.ATTENTION_MASK, attention_mask)
        binding.bind_cpu_input(contract.POSITION_IDS, position_ids)
        with runtime_failures("a model step"):
            self.session.run_with_iobinding(binding)
