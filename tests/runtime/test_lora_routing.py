"""lora_routing: each entry lists its own tokens, each token reads back exactly its own results."""

from __future__ import annotations

import numpy as np
import pytest

from edgelora.runtime.lora_routing import StackLayout, route, stack_entries


@pytest.mark.parametrize("rows, lengths", [
    ([((3, 1.0),), ((1, 1.0),), ((1, 0.7), (3, -0.3)), ()], [1, 1, 1, 1]),  # decode: singles, a mix, a base row
    ([((2, 1.0),)] * 3 + [((5, 1.0),)], [4, 7, 2, 7]),  # prefill, right-padded, uneven entries, slot gap
    ([((1, 1.0),), ((2, 1.0),)], [1, 1]),  # every entry full: no padding item is needed
    ([((1, 0.5), (2, 0.5)), ((1, 1.0),)], [3, 3]),  # the second row has fewer members than the first
])
@pytest.mark.parametrize("slots", [0, 5, 9], ids=["pool-full", "slot-below", "slot-above"])
def test_every_token_reads_its_own_weighted_results_and_zeros_otherwise(rows, lengths, slots):
    routing = route(rows, lengths, np.float32, slots)
    width, members = max(lengths), max(len(row) for row in rows)
    assert routing.back.shape == (len(rows), width, members, 2)
    seen = set()
    for row, row_members in enumerate(rows):
        for position in range(width):
            for k in range(members):
                entry, item = routing.back[row, position, k]
                weight = float(routing.weights[entry, item, 0])
                if position < lengths[row] and k < len(row_members):
                    slot, expected = row_members[k]
                    assert entry == slot - routing.first
                    assert tuple(routing.tokens[entry, item]) == (row, position)
                    assert weight == pytest.approx(expected)
                    assert (entry, item) not in seen, "two tokens read one result"
                    seen.add((entry, item))
                else:
                    assert weight == 0.0, "a token without this member must read a zero result"
    assert routing.weights.shape[0] == routing.last - routing.first + 1


def test_a_base_only_step_binds_one_empty_entry():
    routing = route([(), ()], [5, 3], np.float32)
    assert routing.first == 0 and routing.tokens.shape[0] == 1 and not routing.weights.any()
    assert routing.back.shape == (2, 5, 1, 2) and not routing.back.any()


@pytest.mark.parametrize("slots, first, last, items", [
    (3, 1, 3, 1),  # the slot above the used ones takes the padding: entries keep one item
    (2, 1, 2, 2),  # no slot above, none below: every entry grows by one item
])
def test_a_decode_step_with_full_entries_pads_with_an_extra_slot_not_an_extra_item(slots, first, last, items):
    """A base row beside two single-adapter rows needs a zero result; both entries hold one token."""
    routing = route([((1, 1.0),), ((2, 1.0),), ()], [1, 1, 1], np.float32, slots)
    assert (routing.first, routing.last, routing.tokens.shape[1]) == (first, last, items)
    entry, item = routing.back[2, 0, 0]
    assert routing.weights[entry, item, 0] == 0.0


def test_adapters_of_one_span_are_one_entry_each_and_mixed_spans_one_entry_a_slot():
    """Spans (slots an adapter takes) 4 and 4 at slots 5 and 9: entries of 4 slots, one per adapter."""
    spans = {5: 4, 9: 4, 13: 1}.get
    rows, layout, available = stack_entries([((9, 1.0),), ((5, 0.5), (9, 0.5)), ()], spans, 16)
    assert (layout, available) == (StackLayout(4, 0), 4)
    assert rows == [((3, 1.0),), ((2, 0.5), (3, 0.5)), ()]
    assert layout.slots(2, 3) == (5, 12)
    rows, layout, available = stack_entries([((9, 1.0),), ((13, 1.0),)], spans, 16)
    assert (layout, available) == (StackLayout(1, 0), 16), "a span of 1 beside a span of 4: one slot an entry"
    assert rows == [tuple((slot, 1.0) for slot in range(9, 13)), ((13, 1.0),)]
    rows, layout, available = stack_entries([((6, 1.0),)], {6: 2}.get, 9)
    assert (layout, available, rows) == (StackLayout(2, 1), 4, [((3, 1.0),)])
    assert layout.slots(3, 3) == (6, 7)
