"""Tool calling through edgelora serve: tools rendered by the model's chat template (the Qwen2 sample has a tools
branch, the Llama one has none), calls parsed into tool_calls, tool_choice required / a named function forcing a
call whose arguments validate, a round trip with a role tool message, streaming deltas."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from server_process import running_server

from edgelora.entrypoints.server.tools import parse_calls
from edgelora.runtime.tokenizer import ChatTokenizer

SERVED = "tiny"
WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["C", "F"]}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "parameters": {
             "type": "object", "additionalProperties": False, "required": ["a", "b"],
             "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 999},
                            "b": {"type": "integer", "minimum": 0, "maximum": 999}}}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def qwen2(exported_samples):
    return exported_samples["qwen2"]


@pytest.fixture(scope="module")
def client(qwen2):
    with running_server("--onnx-dir", str(qwen2.onnx_dir), "--served-model-name", SERVED, "--threads", "1",
                        "--lora-modules", f"a1={qwen2.processed['a1']}") as (url, _):
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)


@pytest.mark.parametrize("model", [SERVED, "a1"])
def test_a_named_function_returns_a_call_whose_arguments_validate(client, model):
    response = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, max_tokens=200, temperature=0.7,
                                              seed=5, tool_choice={"type": "function",
                                                                   "function": {"name": "get_weather"}})
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)


def test_required_calls_one_of_the_tools_and_streaming_sends_the_same_call(client):
    kwargs = dict(model=SERVED, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=200, temperature=0)
    (call,) = client.chat.completions.create(**kwargs).choices[0].message.tool_calls
    schema = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), schema)
    streamed, finish = [], None
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            streamed += choice.delta.tool_calls or []
            finish = choice.finish_reason or finish
    assert finish == "tool_calls" and [(c.function.name, c.function.arguments) for c in streamed] == [
        (call.function.name, call.function.arguments)]


def test_a_round_trip_with_a_tool_message_reaches_the_model(client, qwen2):
    first = client.chat.completions.create(model=SERVED, messages=ASK, tools=TOOLS, max_tokens=200, temperature=0,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = first.choices[0].message.tool_calls[0]
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 degrees"}]
    second = client.chat.completions.create(model=SERVED, messages=messages, tools=TOOLS, max_tokens=4,
                                            temperature=0, extra_body={"return_token_ids": True})
    prompt = ChatTokenizer(qwen2.onnx_dir).hf.decode(second.prompt_token_ids)
    assert "<tool_response>\nsunny, 21 degrees\n</tool_response>" in prompt
    city = json.loads(call.function.arguments)["city"]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": ' in prompt and city in prompt
    assert '"name": "add"' in prompt, "the tools are rendered in the prompt"


def test_a_template_without_a_tools_branch_refuses_tools(exported_samples):
    llama = exported_samples["llama"]
    with running_server("--onnx-dir", str(llama.onnx_dir), "--served-model-name", SERVED, "--threads", "1") \
            as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=SERVED, messages=ASK, tools=TOOLS, max_tokens=4)
        assert caught.value.body["param"] == "tools" and "no tools branch" in caught.value.body["message"]
        assert client.chat.completions.create(model=SERVED, messages=ASK, tools=TOOLS, tool_choice="none",
                                              max_tokens=2).choices[0].finish_reason == "length"


@pytest.mark.parametrize("tool_choice, param", [({"type": "function", "function": {"name": "nope"}}, "tool_choice"),
                                                ("sometimes", "tool_choice")])
def test_bad_tool_choices_are_400(client, tool_choice, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=SERVED, messages=ASK, tools=TOOLS, tool_choice=tool_choice, max_tokens=4)
    assert caught.value.body["param"] == param


def test_calls_are_parsed_from_both_families_formats():
    content, calls = parse_calls('Sure.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>',
                                 "hermes")
    assert content == "Sure." and [(c.name, json.loads(c.arguments)) for c in calls] == [("add", {"a": 1, "b": 2})]
    content, calls = parse_calls('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}', "json")
    assert content is None and calls[0].name == "get_weather" and json.loads(calls[0].arguments) == {"city": "Oslo"}
    assert parse_calls("just text", "hermes") == ("just text", []) and parse_calls("{not json", "json")[1] == []
