"""The model step: one ORT session over lora_model.onnx; ``step(plan)`` runs one planned step.

The engine owns everything a run binds: the session, the IOBindings, the KV cache rows
(``open_rows``) and the adapter stack. A ``StepPlan`` says which rows run, the tokens each feeds,
where they go and which adapter slot each row uses; ``step`` returns the logits of each row's last
fed token. Which rows run, and when, is the scheduler's business (``scheduler.py``); bench and
the benchmarks call the same ``step``.

::

    StepPlan(first_row, token_ids, positions, slots) ──> step ──> logits [rows, kept, vocab]
        prefill: fresh prompts (positions 0), right-padded; rows cleared first
        decode:  one token per row at its own position; the binding is reused between steps

A step may mix adapters row by row, and a row may mix several with weights: the slots its rows
use are bound as one contiguous stack (a zero-copy view of the pool) and ``lora_tokens`` /
``lora_weights`` say which tokens each stack entry computes (``lora_routing.py``). A slot holds
``lora_chunk_rank`` rows; an adapter of higher rank takes several slots in a row, and its tokens
sum their results, so adapters of ranks 4 and 64 in one step cost their own ranks. The
graph computes logits only at ``logits_positions`` (each row's last token), never over the prompt.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgelora.errors import EdgeLoraError, UserInputError
from edgelora.formats import contract
from edgelora.formats.fingerprint import METADATA_KEY
from edgelora.formats.lora_manifest import LoraManifest
from edgelora.formats.model_spec import ModelSpec
from edgelora.runtime import native
from edgelora.runtime.adapter_cache import AdapterCache
from edgelora.runtime.config import EngineConfig
from edgelora.runtime.kv_cache import KVCache
from edgelora.runtime.lora_routing import RowAdapters, route, stack_entries
from edgelora.runtime.session import NUMPY_DTYPES, Device, make_session, runtime_failures


@dataclass
class StepPlan:
    """One model step over KV rows first_row..first_row+n-1 (vLLM's scheduler output, reduced to what a run needs)."""

    first_row: int
    token_ids: list[list[int]]  # per row: a whole prompt (prefill) or its one pending token (decode)
    positions: list[int]  # per row: where its first fed token goes (0: a fresh prompt; else its cache length)
    slots: list[int]  # per row: adapter slot (0: no adapter)
    every_position: bool = False  # logits of every fed token, not only the last (benchmarks/prefill_logits.py)
    mixes: list[RowAdapters | None] | None = None  # per row, a weighted mix of slots that replaces its slot
    started: bool = False  # every row was just given to its request by start_rows: fresh and cached-prefix rows mix

    def row_adapters(self) -> list[RowAdapters]:
        """Each row's (slot, weight) pairs: its mix, else its slot at weight 1, else none."""
        mixes = self.mixes or [None] * self.rows
        return [mix if mix is not None else (((slot, 1.0),) if slot else ())
                for slot, mix in zip(self.slots, mixes)]

    @property
    def rows(self) -> int:
        return len(self.token_ids)

    @property
    def is_prefill(self) -> bool:
        return all(position == 0 for position in self.positions)

    @property
    def is_decode(self) -> bool:
        return all(len(tokens) == 1 for tokens in self.token_ids) and not self.is_prefill

    def check(self) -> None:
        if not self.token_ids or len(self.positions) != self.rows or len(self.slots) != self.rows \
                or (self.mixes is not None and len(self.mixes) != self.rows):
            raise EdgeLoraError(f"a step plan needs one token list, position and slot per row "
                                f"({self.rows} / {len(self.positions)} / {len(self.slots)})")
        if not all(self.token_ids) or (not self.is_prefill and 0 in self.positions and not self.started):
            raise EdgeLoraError("a step runs fresh prompts, or tokens on top of every row's cache, not both")


class Engine:
    """One session with shared base weights, the adapter cache, the KV rows, and ``step``."""

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
        chunk_rank = min(self.config.lora_chunk_rank, self.config.max_lora_rank)
        self.pool = native.AdapterPool([(s.in_features, s.out_features) for s in self.manifest.sites],
                                       self.config.max_loras * -(-self.config.max_lora_rank // chunk_rank),
                                       chunk_rank, self.spec.dtype, self.device.kind)
        self.adapters = AdapterCache(self.pool, self.spec, self.manifest, self.config.max_lora_rank,
                                     self.config.host_loras, self.float_dtype,
                                     max_cpu_lora_bytes=self.config.max_cpu_lora_bytes)
        self._no_adapter = {site.a_name: np.zeros(contract.lora_a_shape(1, site.in_features, 0), self.float_dtype)
                            for site in self.manifest.sites}
        self._no_adapter.update({site.b_name: np.zeros(contract.lora_b_shape(1, 0, site.out_features), self.float_dtype)
                                 for site in self.manifest.sites})
        self._stack_cache: dict[tuple[int, int], list] = {}
        self._routing = None
        self._stack_generation = -1
        self.eos_ids = sorted(set(self.spec.eos_token_ids))
        self.pad_id = self.spec.pad_token_id if self.spec.pad_token_id is not None else 0
        self.kv: KVCache | None = None
        self.last_run_s = 0.0  # inside ONNX Runtime, the last run
        self._decode_binding = None
        self._decode_bound: tuple | None = None
        self._logits: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    # -- requests ------------------------------------------------------------------------------
    def check_prompt(self, prompt_ids: list[int], where: str) -> None:
        """Refuse a prompt the model cannot read: empty, or a token id outside the vocabulary."""
        if not prompt_ids:
            raise UserInputError(f"{where}: the prompt has no tokens")
        if any(not isinstance(t, int) or isinstance(t, bool) for t in prompt_ids) \
                or min(prompt_ids) < 0 or max(prompt_ids) >= self.spec.vocab_size:
            raise UserInputError(f"{where}: token id out of the vocabulary (0..{self.spec.vocab_size - 1})")

    # -- adapters ------------------------------------------------------------------------------
    def bind_adapters(self, binding, rows: list[RowAdapters], lengths: list[int]) -> None:
        """Bind the pool slots the rows use as one stack, and which tokens each entry computes.

        The stack is a zero-copy view of slots first..last of the pool; nothing is copied per step.
        ``lengths``: the tokens each row feeds this step.
        """
        rows, layout, available = stack_entries(rows, self.adapters.span, self.pool.num_slots)
        routing = route(rows, lengths, self.float_dtype, available)
        self._routing = routing  # ORT reads bound host arrays in place: keep them alive through the run
        binding.bind_cpu_input(contract.LORA_TOKENS, routing.tokens)
        binding.bind_cpu_input(contract.LORA_WEIGHTS, routing.weights)
        binding.bind_cpu_input(contract.LORA_BACK, routing.back)
        if not routing.first or self.pool.rank_capacity == 0:
            for name, empty in self._no_adapter.items():
                binding.bind_cpu_input(name, empty)
            return
        first, last = layout.slots(routing.first, routing.last)
        if self.device.kind == "cpu":
            for name, value in self._stack_values(first, last, layout.group):
                binding.bind_ortvalue_input(name, value)
        else:
            stack, rank = routing.last - routing.first + 1, self.pool.rank_capacity * layout.group
            for index, site in enumerate(self.manifest.sites):
                binding.bind_input(site.a_name, "cuda", self.device.index, self.float_dtype,
                                   list(contract.lora_a_shape(stack, site.in_features, rank)),
                                   self.pool.a_pointer(index, first, last))
                binding.bind_input(site.b_name, "cuda", self.device.index, self.float_dtype,
                                   list(contract.lora_b_shape(stack, rank, site.out_features)),
                                   self.pool.b_pointer(index, first, last))

    def _stack_values(self, first: int, last: int, group: int) -> list:
        """OrtValues over pool memory for slots first..last, ``group`` slots an entry, made once per
        range and pool layout.

        Each is made from a numpy view whose base keeps the pool's buffer alive. Binding a ready
        OrtValue costs a fifth of ``bind_input`` with a raw pointer, so switching between cached
        adapters stays well under a millisecond even with hundreds of LoRA inputs.
        """
        import onnxruntime as ort

        if self._stack_generation != self.pool.generation:
            self._stack_cache.clear()
            self._stack_generation = self.pool.generation
        key = (first, last, group)
        if key not in self._stack_cache:
            values, stack, rank = [], (last - first + 1) // group, self.pool.rank_capacity * group
            for index, site in enumerate(self.manifest.sites):
                a = self.pool.a_view(index, first, last).reshape(contract.lora_a_shape(stack, site.in_features, rank))
                b = self.pool.b_view(index, first, last).reshape(contract.lora_b_shape(stack, rank, site.out_features))
                values.append((site.a_name, ort.OrtValue.ortvalue_from_numpy(a)))
                values.append((site.b_name, ort.OrtValue.ortvalue_from_numpy(b)))
            self._stack_cache[key] = values
        return self._stack_cache[key]

    # -- rows and steps ------------------------------------------------------------------------
    def open_rows(self, rows: int, max_len: int, initial_len: int | None = None) -> KVCache:
        """The KV rows every later step runs on, all cleared (a new set replaces the previous one)."""
        self.kv = KVCache(self.spec, rows, max_len, self.device, initial_len=initial_len)
        self.kv.clear_rows(range(rows))
        self._decode_binding, self._decode_bound = None, None
        return self.kv

    def move_row(self, source: int, target: int) -> None:
        """Copy KV row ``source`` over ``target`` (the scheduler keeps live rows packed at the front)."""
        self._rows().move_row(source, target)

    def start_rows(self, rows: list[int], prefixes: list[list[np.ndarray]], positions: int = 0) -> None:
        """Rows given to new requests: each cleared, then its cached prefix blocks (prefix_cache.py) copied
        in from position 0; a step then feeds each row from the end of its prefix on. ``positions``: room
        the coming step needs (reserved now: growing after the copy would copy the rows again)."""
        cache = self._rows()
        cache.reserve(max([positions] + [sum(block.shape[2] for block in blocks) for blocks in prefixes]))
        cache.clear_rows(rows)
        for row, blocks in zip(rows, prefixes):
            if blocks:
                cache.write_positions(row, 0, blocks)

    def read_prefix(self, row: int, start: int, stop: int) -> np.ndarray:
        """A copy of one row's KV at positions [start, stop) (a block for the prefix cache)."""
        return self._rows().read_positions(row, start, stop)

    def shrink_rows(self, positions: int) -> None:
        """Give host KV memory back when the live rows need at most ``positions`` positions."""
        if self.kv is not None:
            self.kv.shrink(positions)

    def step(self, plan: StepPlan) -> np.ndarray:
        """Run one planned step; the logits [rows, kept, vocab] are valid until the next step."""
        plan.check()
        if plan.is_prefill:
            return self._prefill(plan)
        return self._decode(plan) if plan.is_decode else self._extend(plan)

    def _rows(self) -> KVCache:
        if self.kv is None:
            raise EdgeLoraError("no KV rows: call open_rows first")
        return self.kv

    def _prefill(self, plan: StepPlan) -> np.ndarray:
        """Fresh prompts into rows first..first+n-1, cleared first, right-padded to the longest."""
        cache = self._rows()
        cache.reserve(max(len(tokens) for tokens in plan.token_ids))
        cache.clear_rows(range(plan.first_row, plan.first_row + plan.rows))
        return self._extend(plan)

    def _extend(self, plan: StepPlan) -> np.ndarray:
        """Several tokens per row at its positions (a prompt, or its next chunk on top of the row's cache),
        right-padded to the longest.

        Padding tokens write keys past their row's length, which later tokens overwrite; the mask
        never lets a real token see them.
        """
        cache, count, first = self._rows(), plan.rows, plan.first_row
        starts = np.array(plan.positions, np.int64)
        lengths = np.array([len(tokens) for tokens in plan.token_ids], np.int64)
        width = int(lengths.max())
        ends = starts + lengths
        cache.reserve(int(starts.max()) + width)
        binding = self.session.io_binding()
        cache.bind_rows(binding, first, first + count)
        self.bind_adapters(binding, plan.row_adapters(), lengths.tolist())
        input_ids = np.full((count, width), self.pad_id, np.int64)
        for index, tokens in enumerate(plan.token_ids):
            input_ids[index, : lengths[index]] = tokens
        attention_mask = (np.arange(int(ends.max()))[None, :] < ends[:, None]).astype(np.int64)
        position_ids = starts[:, None] + np.arange(width, dtype=np.int64)[None, :]
        kept = position_ids - starts[:, None] if plan.every_position else (lengths - 1).reshape(count, 1)
        logits = self.bind_logits(binding, kept)
        self.run_step(binding, input_ids, attention_mask, position_ids)
        cache.note_written(first, starts + width)
        return logits

    def _decode(self, plan: StepPlan) -> np.ndarray:
        """One token per row, each at its own position; the binding and logits buffer are reused."""
        cache, count, first = self._rows(), plan.rows, plan.first_row
        totals = np.array(plan.positions, np.int64)  # the fed token goes at position total
        width = int(totals.max()) + 1
        changed = cache.reserve(width)
        if self._decode_binding is None:
            self._decode_binding = self.session.io_binding()
        binding = self._decode_binding
        if changed or self._decode_bound != (first, count, cache.generation):
            cache.bind_rows(binding, first, first + count)
            self._decode_bound = (first, count, cache.generation)
        positions, logits = self._logits_buffers(count)
        self.bind_logits(binding, positions, logits)
        self.bind_adapters(binding, plan.row_adapters(), [1] * count)
        attention_mask = (np.arange(width)[None, :] <= totals[:, None]).astype(np.int64)
        input_ids = np.array(plan.token_ids, np.int64)
        self.run_step(binding, input_ids, attention_mask, totals.reshape(count, 1))
        cache.note_written(first, totals + 1)
        return logits

    def _logits_buffers(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """logits_positions zeros [n, 1] and a logits buffer [n, 1, vocab], made once per row count."""
        if count not in self._logits:
            self._logits[count] = (np.zeros((count, 1), np.int64),
                                   np.empty((count, 1, self.spec.vocab_size), self.float_dtype))
        return self._logits[count]

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
        started = time.perf_counter()
        with runtime_failures("a model step"):
            self.session.run_with_iobinding(binding)
        self.last_run_s = time.perf_counter() - started
