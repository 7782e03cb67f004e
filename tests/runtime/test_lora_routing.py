"""lora_routing: each entry lists its own tokens, each token reads back exactly its own results."""

from __future__ import annotations

import numpy as np
import pytest

from edgelora.runtime.lora_routing import route


@pytest.mark.parametrize("rows, lengths", [
    ([((3, 1.0),), ((1, 1.0),), ((1, 0.7), (3, -0.3)), ()], [1, 1, 1, 1]),  # decode: singles, a mix, a base row
    ([((2, 1.0),)] * 3 + [((5, 1.0),)], [4, 7, 2, 7]),  # prefill, right-padded, uneven entries, slot gap
    ([((1, 1.0),), ((2, 1.0),)], [1, 1]),  # every entry full: no padding item is needed
    ([((1, 0.5), (2, 0.5)), ((1, 1.0),)], [3, 3]),  # the second row has fewer members than the first
])
def test_every_token_reads_its_own_weighted_results_and_zeros_otherwise(rows, lengths):
    routing = route(rows, lengths, np.float32)
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


def test_a_base_only_step_binds_one_empty_entry():
    routing = route([(), ()], [5, 3], np.float32)
    assert routing.first == 0 and routing.tokens.shape[0] == 1 and not routing.weights.any()
    assert routing.back.shape == (2, 5, 1, 2) and not routing.back.any()
