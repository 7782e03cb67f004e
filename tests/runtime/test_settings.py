"""Settings once: every default lives in edgelora/runtime/config.py and every entry point reads it from there."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from edgelora.cli import build_parser, main
from edgelora.entrypoints.api import LLM, LoraConfig, SamplingParams
from edgelora.entrypoints.chat import ChatOptions
from edgelora.entrypoints.infer_file import InferOptions
from edgelora.entrypoints.server import ServeOptions
from edgelora.errors import UserInputError
from edgelora.graph.quantize import QuantizeOptions
from edgelora.runtime.config import MIN_HOST_LORAS, EngineConfig, SchedulerConfig
from edgelora.tools.bench import BenchOptions
from edgelora.tools.bench_serve import BenchServeOptions


def _defaults(command: str) -> dict:
    parser = build_parser()
    sub = next(action for action in parser._actions if isinstance(action, type(parser._subparsers._group_actions[0])))
    return {action.dest: action.default for action in sub.choices[command]._actions}


def test_every_entry_point_takes_its_defaults_from_the_runtime_config():
    engine, scheduler = EngineConfig(), SchedulerConfig()
    lora, serve = LoraConfig(), ServeOptions(onnx_dir="x")
    assert (lora.max_loras, lora.max_cpu_loras, lora.max_lora_rank) == \
        (engine.max_loras, engine.max_cpu_loras, engine.max_lora_rank)
    assert (serve.max_loras, serve.max_cpu_loras, serve.max_lora_rank, serve.max_num_seqs) == \
        (engine.max_loras, engine.max_cpu_loras, engine.max_lora_rank, scheduler.max_num_seqs)
    assert serve.engine_config() == EngineConfig() and serve.scheduler_config() == SchedulerConfig()
    assert inspect.signature(LLM).parameters["max_batch_size"].default == scheduler.max_num_seqs
    assert InferOptions(onnx_dir="x", input_file="in", output_file="out").max_batch_size == scheduler.max_num_seqs
    served = _defaults("serve")
    assert (served["max_loras"], served["max_cpu_loras"], served["max_lora_rank"], served["max_num_seqs"]) == \
        (engine.max_loras, engine.max_cpu_loras, engine.max_lora_rank, scheduler.max_num_seqs)
    inferred = _defaults("infer")
    assert (inferred["max_lora_rank"], inferred["max_batch_size"]) == (engine.max_lora_rank, scheduler.max_num_seqs)
    assert _defaults("chat")["max_lora_rank"] == engine.max_lora_rank


@pytest.mark.parametrize(("max_loras", "host_loras"), [(1, MIN_HOST_LORAS), (8, MIN_HOST_LORAS), (32, 32)])
def test_host_ready_adapters_default_to_at_least_the_slots(max_loras, host_loras):
    assert EngineConfig(max_loras=max_loras).host_loras == host_loras
    assert ServeOptions(onnx_dir="x", max_loras=max_loras).engine_config().host_loras == host_loras


def test_an_llm_with_32_slots_generates(exported_samples):
    sample = exported_samples["qwen2"]
    llm = LLM(sample.onnx_dir, lora_config=LoraConfig(max_loras=32), num_threads=1)
    assert llm.engine.config.host_loras == 32
    assert len(llm.generate("Hello", SamplingParams(max_tokens=3, temperature=0))[0].token_ids) == 3


def test_explicit_host_ready_adapters_below_the_slots_are_refused(exported_samples, capsys):
    sample = exported_samples["qwen2"]
    with pytest.raises(UserInputError, match=r"max_cpu_loras 4 \(>= max_loras 8\)"):
        LLM(sample.onnx_dir, lora_config=LoraConfig(max_loras=8, max_cpu_loras=4))
    assert main(["serve", "--onnx-dir", str(sample.onnx_dir), "--max-loras", "8", "--max-cpu-loras", "4"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "max_cpu_loras 4 (>= max_loras 8)" in lines[0]


@pytest.mark.parametrize("options", [EngineConfig, SchedulerConfig, ServeOptions, InferOptions, BenchOptions,
                                     BenchServeOptions, ChatOptions, QuantizeOptions])
def test_options_are_built_by_keyword_only(options):
    """A field added anywhere cannot shift the others: positional construction is a TypeError."""
    assert dataclasses.is_dataclass(options) and all(field.kw_only for field in dataclasses.fields(options))
    with pytest.raises(TypeError):
        options("positional")


# -- one sampling type ----------------------------------------------------------------------------------------


def test_every_entry_point_builds_the_one_sampling_type_with_its_own_defaults(tmp_path):
    """API, server request models, infer rows and chat: one SamplingParams, one validation; their own defaults."""
    from edgelora import SamplingParams as Public
    from edgelora.entrypoints.infer_file import read_input_file
    from edgelora.entrypoints.server.protocol import CompletionRequest
    from edgelora.runtime.sampling import SamplingParams

    assert Public is SamplingParams and Public().max_tokens == 256
    served = CompletionRequest(model="m", prompt="hi").sampling_params(None)
    assert type(served) is SamplingParams and (served.max_tokens, served.temperature, served.top_k) == (None, 1.0, 0)
    (tmp_path / "in.json").write_text('{"requests": [{"messages": [{"role": "user", "content": "hi"}]}]}')
    row = read_input_file(tmp_path / "in.json").requests[0].sampling
    assert type(row) is SamplingParams and (row.top_k, row.max_tokens) == (50, 256)
    chat = ChatOptions(onnx_dir=tmp_path).sampling()
    assert type(chat) is SamplingParams and (chat.temperature, chat.top_p) == (0.7, 0.9)


@pytest.mark.parametrize(("field", "value"), [("max_tokens", 0), ("temperature", -1.0), ("top_p", 0.0), ("top_k", -2),
                                              ("min_tokens", -1), ("stop", ["ok", ""]), ("seed", -5)])
def test_one_validation_names_the_field_for_every_entry_point(tmp_path, field, value):
    from edgelora.runtime.sampling import SamplingParams

    with pytest.raises(UserInputError, match=f"prompt 0: invalid {field}"):
        SamplingParams(**{field: value}).validate("prompt 0")
    if field in ("max_tokens", "temperature", "top_p", "top_k", "seed"):
        with pytest.raises(UserInputError, match=f"invalid {field}"):
            ChatOptions(onnx_dir=tmp_path, **{field: value}).validate()
