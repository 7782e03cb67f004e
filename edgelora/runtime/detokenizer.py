"""Token ids to text one token at a time, never emitting half a character.

A byte-level BPE token can hold part of a UTF-8 sequence (an emoji is often three or four tokens),
and SentencePiece tokenizers drop a leading space when a window starts mid-word. So each step
decodes a short window twice (vLLM's prefix/read offsets): the text of the window up to the last
emitted token and the text including the new tokens; the difference is new text once it no longer
ends in U+FFFD (an incomplete sequence). Joined, the pieces are the request's text.
"""

from __future__ import annotations

from collections.abc import Callable

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Feeds tokens in, hands complete text out; ``text`` is everything emitted so far."""

    def __init__(self, decode: Callable[[list[int]], str], prompt_ids: list[int] | None = None, context: int = 4):
        self._decode = decode
        # A few prompt tokens give the first generated token its left context (spaces, merges).
        self._ids: list[int] = list(prompt_ids[-context:]) if prompt_ids else []
        self._prefix = 0  # window start
        self._read = len(self._ids)  # tokens already turned into text
        self.text = ""

    def add(self, token: int) -> str:
        """Append a token; return the text it completes ('' while a character is still partial)."""
        self._ids.append(token)
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return ""
        piece = after[len(before):]
        self._prefix, self._read = self._read, len(self._ids)
        self.text += piece
        return piece

    def flush(self) -> str:
        """At the end: whatever the unread tokens decode to, even an incomplete character."""
        if self._read == len(self._ids):
            return ""
        before = self._decode(self._ids[self._prefix:self._read])
        piece = self._decode(self._ids[self._prefix:])[len(before):]
        self._prefix = self._read = len(self._ids)
        self.text += piece
        return piece
