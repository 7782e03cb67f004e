"""Tool calling: ``tools`` rendered by the model's own chat template, calls parsed out of the answer, and a
grammar that forces a call for ``tool_choice`` ``required`` or a named function.

Two call formats, told apart by the template:

* ``hermes`` (Qwen2.5, Hermes, the Qwen2 sample): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``,
  one block per call, text around them is content;
* ``json`` (Llama 3.x): the whole answer is one ``{"name": ..., "parameters": {...}}`` object (or
  ``"arguments"``), optionally after ``<|python_tag|>``.

A template with no ``tools`` in it would drop the tools silently (transformers renders what the
template reads), so such a model refuses them (a 400) rather than answer as if it had seen them.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from edgelora.errors import UserInputError
from edgelora.runtime.grammar import GrammarSpec

HERMES_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.DOTALL)
COMPACT = {"whitespace_flexible": False}


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str

    def as_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def tool_format(template: str | None) -> str | None:
    """The template's call format, or None when it has no tools branch."""
    if not template or "tools" not in template:
        return None
    return "hermes" if "<tool_call>" in template else "json"


def check_tools(tools: list) -> list[dict]:
    """OpenAI's ``tools``: ``[{"type": "function", "function": {"name", "parameters"?, "description"?}}]``."""
    if not isinstance(tools, list) or not tools:
        raise UserInputError("tools: expected a non-empty list", param="tools")
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict) \
                or not isinstance(function.get("name"), str) or not function["name"]:
            raise UserInputError(f"tools[{index}]: expected {{\"type\": \"function\", \"function\": "
                                 "{\"name\": ...}}", param="tools")
        if not isinstance(function.get("parameters", {}), dict):
            raise UserInputError(f"tools[{index}].function.parameters: expected a JSON schema object", param="tools")
    return tools


def forced_functions(tools: list[dict], tool_choice) -> list[dict] | None:
    """The functions the answer must call (``required``: any; a named one: that one), None when free (``auto``)."""
    if tool_choice in (None, "auto", "none"):
        return None
    if tool_choice == "required":
        return [tool["function"] for tool in tools]
    name = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
    if not isinstance(tool_choice, dict) or tool_choice.get("type") != "function" or not name:
        raise UserInputError("tool_choice: expected auto, none, required or {\"type\": \"function\", "
                             "\"function\": {\"name\": ...}}", param="tool_choice")
    chosen = [tool["function"] for tool in tools if tool["function"]["name"] == name]
    if not chosen:
        raise UserInputError(f"tool_choice: no tool named {name!r} in tools", param="tool_choice")
    return chosen


def call_grammar(functions: list[dict], fmt: str) -> GrammarSpec:
    """A grammar for one call of one of ``functions``, its arguments following the function's parameter schema."""
    key = "arguments" if fmt == "hermes" else "parameters"
    options = [{"type": "object", "additionalProperties": False, "required": ["name", key],
                "properties": {"name": {"const": function["name"]},
                               key: function.get("parameters") or {"type": "object"}}}
               for function in functions]
    schema = {**(options[0] if len(options) == 1 else {"anyOf": options}), "x-guidance": COMPACT}
    if fmt == "hermes":
        return GrammarSpec("lark", 'start: "<tool_call>\\n" call "\\n</tool_call>"\ncall: %json ' + json.dumps(schema))
    return GrammarSpec.json_schema(schema)


def parse_calls(text: str, fmt: str) -> tuple[str | None, list[ToolCall]]:
    """The answer's content (None when it is only calls) and its tool calls, in order."""
    if fmt == "hermes":
        calls = [_call(match.group(1), "arguments") for match in HERMES_CALL.finditer(text)]
        calls = [call for call in calls if call is not None]
        if not calls:
            return text, []
        rest = HERMES_CALL.sub("", text).strip()
        return rest or None, calls
    body = text.strip().removeprefix("<|python_tag|>").strip()
    call = _call(body, "parameters") if body.startswith("{") else None
    return (None, [call]) if call is not None else (text, [])


def _call(text: str, key: str) -> ToolCall | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get(key, value.get("arguments", value.get("parameters", {})))
    return ToolCall(value["name"], json.dumps(arguments), f"call_{uuid.uuid4().hex[:24]}")
