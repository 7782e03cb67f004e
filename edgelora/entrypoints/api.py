"""The public Python surface, shaped like TensorRT-LLM's: LLM, LoraConfig, LoRARequest, SamplingParams.

    from edgelora import LLM, LoraConfig, LoRARequest, SamplingParams
    llm = LLM("llm_onnx", lora_config=LoraConfig(max_lora_rank=64, max_loras=8, max_cpu_loras=16))
    outputs = llm.generate(prompts, SamplingParams(max_tokens=64),
                           lora_request=[LoRARequest("french", 1, "llm_onnx/lora_weights/french"), None])
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from edgelora.errors import UserInputError
from edgelora.formats.processed_adapter import resolve_adapter_path
from edgelora.runtime.config import EngineConfig, SchedulerConfig
from edgelora.runtime.engine import Engine
from edgelora.runtime.sampling import SamplingParams
from edgelora.runtime.scheduler import GenerationRequest, Scheduler
from edgelora.runtime.tokenizer import ChatTokenizer

# A prompt is raw text, a chat (list of {"role", "content"}), or token ids.
Prompt = str | list[dict] | list[int]


@dataclass
class LoraConfig:
    """Adapter capacity of an LLM: rank limit, slots for a batch, adapters kept ready in host memory.

    Every adapter the LLM is given stays known by name; ``max_loras`` sizes the slots a batch
    binds (room for that many adapters of ``max_lora_rank``; lower ranks share it, so more of them
    run at once), ``max_cpu_loras`` (and ``max_cpu_lora_bytes``) the adapters held host-ready, at their
    file's precision. Beyond both, an adapter is read again from its file on next use.
    """

    lora_dir: list[str] = field(default_factory=list)  # processed adapters registered at start (name = folder name)
    max_lora_rank: int = EngineConfig.max_lora_rank
    max_loras: int = EngineConfig.max_loras
    max_cpu_loras: int | None = EngineConfig.max_cpu_loras  # None: max(16, max_loras); never below max_loras
    max_cpu_lora_bytes: int | None = EngineConfig.max_cpu_lora_bytes  # host-ready bytes (file precision); None: no bound
    lora_chunk_rank: int = EngineConfig.lora_chunk_rank  # rows of a pool slot; a higher rank takes several slots


@dataclass(frozen=True)
class LoRARequest:
    """Which adapter a prompt uses: a name, a numeric id, and the processed adapter's folder or file."""

    lora_name: str
    lora_int_id: int
    lora_path: str

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def path(self) -> str:
        return self.lora_path


@dataclass
class CompletionOutput:
    text: str
    token_ids: list[int]
    finish_reason: str


@dataclass
class RequestOutput:
    request_id: int
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    lora_name: str | None
    lora_mix: dict[str, float] | None = None  # the weighted mix the prompt used, if any

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str:
        return self.outputs[0].finish_reason


@dataclass
class GenerationStats:
    """Figures of the last ``generate`` call."""

    total_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_steps: int = 0
    decode_steps: int = 0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.generated_tokens / self.total_s if self.total_s else 0.0


class LLM:
    """One base model in ONNX Runtime serving any number of LoRA adapters, mixed in every step.

    ``generate`` runs on the same step scheduler as the server: every prompt is submitted, rows
    join as others finish, and the call returns when all are done.
    """

    def __init__(self, model: str | Path, lora_config: LoraConfig | None = None,
                 max_batch_size: int = SchedulerConfig.max_num_seqs,
                 device: str = "cpu", num_threads: int | None = None, max_model_len: int | None = None,
                 max_num_batched_tokens: int | None = SchedulerConfig.max_num_batched_tokens,
                 enable_prefix_caching: bool = SchedulerConfig.enable_prefix_caching,
                 prefix_cache_bytes: int = SchedulerConfig.prefix_cache_bytes):
        lora_config = lora_config or LoraConfig()
        self.engine = Engine(Path(model), EngineConfig(
            max_lora_rank=lora_config.max_lora_rank, max_loras=lora_config.max_loras,
            max_cpu_loras=lora_config.max_cpu_loras, max_cpu_lora_bytes=lora_config.max_cpu_lora_bytes,
            lora_chunk_rank=lora_config.lora_chunk_rank, device=device,
            num_threads=num_threads))
        self.tokenizer = ChatTokenizer(Path(model))
        self.scheduler = Scheduler(self.engine, SchedulerConfig(max_num_seqs=max_batch_size, max_model_len=max_model_len,
                                                                max_num_batched_tokens=max_num_batched_tokens,
                                                                enable_prefix_caching=enable_prefix_caching,
                                                                prefix_cache_bytes=prefix_cache_bytes),
                                   self.tokenizer)
        self.stats = GenerationStats()
        for path in lora_config.lora_dir:
            self.engine.adapters.add(Path(path).name, Path(path))

    def add_lora(self, request: LoRARequest) -> None:
        """Register (validate) an adapter ahead of use; files that changed since make a new version of the name."""
        self.engine.adapters.add(request.lora_name, Path(request.lora_path))

    def _use_lora(self, request: LoRARequest) -> None:
        """Register the adapter unless its name already stands for that path (``add_lora`` re-reads the files)."""
        adapters = self.engine.adapters
        if request.lora_name in adapters:
            _, weights = resolve_adapter_path(Path(request.lora_path))
            if adapters.get(request.lora_name).weights.resolve() == weights.resolve():
                return
        self.add_lora(request)

    def _prompt_ids(self, prompt: Prompt, where: str) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
            ids = self.tokenizer.prompt_ids(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            ids = list(prompt)
        else:
            raise UserInputError(f"{where}: expected text, a non-empty list of messages, or token ids")
        if not ids:
            raise UserInputError(f"{where}: encodes to no tokens")
        return ids

    def generate(self, prompts: Prompt | list[Prompt], sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 lora_request: LoRARequest | list[LoRARequest | None] | None = None, *,
                 lora_mix: dict[str, float] | list[dict[str, float] | None] | None = None,
                 labels: list[str] | None = None) -> list[RequestOutput]:
        """Generate for every prompt; ``lora_request`` gives one adapter (or None) per prompt.

        ``lora_mix`` gives a prompt several registered adapters with weights instead, e.g.
        ``{"a": 0.7, "b": -0.3}``: its update is Σ wᵢ · (adapter i's own update). Every prompt is
        checked (sampling, adapter, mix, length) before any work starts; errors name the prompt by
        ``labels[i]`` (default ``prompt i``).
        """
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], (dict, int))):
            prompts = [prompts]
        count = len(prompts)
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params or SamplingParams()] * count
        requests = lora_request if isinstance(lora_request, list) else [lora_request] * count
        mixes = lora_mix if isinstance(lora_mix, list) else [lora_mix] * count
        labels = labels or [f"prompt {index}" for index in range(count)]
        if len(params) != count or len(requests) != count or len(mixes) != count or len(labels) != count:
            raise UserInputError(f"{count} prompts but {len(params)} sampling params, {len(requests)} LoRA requests "
                                 f"and {len(mixes)} LoRA mixes")
        rows = []
        paths: dict[str, Path] = {}
        for prompt, param, request, mix, where in zip(prompts, params, requests, mixes, labels):
            param.validate(where)
            if request is not None and mix is not None:
                raise UserInputError(f"{where}: give a lora_request or a lora_mix, not both")
            if request is not None:
                path = Path(request.lora_path).resolve()
                if paths.setdefault(request.lora_name, path) != path:
                    raise UserInputError(f"{where}: adapter {request.lora_name!r} names {request.lora_path}, but an "
                                         f"earlier prompt of this call names {paths[request.lora_name]}")
                try:
                    self._use_lora(request)
                except UserInputError as exc:
                    raise type(exc)(f"{where} (adapter {request.lora_name!r}): {exc}") from exc
            rows.append(GenerationRequest(self._prompt_ids(prompt, where), request.lora_name if request else None,
                                          replace(param, stop=list(param.stop)), mix))
        before = copy.copy(self.scheduler.stats)
        started = time.perf_counter()
        finished = self.scheduler.run_to_completion(rows, labels)
        after = self.scheduler.stats
        self.stats = GenerationStats(time.perf_counter() - started, after.prefill_s - before.prefill_s,
                                     after.decode_s - before.decode_s, after.prompt_tokens - before.prompt_tokens,
                                     after.generated_tokens - before.generated_tokens,
                                     after.prefill_steps - before.prefill_steps, after.decode_steps - before.decode_steps)
        return [RequestOutput(index, result.prompt_ids, [CompletionOutput(result.text, result.output_ids,
                                                                          result.finish_reason)],
                              request.lora_name if request else None, dict(mix) if mix is not None else None)
                for index, (result, request, mix) in enumerate(zip(finished, requests, mixes))]
