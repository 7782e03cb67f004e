"""Structured output in the scheduler: each row of a mixed batch follows its own grammar (or none) under its own
adapter, and rows with and without grammars give what they give alone."""

from __future__ import annotations

import json

import jsonschema
import pytest

from edgelora.errors import UserInputError
from edgelora.runtime.config import EngineConfig, SchedulerConfig
from edgelora.runtime.engine import Engine
from edgelora.runtime.grammar import GrammarSpec, spec_from_fields
from edgelora.runtime.sampling import SamplingParams
from edgelora.runtime.scheduler import GenerationRequest, Scheduler
from edgelora.runtime.tokenizer import ChatTokenizer

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "ok", "tag"],
          "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0,
                                                                          "maximum": 120},
                         "ok": {"type": "boolean"}, "tag": {"enum": ["red", "green"]}}}


@pytest.fixture(scope="module")
def qwen2(exported_samples):
    return exported_samples["qwen2"]


@pytest.fixture(scope="module")
def tokenizer(qwen2):
    return ChatTokenizer(qwen2.onnx_dir)


def _scheduler(qwen2, tokenizer) -> Scheduler:
    engine = Engine(qwen2.onnx_dir, EngineConfig(max_loras=3, num_threads=1))
    for name, path in qwen2.processed.items():
        engine.adapters.add(name, path, read=True)
    return Scheduler(engine, SchedulerConfig(max_num_seqs=8), tokenizer)


def _request(tokenizer, adapter, grammar, seed=0, max_tokens=48, temperature=0.0):
    return GenerationRequest(tokenizer.encode("The quick brown fox"), adapter,
                             SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed, grammar=grammar))


def test_every_row_of_a_mixed_batch_follows_its_own_grammar_and_equals_itself_alone(qwen2, tokenizer):
    grammars = [GrammarSpec.json_schema(SCHEMA), None, GrammarSpec.choice(["yes", "no way"]),
                GrammarSpec.regex(r"[0-9]{3}-[a-z]{2}"), GrammarSpec.json_schema(SCHEMA), None]
    adapters = [None, None, "a1", "a2", "a3", "a1"]
    requests = [_request(tokenizer, adapter, grammar, seed, temperature=0.9 if index % 2 else 0.0)
                for index, (adapter, grammar, seed) in enumerate(zip(adapters, grammars, range(6)))]
    together = _scheduler(qwen2, tokenizer).run_to_completion(requests)
    for request, result in zip(requests, together):
        alone = _scheduler(qwen2, tokenizer).run_to_completion([request])[0]
        assert result.output_ids == alone.output_ids
    for result in (together[0], together[4]):
        jsonschema.validate(json.loads(result.text), SCHEMA)
        assert result.finish_reason == "stop"
    assert together[2].text in ("yes", "no way")
    assert len(together[3].text) == 6 and together[3].text[3] == "-" and together[3].text[:3].isdigit()
    unconstrained = _scheduler(qwen2, tokenizer).run_to_completion([requests[1]])[0]
    assert together[1].output_ids == unconstrained.output_ids


def test_max_tokens_before_the_grammar_completes_is_length_with_the_text_so_far(qwen2, tokenizer):
    result = _scheduler(qwen2, tokenizer).run_to_completion([_request(tokenizer, None, GrammarSpec.json_schema(SCHEMA),
                                                                      max_tokens=3)])[0]
    assert result.finish_reason == "length" and result.text.startswith("{") and len(result.output_ids) == 3


@pytest.mark.parametrize("fields, fragment", [
    (dict(response_format={"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}), "nonsense"),
    (dict(response_format={"type": "yaml"}), "response_format"),
    (dict(response_format={"type": "json_schema"}), "json_schema.schema"),
    (dict(structured_outputs={"choice": []}), "choice"),
    (dict(structured_outputs={"regex": "a"}, guided_choice=["x"]), "give one way"),
])
def test_invalid_grammars_are_refused_naming_the_problem(qwen2, tokenizer, fields, fragment):
    scheduler = _scheduler(qwen2, tokenizer)
    with pytest.raises(UserInputError, match=fragment):
        spec = spec_from_fields(**fields)
        scheduler.check(_request(tokenizer, None, spec))


def test_forms_map_to_one_spec():
    schema = {"type": "object"}
    assert spec_from_fields(response_format={"type": "text"}) is None
    assert spec_from_fields(response_format={"type": "json_object"}) == GrammarSpec("json_object")
    assert spec_from_fields(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}) \
        == spec_from_fields(structured_outputs={"json": schema}) == spec_from_fields(guided_json=json.dumps(schema))
    assert spec_from_fields(structured_outputs={"choice": ["a"]}) == spec_from_fields(guided_choice=["a"])
