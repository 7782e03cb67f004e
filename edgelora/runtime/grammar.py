"""Structured output: grammars (JSON schema, any JSON object, a regex, a choice) as per-row token masks.

The engine is llguidance (PyPI, no Python dependencies, a Rust core): it turns a grammar and the
model's tokenizer into the set of tokens that may come next, in ~tens of microseconds a step, and
never imports torch (xgrammar needs torch and triton; the server never imports torch). A request's
``GrammarSpec`` rides in its ``SamplingParams``; ``Grammars`` compiles each spec once (cached, LRU) and
gives every row its own matcher, so each row of a mixed batch follows its own grammar, or none,
under its own adapter. The output stage masks the row's logits before sampling and feeds the
sampled token back; a row whose grammar is complete stops ("stop"). JSON is generated compact (no
optional whitespace): a random-weight or small model cannot wander in whitespace forever.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from edgelora.errors import UserInputError

KINDS = ("json_object", "json_schema", "regex", "choice", "lark")
CACHED_GRAMMARS = 256  # compiled grammars kept (by spec)


@dataclass(frozen=True)
class GrammarSpec:
    """What the answer must match. ``value``: the schema as canonical JSON, the regex, or the choices as a JSON
    list (hashable, so compiled grammars are cached by it)."""

    kind: str
    value: str = ""

    @classmethod
    def json_schema(cls, schema: dict) -> GrammarSpec:
        if not isinstance(schema, dict):
            raise UserInputError("json_schema: the schema must be a JSON object")
        return cls("json_schema", json.dumps(schema, sort_keys=True))

    @classmethod
    def choice(cls, choices: list) -> GrammarSpec:
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
            raise UserInputError("choice: expected a non-empty list of non-empty strings")
        return cls("choice", json.dumps(choices))

    @classmethod
    def regex(cls, pattern: str) -> GrammarSpec:
        if not isinstance(pattern, str) or not pattern:
            raise UserInputError("regex: expected a non-empty pattern")
        return cls("regex", pattern)

    def grammar(self) -> str:
        """llguidance's grammar text for this spec."""
        from llguidance import LLMatcher

        compact = {"whitespace_flexible": False}
        if self.kind == "json_object":
            return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=compact)
        if self.kind == "json_schema":
            return LLMatcher.grammar_from_json_schema(self.value, defaults=compact)
        if self.kind == "regex":
            return LLMatcher.grammar_from_regex(self.value)
        if self.kind == "lark":  # llguidance's Lark dialect (tool calls: a fixed frame around a JSON schema)
            return LLMatcher.grammar_from_lark(self.value)
        if self.kind == "choice":  # lark string literals: the choices JSON-quoted
            return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in json.loads(self.value)))
        raise UserInputError(f"unknown grammar kind {self.kind!r} (expected one of {', '.join(KINDS)})")


class Grammars:
    """The model's tokenizer as llguidance sees it, compiled grammars by spec, and a matcher per row."""

    def __init__(self, hf_tokenizer, vocab_size: int, eos_ids: list[int]):
        import llguidance.hf

        self.vocab_size = vocab_size
        self._tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size,
                                                       eos_token=list(eos_ids) or None)
        self._compiled: OrderedDict[GrammarSpec, str] = OrderedDict()
        self.words = (vocab_size + 31) // 32  # int32 words of one row's mask

    def compile(self, spec: GrammarSpec) -> str:
        """The checked grammar for ``spec`` (cached); UserInputError naming the problem when it is invalid."""
        from llguidance import LLMatcher

        grammar = self._compiled.get(spec)
        if grammar is not None:
            self._compiled.move_to_end(spec)
            return grammar
        try:
            grammar = spec.grammar()
        except ValueError as exc:
            raise UserInputError(f"{spec.kind}: {exc}") from exc
        problem = LLMatcher.validate_grammar(grammar, self._tokenizer)
        if problem:
            raise UserInputError(f"{spec.kind}: {problem.strip().splitlines()[0]}")
        self._compiled[spec] = grammar
        while len(self._compiled) > CACHED_GRAMMARS:
            self._compiled.popitem(last=False)
        return grammar

    def matcher(self, spec: GrammarSpec):
        from llguidance import LLMatcher

        matcher = LLMatcher(self._tokenizer, self.compile(spec))
        if matcher.is_error():
            raise UserInputError(f"{spec.kind}: {matcher.get_error()}")
        return matcher


def mask_rows(rows: np.ndarray, matchers: list, words: int) -> None:
    """Set to -inf every logit a row's matcher does not allow next (rows [n, vocab], one matcher per row)."""
    from llguidance.numpy import fill_next_token_bitmask

    bitmask = np.full((len(matchers), words), -1, np.int32)
    for index, matcher in enumerate(matchers):
        fill_next_token_bitmask(matcher, bitmask, index)
    allowed = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, :rows.shape[1]].astype(bool)
    rows[~allowed] = -np.inf


def spec_from_fields(response_format=None, structured_outputs=None, **guided) -> GrammarSpec | None:
    """The grammar an OpenAI / vLLM request asks for: ``response_format`` (``{"type": "json_object"}``,
    ``{"type": "json_schema", "json_schema": {"schema": {...}}}``, ``{"type": "text"}``), vLLM's
    ``structured_outputs`` (``{"choice": [...]}``, ``{"regex": "..."}``, ``{"json": {...}}``) or its older
    ``guided_choice`` / ``guided_regex`` / ``guided_json``. At most one; UserInputError naming the field."""
    given = {name: value for name, value in (("response_format", response_format),
                                             ("structured_outputs", structured_outputs), *guided.items())
             if value is not None and not (name == "response_format" and value == {"type": "text"})}
    if not given:
        return None
    if len(given) > 1:
        raise UserInputError(f"{' and '.join(sorted(given))}: give one way to constrain the answer",
                             param=sorted(given)[0])
    (name, value), = given.items()
    field_name = name  # what the caller sent, for the message
    if name == "response_format":
        kind = value.get("type") if isinstance(value, dict) else None
        if kind == "json_object":
            return GrammarSpec("json_object")
        if kind == "json_schema":
            schema = (value.get("json_schema") or {}).get("schema") if isinstance(value.get("json_schema"), dict) \
                else None
            if not isinstance(schema, dict):
                raise UserInputError("response_format: json_schema needs json_schema.schema, a JSON object",
                                     param=field_name)
            return GrammarSpec.json_schema(schema)
        raise UserInputError(f"response_format: type {kind!r} is not one of text, json_object, json_schema",
                             param=field_name)
    if name == "structured_outputs":
        if not isinstance(value, dict) or len([k for k, v in value.items() if v is not None]) != 1:
            raise UserInputError("structured_outputs: expected one of choice, regex, json", param=field_name)
        key, item = next((k, v) for k, v in value.items() if v is not None)
        name, value = f"guided_{key}", item
    makers = {"guided_choice": GrammarSpec.choice, "guided_regex": GrammarSpec.regex,
              "guided_json": lambda schema: GrammarSpec.json_schema(json.loads(schema) if isinstance(schema, str)
                                                                    else schema)}
    if name not in makers:
        raise UserInputError(f"{name}: unknown form (expected choice, regex or json)", param=field_name)
    try:
        return makers[name](value)
    except UserInputError as exc:
        raise UserInputError(f"{field_name}: {exc}", param=field_name) from exc
