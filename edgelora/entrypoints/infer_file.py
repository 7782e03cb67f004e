"""``edgelora infer``: TensorRT Edge-LLM's input file in, a responses file out.

Everything is checked before any generation starts: the output location, the input file, each
adapter a request names (by registering it with the engine: one validation path) and each
request's length. The output is written through a temporary file and a rename, so a failed run
leaves no output file.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from edgelora.entrypoints.api import LLM, LoraConfig, LoRARequest, SamplingParams
from edgelora.errors import UserInputError
from edgelora.formats import contract
from edgelora.formats.fileio import check_writable_file, write_text_atomic
from edgelora.runtime.config import EngineConfig, SchedulerConfig
from edgelora.runtime.grammar import spec_from_fields
from edgelora.runtime.lora_mix import LoraMix, check_mix, duplicate_mix_names

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "max_generate_length", "seed")
DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 50, "max_generate_length": 256, "seed": None}
# Every field an input file may hold; any other is refused by name (never silently ignored). TensorRT
# Edge-LLM's own input files carry batch_size (a batching hint: --max-batch-size decides here, the answers
# do not change) and apply_chat_template / add_generation_prompt, accepted at their default, true.
TOP_FIELDS = {"available_lora_weights", "requests", "batch_size", "apply_chat_template", "add_generation_prompt",
              *SAMPLING_FIELDS}
REQUEST_FIELDS = {"messages", "lora_name", "lora_mix", "response_format", "structured_outputs", *SAMPLING_FIELDS}
ONLY_DEFAULT = {"apply_chat_template": True, "add_generation_prompt": True}


def _check_fields(raw: dict, allowed: set[str], where: str) -> None:
    for name, value in raw.items():
        if name not in allowed:
            raise UserInputError(f"{where}: unknown field {name!r} (expected some of {', '.join(sorted(allowed))})")
        if name in ONLY_DEFAULT and value != ONLY_DEFAULT[name]:
            raise UserInputError(f"{where}: {name} {value!r} is not supported (prompts always go through the "
                                 "model's chat template with the generation prompt)")


@dataclass(kw_only=True)  # built by keyword only: a field added anywhere cannot shift the others
class InferOptions:
    onnx_dir: Path
    input_file: Path
    output_file: Path
    max_lora_rank: int = EngineConfig.max_lora_rank
    max_batch_size: int = SchedulerConfig.max_num_seqs
    max_num_batched_tokens: int | None = SchedulerConfig.max_num_batched_tokens  # None: the default rule; 0: no limit
    device: str = "cpu"
    num_threads: int | None = None
    enable_prefix_caching: bool = SchedulerConfig.enable_prefix_caching


@dataclass
class JobRequest:
    messages: list[dict]
    lora_name: str | None
    sampling: SamplingParams
    lora_mix: LoraMix | None = None  # names of available_lora_weights with weights


@dataclass
class InferJob:
    adapters: dict[str, Path]
    requests: list[JobRequest]


def _sampling(source: dict, defaults: dict, where: str) -> SamplingParams:
    values = {key: source.get(key, defaults[key]) for key in SAMPLING_FIELDS}
    for key in ("top_k", "max_generate_length", "seed"):
        if isinstance(values[key], bool) or (values[key] is not None and not isinstance(values[key], int)):
            raise UserInputError(f"{where}: {key} must be an integer, got {values[key]!r}")
    for key in ("temperature", "top_p"):
        if isinstance(values[key], bool) or not isinstance(values[key], (int, float)):
            raise UserInputError(f"{where}: {key} must be a number, got {values[key]!r}")
    params = SamplingParams(max_tokens=values["max_generate_length"], temperature=float(values["temperature"]),
                            top_k=values["top_k"], top_p=float(values["top_p"]), seed=values["seed"])
    params.validate(where)
    return params


def _messages(raw, where: str) -> list[dict]:
    if not isinstance(raw, list) or not raw:
        raise UserInputError(f"{where}: 'messages' must be a non-empty list")
    for position, message in enumerate(raw):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or "content" not in message:
            raise UserInputError(f"{where}: messages[{position}] needs a 'role' and a 'content'")
    return raw


def read_input_file(path: Path) -> InferJob:
    """Parse and check the structure of an input file (adapters are checked against the model later)."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"--input-file {path}: no such file")
    try:
        raw = json.loads(path.read_text(), object_pairs_hook=duplicate_mix_names)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserInputError(f"--input-file {path}: malformed JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise UserInputError(f"--input-file {path}: expected a JSON object with 'requests'")
    _check_fields(raw, TOP_FIELDS, f"--input-file {path}")
    adapters_raw = raw.get("available_lora_weights") or {}
    if not isinstance(adapters_raw, dict) or not all(isinstance(v, str) for v in adapters_raw.values()):
        raise UserInputError(f"--input-file {path}: 'available_lora_weights' must map names to paths")
    adapters = {}
    for name, adapter_path in adapters_raw.items():
        candidate = Path(adapter_path)
        adapters[name] = candidate if candidate.is_absolute() else (path.parent / candidate)
    requests_raw = raw.get("requests")
    if not isinstance(requests_raw, list) or not requests_raw:
        raise UserInputError(f"--input-file {path}: 'requests' must be a non-empty list")
    defaults = _sampling(raw, DEFAULTS, "top level")
    defaults_dict = {"temperature": defaults.temperature, "top_p": defaults.top_p, "top_k": defaults.top_k,
                     "max_generate_length": defaults.max_tokens, "seed": defaults.seed}
    requests = []
    for index, request in enumerate(requests_raw):
        where = f"requests[{index}]"
        if not isinstance(request, dict):
            raise UserInputError(f"{where}: expected an object with 'messages'")
        _check_fields(request, REQUEST_FIELDS, where)
        lora_name = request.get("lora_name") or None
        known = ", ".join(sorted(adapters)) or "none"
        if lora_name is not None and (not isinstance(lora_name, str) or lora_name not in adapters):
            raise UserInputError(f"{where}: unknown lora_name {lora_name!r} (available_lora_weights: {known})")
        mix = None
        if request.get("lora_mix") is not None:
            if lora_name is not None:
                raise UserInputError(f"{where}: give lora_name or lora_mix, not both")
            mix = check_mix(request["lora_mix"], where, max(1, len(adapters)))
            unknown = [name for name, _ in mix if name not in adapters]
            if unknown:
                raise UserInputError(f"{where}: unknown adapter {unknown[0]!r} in lora_mix (available_lora_weights: {known})")
        sampling = _sampling(request, defaults_dict, where)
        try:  # structured output, as the server takes it (OpenAI's response_format, vLLM's structured_outputs)
            sampling.grammar = spec_from_fields(request.get("response_format"), request.get("structured_outputs"))
        except UserInputError as exc:
            raise UserInputError(f"{where}: {exc}") from exc
        requests.append(JobRequest(_messages(request.get("messages"), where), lora_name, sampling, mix))
    return InferJob(adapters, requests)


def run_infer(options: InferOptions) -> dict:
    """Validate, generate, and write the responses file; return what was written."""
    if options.max_lora_rank < 1 or options.max_lora_rank > contract.MAX_LORA_RANK:
        raise UserInputError(f"--max-lora-rank {options.max_lora_rank}: expected 1..{contract.MAX_LORA_RANK}")
    if options.max_batch_size < 1:
        raise UserInputError(f"--max-batch-size {options.max_batch_size}: expected >= 1")
    check_writable_file(Path(options.output_file), "--output-file")
    job = read_input_file(options.input_file)
    started = time.perf_counter()
    used = list(dict.fromkeys([r.lora_name for r in job.requests if r.lora_name]
                              + [name for r in job.requests for name, _ in r.lora_mix or ()]))
    widest_mix = max((len(r.lora_mix) for r in job.requests if r.lora_mix), default=0)
    llm = LLM(options.onnx_dir, LoraConfig(max_lora_rank=options.max_lora_rank,
                                           max_loras=max(1, widest_mix, min(len(used), options.max_batch_size)),
                                           max_cpu_loras=max(1, len(used))),
              max_batch_size=options.max_batch_size, device=options.device, num_threads=options.num_threads,
              max_num_batched_tokens=options.max_num_batched_tokens,
              enable_prefix_caching=options.enable_prefix_caching)
    ids = {name: number for number, name in enumerate(used, start=1)}
    lora_requests = [LoRARequest(r.lora_name, ids[r.lora_name], str(job.adapters[r.lora_name])) if r.lora_name else None
                     for r in job.requests]
    labels = [f"requests[{index}]" + (f" (lora_name {r.lora_name!r})" if r.lora_name else "")
              for index, r in enumerate(job.requests)]
    for name in used:  # every adapter validated once, by the engine, before any generation
        first = next(index for index, r in enumerate(job.requests)
                     if r.lora_name == name or name in dict(r.lora_mix or ()))
        try:
            llm.add_lora(LoRARequest(name, ids[name], str(job.adapters[name])))
        except UserInputError as exc:
            raise type(exc)(f"{labels[first]}: {exc}") from exc
    outputs = llm.generate([r.messages for r in job.requests], [r.sampling for r in job.requests], lora_requests,
                           lora_mix=[dict(r.lora_mix) if r.lora_mix else None for r in job.requests],
                           labels=[f"requests[{index}]" for index in range(len(job.requests))])
    stats = llm.stats
    result = {
        "responses": [
            {
                "output_text": output.text,
                "output_ids": output.token_ids,
                "lora_name": output.lora_name,
                **({"lora_mix": output.lora_mix} if output.lora_mix else {}),
                "finish_reason": output.finish_reason,
                "prompt_tokens": len(output.prompt_token_ids),
                "completion_tokens": len(output.token_ids),
            }
            for output in outputs
        ],
        "stats": {
            "requests": len(outputs),
            "prefill_steps": stats.prefill_steps,
            "decode_steps": stats.decode_steps,
            "prompt_tokens": stats.prompt_tokens,
            "completion_tokens": stats.generated_tokens,
            "prefill_s": round(stats.prefill_s, 4),
            "decode_s": round(stats.decode_s, 4),
            "generate_s": round(stats.total_s, 4),
            "total_s": round(time.perf_counter() - started, 4),
            "tokens_per_s": round(stats.decode_tokens_per_s, 2),
            # every token but each request's first comes from a decode step
            "decode_tokens_per_s": round((stats.generated_tokens - len(outputs)) / stats.decode_s, 2) if stats.decode_s else None,
        },
    }
    write_text_atomic(Path(options.output_file), json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return result
