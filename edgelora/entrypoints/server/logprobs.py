"""Log-probabilities in OpenAI's two response shapes: the legacy completions one and chat's ``content`` list.

The values come from the output stage (``runtime/output.py``: log-softmax of the model's float
logits before biases, penalties and sampling filters); here they only get the token texts.
"""

from __future__ import annotations

from collections.abc import Callable

from edgelora.entrypoints.server.protocol import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob
from edgelora.runtime.output import TokenLogprob

TokenText = Callable[[int], str]


def completion_logprobs(tokens: list[int], entries: list[TokenLogprob | None], text_of: TokenText,
                        into: CompletionLogprobs | None = None, offset: int = 0) -> CompletionLogprobs:
    """Append these tokens (their logprob entry, None for the prompt's first token) to ``into``; text offsets
    go on from ``offset`` (the characters before the first of them)."""
    into = into or CompletionLogprobs()
    for token, entry in zip(tokens, entries):
        text = text_of(token)
        into.tokens.append(text)
        into.token_logprobs.append(None if entry is None else entry.logprob)
        top: dict[str, float] | None = None
        if entry is not None:  # tokens with the same text share a key in this shape: the best one stays
            top = {}
            for other, value in entry.top:
                top.setdefault(text_of(other), value)
        into.top_logprobs.append(top)
        into.text_offset.append(offset)
        offset += len(text)
    return into


def chat_logprobs(entries: list[TokenLogprob], text_of: TokenText) -> ChatLogprobs:
    """Chat's shape: each generated token's text, logprob, UTF-8 bytes and top alternatives."""
    def top(token: int, value: float) -> TopLogprob:
        text = text_of(token)
        return TopLogprob(token=text, logprob=value, bytes=list(text.encode()))

    return ChatLogprobs(content=[ChatTokenLogprob(**top(entry.token, entry.logprob).model_dump(),
                                                  top_logprobs=[top(token, value) for token, value in entry.top])
                                 for entry in entries])
