"""Which tokens each bound adapter computes, and where each token finds its results: a step's
``lora_tokens`` / ``lora_weights`` / ``lora_back`` inputs.

A row uses no adapter, one adapter (weight 1), or a weighted mix of several; every adapter of a
step sits in pool slots (``stack_entries`` makes them stack entries), and the step binds
entries first..last as its stack. Entry ``e`` of the
stack (slot ``first + e``) lists the (row, position) pairs of every token whose row uses it, with
the row's weight for it, padded with weight 0 to the longest entry (a padding item's result is
exactly zero). ``lora_back[row, position, k]`` is the (entry, item) holding the token's k-th
result, or a zero padding item when the row has fewer adapters than ``members`` (the widest row).
The graph computes each entry over its own tokens only (``graph/insert_lora.py``).

::

    rows:    r0: a       r1: b       r2: {a: .7, b: -.3}    r3: base        (decode: one token each)
    entries: a -> (r0,0) w 1, (r2,0) w .7,  pad w 0          back: r0 -> [(a,0), (a,2)]
             b -> (r1,0) w 1, (r2,0) w -.3, pad w 0                r2 -> [(a,1), (b,1)]
                                                                   r3 -> [(a,2), (a,2)]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from math import gcd

import numpy as np

RowAdapters = tuple[tuple[int, float], ...]  # (slot, weight) pairs of one row; () = base


@dataclass(frozen=True)
class StackLayout:
    """Which pool slots make one stack entry this step: ``group`` slots in a row, entry v being slots
    offset + (v-1)·group + 1 .. offset + v·group (a zero-copy view: slots are consecutive rows)."""

    group: int = 1
    offset: int = 0

    def entry(self, slot: int) -> int:
        return (slot - 1 - self.offset) // self.group + 1

    def slots(self, first: int, last: int) -> tuple[int, int]:
        """The pool slots of entries first..last."""
        return self.offset + (first - 1) * self.group + 1, self.offset + last * self.group


def stack_entries(rows: list[RowAdapters], span_of: Callable[[int], int],
                  num_slots: int) -> tuple[list[RowAdapters], StackLayout, int]:
    """Each row's members as stack entries, and the layout and number of entries the pool offers.

    An adapter above the pool's chunk rank spans several slots. When every adapter of the step
    starts and ends on a multiple of some group of slots (every adapter of one rank, say), an
    entry is that group, so each adapter is one entry and a token reads one result per adapter.
    Otherwise an entry is a slot, and a token sums its adapter's slots as separate members.
    """
    spans = {slot: span_of(slot) for members in rows for slot, _ in members}
    if not spans:
        return rows, StackLayout(), num_slots
    first = min(spans)
    group = 0
    for slot, span in spans.items():
        group = gcd(group, gcd(slot - first, span))
    layout = StackLayout(group, (first - 1) % group)
    entries = [tuple((layout.entry(slot) + part, weight) for slot, weight in members
                     for part in range(spans[slot] // group)) for members in rows]
    return entries, layout, (num_slots - layout.offset) // group


@dataclass(frozen=True)
class Routing:
    """The bound slot range and the per-entry and per-token inputs of one step."""

    first: int  # first bound slot (0 when no adapter is used: one empty entry is bound)
    last: int
    tokens: np.ndarray  # int64 [entries, entry_tokens, 2]
    weights: np.ndarray  # float [entries, entry_tokens, 1]
    back: np.ndarray  # int64 [rows, width, members, 2]


def route(rows: list[RowAdapters], lengths: list[int], dtype, slots: int = 0) -> Routing:
    """Lay out each used slot's tokens; row i feeds positions 0..lengths[i]-1 of this step.

    Tokens with fewer members than the widest row need a zero result: a padding item of an entry
    that has one to spare. When every entry is full (a decode step's entries hold one token
    each), the range takes one more slot of the pool (``slots``: its size) whose items are all
    padding, rather than widening every entry by an item: two items an entry instead of one
    would make every LoRA product of the step a packed GEMM instead of a matrix-vector product.
    """
    width = max(lengths)
    used = sorted({slot for members in rows for slot, _ in members})
    if not used:  # one empty entry whose single item is a zero result
        return Routing(0, -1, np.zeros((1, 1, 2), np.int64), np.zeros((1, 1, 1), dtype),
                       np.zeros((len(rows), width, 1, 2), np.int64))
    first, last = used[0], used[-1]
    entries: list[list[tuple[int, int, float]]] = [[] for _ in range(last - first + 1)]  # (row, member, weight)
    for row, members in enumerate(rows):
        for member, (slot, weight) in enumerate(members):
            entries[slot - first].append((row, member, weight))
    sizes = [sum(lengths[row] for row, _, _ in entry) for entry in entries]
    members = max(len(row) for row in rows)
    items = max(sizes)
    needs_zero = any(len(row) < members for row in rows) or any(length < width for length in lengths)
    spare = next((index for index, size in enumerate(sizes) if size < items), None)
    if needs_zero and spare is None:
        if last < slots:  # an extra entry: its weight-0 items give exact zeros whatever the slot holds
            last, spare = last + 1, len(entries)
            entries.append([])
        elif first > 1:
            first, spare = first - 1, 0
            entries.insert(0, [])
        else:
            items, spare = items + 1, 0
    tokens = np.zeros((len(entries), items, 2), np.int64)
    weights = np.zeros((len(entries), items, 1), dtype)
    back = np.zeros((len(rows), width, members, 2), np.int64)
    if spare is not None:
        back[...] = (spare, items - 1)  # a padding item: weight 0, result exactly zero
    for index, entry in enumerate(entries):
        start = 0
        for row, member, weight in entry:
            count = lengths[row]
            positions = np.arange(count)
            tokens[index, start:start + count, 0] = row
            tokens[index, start:start + count, 1] = positions
            weights[index, start:start + count, 0] = weight
            back[row, :count, member, 0] = index
            back[row, :count, member, 1] = start + positions
            start += count
    return Routing(first, last, tokens, weights, back)
