"""The runtime's settings and their defaults, defined once.

``EngineConfig`` (adapter capacity, device, threads) and ``SchedulerConfig`` (rows, context,
queue) are the one home of every default: the Python API (``LoraConfig``, ``LLM``), ``serve``'s
options and flags, ``infer``, ``chat``, ``bench`` and the Ray replicas read them from here. A
light module (no numpy, no ONNX Runtime), so the CLI can build its flags from it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from edgelora.errors import UserInputError
from edgelora.formats import contract

MIN_HOST_LORAS = 16  # the default max_cpu_loras is max(MIN_HOST_LORAS, max_loras)
ADAPTER_LABELS = 100  # adapters with metric series of their own in serve; later ones are counted as "other"
PREFIX_CACHE_BYTES = 512 * 2**20  # host memory for cached prompt KV: ~21k tokens of the 0.5B bench model
STEP_TOKENS = 256  # the default step budget: a chunk then takes about 1 s at a 1k context (int4 0.5B, 2 cores)


SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "k": 2**10, "m": 2**20, "g": 2**30, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """Bytes from '2GiB', '512MB', '1.5G' (binary for K/M/G and KiB.., decimal for kB/MB/GB) or a plain number."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in SIZE_UNITS or float(match.group(1)) <= 0:
        raise UserInputError(f"size {text!r}: expected a positive number with an optional unit (2GiB, 512MB, 1G)")
    return int(float(match.group(1)) * SIZE_UNITS[unit])


@dataclass(kw_only=True)  # built by keyword only: a field added anywhere cannot shift the others
class EngineConfig:
    """Sizes fixed when the engine starts (TensorRT-LLM's LoraConfig words).

    The one home of these defaults: the Python API's ``LoraConfig``, ``serve``'s options and
    flags, ``infer``, ``chat``, ``bench`` and Ray read them from here.
    """

    max_lora_rank: int = contract.MAX_LORA_RANK
    # adapter slots ready for a batch: room for max_loras adapters of max_lora_rank; adapters of lower rank share it
    # (at rank 64, 8 holds 32 rank-16 adapters), so more distinct adapters run at once in the same memory
    max_loras: int = 8
    max_cpu_loras: int | None = None  # adapters kept host-ready in memory; None: max(16, max_loras)
    max_cpu_lora_bytes: int | None = None  # and at most this many bytes of them (file precision); None: no bound
    # Rows of one adapter pool slot: an adapter of rank r takes ceil(r / lora_chunk_rank) slots, so a step
    # mixing ranks 4 and 64 computes each at about its own rank instead of padding every adapter to 64.
    lora_chunk_rank: int = 16
    device: str = "cpu"
    num_threads: int | None = None  # None: every core

    @property
    def host_loras(self) -> int:
        """``max_cpu_loras`` with its default filled in (never below the slots it feeds)."""
        return self.max_cpu_loras if self.max_cpu_loras is not None else max(MIN_HOST_LORAS, self.max_loras)

    def validate(self) -> None:
        problems = []
        if not 1 <= self.max_lora_rank <= contract.MAX_LORA_RANK:
            problems.append(f"max_lora_rank {self.max_lora_rank} (1..{contract.MAX_LORA_RANK})")
        if not 1 <= self.lora_chunk_rank <= contract.MAX_LORA_RANK:
            problems.append(f"lora_chunk_rank {self.lora_chunk_rank} (1..{contract.MAX_LORA_RANK})")
        if self.max_loras < 1:
            problems.append(f"max_loras {self.max_loras} (>= 1)")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            problems.append(f"max_cpu_loras {self.max_cpu_loras} (>= max_loras {self.max_loras})")
        if self.max_cpu_lora_bytes is not None and self.max_cpu_lora_bytes < 1:
            problems.append(f"max_cpu_lora_bytes {self.max_cpu_lora_bytes} (>= 1)")
        if self.num_threads is not None and self.num_threads < 1:
            problems.append(f"num_threads {self.num_threads} (>= 1)")
        if problems:
            raise UserInputError("invalid engine settings: " + "; ".join(problems))


@dataclass(kw_only=True)  # built by keyword only: a field added anywhere cannot shift the others
class SchedulerConfig:
    """Sizes of the persistent batch (vLLM's names)."""

    max_num_seqs: int = 8  # rows decoded together
    max_model_len: int | None = None  # prompt + generated tokens per request; None: the model's positions
    max_waiting: int | None = None  # queued requests beyond the running ones; None: unbounded
    # Tokens a step may feed (vLLM's name): a longer prompt is prefilled in chunks of this many tokens,
    # alternating with decode steps of the running rows. None: max(STEP_TOKENS, max_num_seqs); 0: no limit
    # (a whole prompt in one step, every running row waiting for it).
    max_num_batched_tokens: int | None = None
    # Positions a host KV cache holds at first; it doubles when a step needs more.
    kv_cache_initial_len: int = 256
    # A waiting request whose adapter is neither in a slot nor host-ready has it read on a worker thread
    # (runtime/prefetch.py) and is admitted once it is in; False: the step reads it (every row waits).
    prefetch_adapters: bool = True
    # Automatic prefix caching (runtime/prefix_cache.py): the KV of full prompt blocks is kept after a prefill
    # and copied into later rows whose prompt starts the same way under the same adapter version(s) and
    # cache salt (serve: the tenant), so they prefill only the rest. Host KV (CPU) only.
    enable_prefix_caching: bool = True
    prefix_cache_bytes: int = PREFIX_CACHE_BYTES
    prefix_block_tokens: int = 32  # tokens per cached block: a hit is a whole number of blocks

    @property
    def step_tokens(self) -> int | None:
        """The step budget in tokens, None when there is none."""
        if self.max_num_batched_tokens is None:
            return max(STEP_TOKENS, self.max_num_seqs)
        return self.max_num_batched_tokens or None

    def validate(self) -> None:
        problems = []
        if self.max_num_seqs < 1:
            problems.append(f"max_num_seqs {self.max_num_seqs} (>= 1)")
        if self.max_model_len is not None and self.max_model_len < 2:
            problems.append(f"max_model_len {self.max_model_len} (>= 2)")
        budget = self.max_num_batched_tokens
        if budget is not None and (budget < 0 or 0 < budget < self.max_num_seqs):
            problems.append(f"max_num_batched_tokens {self.max_num_batched_tokens} "
                            f"(0 for no limit, else >= max_num_seqs {self.max_num_seqs})")
        if self.max_waiting is not None and self.max_waiting < 0:
            problems.append(f"max_waiting {self.max_waiting} (>= 0)")
        if self.prefix_cache_bytes < 1:
            problems.append(f"prefix_cache_bytes {self.prefix_cache_bytes} (>= 1)")
        if self.prefix_block_tokens < 1:
            problems.append(f"prefix_block_tokens {self.prefix_block_tokens} (>= 1)")
        if self.kv_cache_initial_len < 1:
            problems.append(f"kv_cache_initial_len {self.kv_cache_initial_len} (>= 1)")
        if problems:
            raise UserInputError("invalid scheduler settings: " + "; ".join(problems))
