"""Which tokens each bound adapter computes: the ``lora_tokens`` / ``lora_weights`` inputs of a step.

A row uses no adapter, one adapter (weight 1), or a weighted mix of several; every adapter of a
step sits in one pool slot, and the step binds slots first..last as its stack. Entry ``e`` of the
stack (slot ``first + e``) then lists the (row, position) pairs of every token whose row uses it,
with the row's weight for it, padded with weight 0 to the longest entry. The graph computes each
entry's LoRA product over its own tokens only (``graph/insert_lora.py``).

::

    rows:    r0: a       r1: b       r2: {a: .7, b: -.3}    r3: base        (decode: one token each)
    entries: a -> (r0,0) w 1, (r2,0) w .7
             b -> (r1,0) w 1, (r2,0) w -.3
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RowAdapters = tuple[tuple[int, float], ...]  # (slot, weight) pairs of one row; () = base


@dataclass(frozen=True)
class Routing:
    """The bound slot range and the per-entry inputs of one step."""

    first: int  # first bound slot (0 when no adapter is used)
    last: int
    tokens: np.ndarray  # int64 [entries, entry_tokens, 2]
    weights: np.ndarray  # float [entries, entry_tokens, 1]


def route(rows: list[RowAdapters], lengths: list[int], dtype) -> Routing:
    """Lay out each used slot's tokens; row i feeds positions 0..lengths[i]-1 of this step."""
    used = sorted({slot for members in rows for slot, _ in members})
    if not used:
        return Routing(0, -1, np.zeros((0, 1, 2), np.int64), np.zeros((0, 1, 1), dtype))
    first, last = used[0], used[-1]
    entries: list[list[tuple[int, float]]] = [[] for _ in range(last - first + 1)]
    for row, members in enumerate(rows):
        for slot, weight in members:
            entries[slot - first].append((row, weight))
    width = max(1, max(sum(lengths[row] for row, _ in entry) for entry in entries))
    tokens = np.zeros((len(entries), width, 2), np.int64)
    weights = np.zeros((len(entries), width, 1), dtype)
    for index, entry in enumerate(entries):
        start = 0
        for row, weight in entry:
            count = lengths[row]
            tokens[index, start:start + count, 0] = row
            tokens[index, start:start + count, 1] = np.arange(count)
            weights[index, start:start + count, 0] = weight
            start += count
    return Routing(first, last, tokens, weights)
