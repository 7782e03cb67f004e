"""The output stage alone: logits -> tokens -> text, and when a request ends (no model)."""

from __future__ import annotations

import numpy as np

from edgelora.runtime.output import OutputStage
from edgelora.runtime.sampling import SamplingParams

EOS = 9


def _letters(ids: list[int]) -> str:
    return "".join("abcdefghij"[token] for token in ids)


def _one_hot(tokens: list[int], vocab: int = 10) -> np.ndarray:
    logits = np.zeros((len(tokens), 1, vocab), np.float32)
    logits[np.arange(len(tokens)), 0, tokens] = 5.0
    return logits


def test_eos_is_masked_below_min_tokens_then_ends_the_request():
    stage = OutputStage([EOS], _letters)
    early = stage.start(SamplingParams(max_tokens=5, temperature=0, min_tokens=2), [1])
    free = stage.start(SamplingParams(max_tokens=5, temperature=0), [1])
    tokens = stage.sample([early, free], _one_hot([EOS, EOS]))
    assert tokens[0] != EOS and tokens[1] == EOS
    stage.accept(free, int(tokens[1]))
    assert free.finish_reason == "stop"


def test_text_that_may_begin_a_stop_string_is_held_back_and_the_stop_string_cut():
    """The last len(stop) - 1 characters wait until they cannot begin a stop string."""
    stage = OutputStage([EOS], _letters)
    state = stage.start(SamplingParams(max_tokens=10, temperature=0, stop=["cd"]), [0])
    pieces = [stage.accept(state, token) for token in (0, 1, 2)]
    assert pieces == ["", "a", "b"], "each character waits one token: it may be the 'c' of 'cd'"
    assert stage.accept(state, 3) == "" and state.finish_reason == "stop" and state.text == "ab"


def test_max_tokens_ends_with_length_and_flushes_the_text():
    stage = OutputStage([EOS], _letters)
    state = stage.start(SamplingParams(max_tokens=2, temperature=0), [0])
    assert "".join(stage.accept(state, token) for token in (4, 5)) == "ef"
    assert state.finish_reason == "length" and state.output_ids == [4, 5]


def test_without_a_tokenizer_only_ids_come_out():
    stage = OutputStage([EOS])
    state = stage.start(SamplingParams(max_tokens=3, temperature=0), [0])
    assert stage.accept(state, 3) == "" and state.output_ids == [3] and state.finish_reason is None
