"""The output stage: logits -> tokens -> text, and when a request ends.

One object for what happens to a step's logits: sampling (seeded per request; ``min_tokens``
masks EOS), incremental detokenizing (never half a character), stop strings (text that may begin
one is held back) and the stop conditions (EOS, a stop string, ``max_tokens``). The scheduler
plans steps and hands each step's logits here; "decode" elsewhere means the decode phase only.

::

    logits [rows, 1, vocab] ──sample──> token per row ──accept──> OutputState: ids, text, finish_reason
                     (EOS masked below min_tokens)         (detokenizer, stop strings, eos, length)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from edgelora.errors import UserInputError
from edgelora.runtime import native
from edgelora.runtime.detokenizer import IncrementalDetokenizer
from edgelora.runtime.grammar import Grammars, mask_rows
from edgelora.runtime.sampling import SamplingParams

LOGPROB_ROWS = 16  # prompt positions turned into log-probabilities at once


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability and the most likely alternatives at its position (id, logprob), best first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 for the sum (the values are reported, so they should be exact)."""
    values = np.asarray(logits, np.float64)
    shifted = values - values.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def token_logprobs(logprobs: np.ndarray, tokens, top: int) -> list[TokenLogprob]:
    """For each row of log-probabilities [n, vocab]: the given token's value and the ``top`` best (id, value)."""
    found = []
    for row, token in zip(logprobs, tokens):
        best: tuple = ()
        if top:
            index = np.argpartition(-row, top - 1)[:top]
            index = index[np.lexsort((index, -row[index]))]  # best first; ties by id
            best = tuple((int(i), float(row[i])) for i in index)
        found.append(TokenLogprob(int(token), float(row[int(token)]), best))
    return found


@dataclass
class OutputState:
    """One request's side of the output stage: its sampler, detokenizer, tokens and text so far."""

    sampling: SamplingParams  # checked: max_tokens filled in
    sampler: object  # native.Sampler, seeded
    detokenizer: IncrementalDetokenizer | None
    output_ids: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of text handed out
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    text: str = ""  # the final text once finished (a stop string cut off)
    prompt_ids: np.ndarray | None = None  # distinct prompt ids, kept only for a repetition penalty
    logprobs: list[TokenLogprob] = field(default_factory=list)  # per sampled token, when sampling.logprobs is set
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)  # per prompt token (the first: None)
    matcher: object | None = None  # llguidance's LLMatcher when sampling.grammar is set


class OutputStage:
    """Sampling, detokenizing and stop checks for every request of one scheduler."""

    def __init__(self, eos_ids: list[int], detokenize: Callable[[list[int]], str] | None = None,
                 grammars: Callable[[], Grammars] | None = None):
        self.detokenize = detokenize  # the tokenizer's decode; None: token ids only (no text, no stop strings)
        self._make_grammars = grammars  # made on first use: structured output needs the tokenizer
        self._grammars: Grammars | None = None
        self._eos = set(eos_ids)
        self._eos_index = np.array(eos_ids, np.int64)

    def start(self, sampling: SamplingParams, prompt_ids: list[int]) -> OutputState:
        """A request's state: its own seeded sampler (a fresh seed when none is given)."""
        seed = sampling.seed if sampling.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        detokenizer = IncrementalDetokenizer(self.detokenize, prompt_ids) if self.detokenize else None
        state = OutputState(sampling, native.Sampler(seed), detokenizer)
        if sampling.grammar is not None:
            state.matcher = self.grammars().matcher(sampling.grammar)
        if sampling.repetition_penalty != 1:
            state.prompt_ids = np.unique(np.asarray(prompt_ids, np.int64))
        return state

    def sample(self, states: list[OutputState], logits: np.ndarray) -> np.ndarray:
        """One token per row from logits [rows, 1, vocab]."""
        rows = np.ascontiguousarray(logits[:, 0], dtype=np.float32)
        wanted = [index for index, state in enumerate(states) if state.sampling.logprobs is not None]
        raw = log_softmax(rows[wanted]) if wanted else None  # before min_tokens, biases and penalties
        if self._eos_index.size:
            for index, state in enumerate(states):
                if len(state.output_ids) < state.sampling.min_tokens and not state.sampling.ignore_eos:
                    rows[index, self._eos_index] = -np.inf  # vLLM's min_tokens: eos cannot be sampled yet
        for index, state in enumerate(states):
            if state.sampling.adjusts_logits:
                adjust_logits(rows[index], state)
        constrained = [index for index, state in enumerate(states) if state.matcher is not None]
        if constrained:  # last: nothing after it may let a token back in
            part = rows[constrained]
            mask_rows(part, [states[index].matcher for index in constrained], self._grammars.words)
            rows[constrained] = part
        params = [state.sampling for state in states]
        tokens = native.sample_batch(rows, [state.sampler for state in states], [float(p.temperature) for p in params],
                                     [int(p.top_k) for p in params], [float(p.top_p) for p in params])
        for position, index in enumerate(wanted):
            state = states[index]
            state.logprobs += token_logprobs(raw[position:position + 1], [tokens[index]], state.sampling.logprobs)
        return tokens

    def grammars(self) -> Grammars:
        """The structured-output compiler (made on first use); UserInputError without a tokenizer."""
        if self._grammars is None:
            if self._make_grammars is None:
                raise UserInputError("structured output needs the model's tokenizer (this scheduler has none)")
            self._grammars = self._make_grammars()
        return self._grammars

    def prompt_logprobs(self, state: OutputState, prompt_ids: list[int], start: int, logits: np.ndarray) -> None:
        """Log-probabilities of prompt tokens start+1.. from the logits at positions start.. [n, vocab] (one chunk
        of the prompt; the first prompt token has none)."""
        if start == 0:
            state.prompt_logprobs = [None]
        targets = prompt_ids[start + 1:start + 1 + len(logits)]
        for first in range(0, len(targets), LOGPROB_ROWS):  # a few rows at a time: never [chunk, vocab] in float64
            part = targets[first:first + LOGPROB_ROWS]
            state.prompt_logprobs += token_logprobs(log_softmax(logits[first:first + len(part)]), part,
                                                    state.sampling.prompt_logprobs)

    def accept(self, state: OutputState, token: int) -> str:
        """Record a sampled token, decide whether the request ends (``finish_reason``); return the new text."""
        sampling = state.sampling
        state.output_ids.append(token)
        enough = len(state.output_ids) >= sampling.min_tokens
        if token in self._eos and not sampling.ignore_eos and enough:
            state.finish_reason = "stop"
        if state.matcher is not None:
            state.matcher.consume_token(token)
            if state.matcher.is_stopped():  # the grammar is complete: nothing may follow
                state.finish_reason = "stop"
        text = ""
        if state.detokenizer is not None:
            state.detokenizer.add(token)
            if state.finish_reason or len(state.output_ids) >= sampling.max_tokens:
                state.detokenizer.flush()
            text = state.detokenizer.text
            if sampling.stop and enough:
                cut = _find_stop(text, sampling.stop, max(0, state.emitted - max(map(len, sampling.stop))))
                if cut is not None:
                    text = text[:cut]
                    state.finish_reason = "stop"
        if state.finish_reason is None and len(state.output_ids) >= sampling.max_tokens:
            state.finish_reason = "length"
        if state.finish_reason is None:
            held = max(map(len, sampling.stop)) - 1 if sampling.stop else 0  # may be the start of a stop string
            release = max(state.emitted, len(text) - held)
        else:
            release = len(text)
            state.text = text
        piece = text[state.emitted:release]
        state.emitted = release
        return piece


def adjust_logits(row: np.ndarray, state: OutputState) -> None:
    """A row's logit_bias and penalties, in place (SamplingParams says what each does)."""
    sampling = state.sampling
    if sampling.logit_bias:
        ids = np.fromiter(sampling.logit_bias, np.int64, len(sampling.logit_bias))
        row[ids] += np.fromiter(sampling.logit_bias.values(), np.float32, len(ids))
    if sampling.repetition_penalty != 1:
        seen = np.union1d(state.prompt_ids, np.asarray(state.output_ids, np.int64))
        values = row[seen]
        row[seen] = np.where(values > 0, values / sampling.repetition_penalty, values * sampling.repetition_penalty)
    if (sampling.frequency_penalty or sampling.presence_penalty) and state.output_ids:
        ids, counts = np.unique(np.asarray(state.output_ids, np.int64), return_counts=True)
        row[ids] -= sampling.frequency_penalty * counts + sampling.presence_penalty


def _find_stop(text: str, stops: list[str], start: int) -> int | None:
    """Where the earliest stop string begins in text[start:] (absolute index), or None."""
    found = [index for index in (text.find(stop, start) for stop in stops) if index >= 0]
    return min(found) if found else None
