"""The generation engine: one ORT session over lora_model.onnx, adapter slots bound per batch.

A batch may mix adapters row by row: the slots its rows use are bound as one contiguous stack
(a zero-copy view of the pool) and ``lora_index`` routes each row; base rows get index 0. The
graph computes logits only at ``logits_positions`` (each row's last token), never over the prompt.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgelora import contract
from edgelora.errors import UserInputError
from edgelora.fingerprint import METADATA_KEY
from edgelora.lora_manifest import LoraManifest
from edgelora.model_spec import ModelSpec
from edgelora.runtime import native
from edgelora.runtime.adapter_cache import AdapterCache
from edgelora.runtime.kv_cache import KVCache
from edgelora.runtime.session import NUMPY_DTYPES, Device, make_session, runtime_failures


@dataclass
class EngineConfig:
    """Sizes fixed when the engine starts (TensorRT-LLM's LoraConfig words)."""

    max_lora_rank: int = contract.MAX_LORA_RANK
    max_loras: int = 8  # adapter slots ready for a batch
    max_cpu_loras: int = 16  # adapters kept ready in host memory (converted, one copy from a slot)
    max_batch_size: int = 8
    device: str = "cpu"
    num_threads: int | None = None
    # Positions a host KV cache holds beyond the prompt at first; it doubles when a step needs more.
    kv_cache_headroom: int = 128

    def validate(self) -> None:
        problems = []
        if not 1 <= self.max_lora_rank <= contract.MAX_LORA_RANK:
            problems.append(f"max_lora_rank {self.max_lora_rank} (1..{contract.MAX_LORA_RANK})")
        if self.max_loras < 1:
            problems.append(f"max_loras {self.max_loras} (>= 1)")
        if self.max_cpu_loras < self.max_loras:
            problems.append(f"max_cpu_loras {self.max_cpu_loras} (>= max_loras)")
        if self.max_batch_size < 1:
            problems.append(f"max_batch_size {self.max_batch_size} (>= 1)")
        if self.kv_cache_headroom < 1:
            problems.append(f"kv_cache_headroom {self.kv_cache_headroom} (>= 1)")
        if problems:
            raise UserInputError("invalid engine settings: " + "; ".join(problems))


@dataclass
class RowRequest:
    """One row of a batch: prompt ids, its adapter (None: base) and how to sample."""

    prompt_ids: list[int]
    adapter: str | None = None
    max_tokens: int = 256  # tokens to generate at most
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False  # benchmarks: always generate max_tokens


@dataclass
class RowResult:
    output_ids: list[int]
    finish_reason: str  # "stop" | "length"


@dataclass
class BatchTimings:
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    step_s: list[float] = field(default_factory=list)


class Engine:
    """Runs batches of rows to completion on one session with shared base weights."""

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
        self._float = NUMPY_DTYPES[self.spec.dtype]
        self.pool = native.AdapterPool([(s.in_features, s.out_features) for s in self.manifest.sites],
                                       self.config.max_loras, self.config.max_lora_rank, self.spec.dtype,
                                       self.device.kind)
        self.adapters = AdapterCache(self.pool, self.spec, self.manifest, self.config.max_lora_rank,
                                     self.config.max_cpu_loras, self._float)
        self._no_adapter = {site.a_name: np.zeros(contract.lora_a_shape(1, site.in_features, 0), self._float)
                            for site in self.manifest.sites}
        self._no_adapter.update({site.b_name: np.zeros(contract.lora_b_shape(1, 0, site.out_features), self._float)
                                 for site in self.manifest.sites})
        self._stack_cache: dict[tuple[int, int], list] = {}
        self._rank_scalars: dict[int, np.ndarray] = {}
        self._stack_generation = -1
        self._eos = set(self.spec.eos_token_ids)
        self._pad_id = self.spec.pad_token_id if self.spec.pad_token_id is not None else 0

    # -- requests ------------------------------------------------------------------------------
    def check_request(self, row: RowRequest, where: str) -> None:
        """Refuse a request the model cannot hold: prompt + max tokens beyond its positions."""
        if not row.prompt_ids:
            raise UserInputError(f"{where}: the prompt has no tokens")
        if min(row.prompt_ids) < 0 or max(row.prompt_ids) >= self.spec.vocab_size:
            raise UserInputError(f"{where}: token id out of the vocabulary (0..{self.spec.vocab_size - 1})")
        limit = self.spec.max_position_embeddings
        if limit and len(row.prompt_ids) + row.max_tokens > limit:
            raise UserInputError(f"{where}: prompt ({len(row.prompt_ids)} tokens) + max tokens ({row.max_tokens}) "
                                 f"exceeds the model's {limit} positions")

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
                binding.bind_input(site.a_name, "cuda", self.device.index, self._float,
                                   list(contract.lora_a_shape(stack, site.in_features, rank)),
                                   self.pool.a_pointer(index, first, last))
                binding.bind_input(site.b_name, "cuda", self.device.index, self._float,
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

    # -- generation ----------------------------------------------------------------------------
    def generate(self, rows: list[RowRequest], timings: BatchTimings | None = None) -> list[RowResult]:
        """Prefill all rows at once (right-padded), then decode until every row stops."""
        if not rows or len(rows) > self.config.max_batch_size:
            raise UserInputError(f"a batch needs 1..{self.config.max_batch_size} rows, got {len(rows)}")
        for index, row in enumerate(rows):
            self.check_request(row, f"row {index}")
        timings = timings if timings is not None else BatchTimings()
        names = [row.adapter for row in rows if row.adapter]
        slot_of = self.adapters.acquire(names)
        try:
            return self._run(rows, [slot_of[row.adapter] if row.adapter else 0 for row in rows], timings)
        finally:
            self.adapters.release(names)

    def new_cache(self, batch: int, max_len: int, initial_len: int | None = None) -> KVCache:
        """A KV cache for ``batch`` rows, every row cleared (assigned)."""
        cache = KVCache(self.spec, batch, max_len, self.device, initial_len=initial_len)
        cache.clear_rows(range(batch))
        return cache

    def _run(self, rows: list[RowRequest], slots: list[int], timings: BatchTimings) -> list[RowResult]:
        batch = len(rows)
        lengths = np.array([len(row.prompt_ids) for row in rows], np.int64)
        budget = np.array([row.max_tokens for row in rows], np.int64)
        prompt_len = int(lengths.max())
        max_len = int((lengths + budget).max())  # each row's own prompt + its own budget
        samplers = [native.Sampler(row.seed if row.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
                    for row in rows]
        temperature = [float(row.temperature) for row in rows]
        top_k = [int(row.top_k) for row in rows]
        top_p = [float(row.top_p) for row in rows]

        binding = self.session.io_binding()
        cache = self.new_cache(batch, max_len, initial_len=prompt_len + self.config.kv_cache_headroom)
        cache.bind(binding)
        lora_index = self.bind_adapters(binding, slots)
        binding.bind_cpu_input(contract.LORA_INDEX, lora_index)

        input_ids = np.full((batch, prompt_len), self._pad_id, np.int64)
        for i, row in enumerate(rows):
            input_ids[i, : lengths[i]] = row.prompt_ids
        attention_mask = (np.arange(prompt_len)[None, :] < lengths[:, None]).astype(np.int64)
        position_ids = np.tile(np.arange(prompt_len, dtype=np.int64), (batch, 1))
        started = time.perf_counter()
        logits = self.bind_logits(binding, (lengths - 1).reshape(batch, 1))
        self.run_step(binding, input_ids, attention_mask, position_ids)
        tokens = native.sample_batch(np.ascontiguousarray(logits[:, 0], dtype=np.float32), samplers, temperature,
                                     top_k, top_p)
        timings.prefill_s += time.perf_counter() - started
        timings.prompt_tokens += int(lengths.sum())

        outputs: list[list[int]] = [[] for _ in rows]
        finish: list[str | None] = [None] * batch
        totals = lengths.copy()  # tokens in each row's cache
        logits = self.bind_logits(binding, np.zeros((batch, 1), np.int64))
        while True:
            for i in range(batch):
                if finish[i] is None:
                    token = int(tokens[i])
                    outputs[i].append(token)
                    if token in self._eos and not rows[i].ignore_eos:
                        finish[i] = "stop"
                    elif len(outputs[i]) >= budget[i]:
                        finish[i] = "length"
            if all(finish):
                break
            step_started = time.perf_counter()
            # Only live rows advance; a finished row rewrites its last position until the batch ends,
            # so no row ever needs more than its own prompt + budget.
            totals += np.array([reason is None for reason in finish], np.int64)
            width = int(totals.max())
            cache.reserve(width, binding)
            attention_mask = (np.arange(width)[None, :] < totals[:, None]).astype(np.int64)
            self.run_step(binding, np.ascontiguousarray(tokens, dtype=np.int64).reshape(batch, 1), attention_mask,
                          (totals - 1).reshape(batch, 1))
            tokens = native.sample_batch(np.ascontiguousarray(logits[:, 0], dtype=np.float32), samplers,
                                         temperature, top_k, top_p)
            elapsed = time.perf_counter() - step_started
            timings.decode_s += elapsed
            timings.decode_steps += 1
            timings.step_s.append(elapsed)
        timings.generated_tokens += sum(len(o) for o in outputs)
        return [RowResult(out, reason) for out, reason in zip(outputs, finish)]

    def bind_logits(self, binding, positions: np.ndarray) -> np.ndarray:
        """Bind ``logits_positions`` [batch, kept] and a host buffer [batch, kept, vocab] for the logits.

        Runs write into the buffer until another is bound: once for the prefill, once for decode.
        """
        import onnxruntime as ort

        positions = np.ascontiguousarray(positions, dtype=np.int64)
        self._bound_positions = positions  # ORT reads bound host arrays in place: keep it alive
        binding.bind_cpu_input(contract.LOGITS_POSITIONS, positions)
        buffer = np.empty(positions.shape + (self.spec.vocab_size,), self._float)
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
