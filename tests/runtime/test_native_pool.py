"""The C++ slot pool: slot layout, rank padding, capacity growth, views that keep memory alive, checks.

The pool only copies ready arrays into slots; reading and validating adapter files is Python's
(tests/test_adapter_cache.py).
"""

from __future__ import annotations

import gc
import re

import numpy as np
import pytest

from edgelora.errors import UserInputError
from edgelora.runtime import native

# Two LoRA sites: (in_features, out_features).
SITES = [(3, 5), (4, 2)]
RNG = np.random.default_rng(0)


def _ready(rank: int, dtype=np.float32, skip: tuple[int, ...] = ()) -> tuple[list, list]:
    """Per site A^T [rank, in] and B [rank, out] (None for the sites in ``skip``)."""
    a, b = [], []
    for index, (in_features, out_features) in enumerate(SITES):
        if index in skip:
            a.append(None)
            b.append(None)
        else:
            a.append(RNG.standard_normal((rank, in_features)).astype(dtype))
            b.append(RNG.standard_normal((rank, out_features)).astype(dtype))
    return a, b


def _slot(pool, site: int, slot: int) -> tuple[np.ndarray, np.ndarray]:
    """The A^T [cap, in] and B [cap, out] one slot holds for one site."""
    return pool.a_view(site, slot, slot).copy(), pool.b_view(site, slot, slot).copy()


def _padded(array: np.ndarray, capacity: int) -> np.ndarray:
    padded = np.zeros((capacity, array.shape[1]), array.dtype)
    padded[: array.shape[0]] = array
    return padded


@pytest.fixture
def pool():
    return native.AdapterPool(SITES, 3, 8, "float32", "cpu")


def test_empty_pool_has_no_capacity(pool):
    assert (pool.rank_capacity, pool.num_slots, pool.max_rank, pool.num_sites) == (0, 3, 8, 2)
    assert (pool.dtype, pool.device, pool.size_bytes) == ("float32", "cpu", 0)
    assert [pool.slot_rank(slot) for slot in (1, 2, 3)] == [0, 0, 0]


def test_write_pads_rank_into_its_slot_only(pool):
    a, b = _ready(2)
    pool.write(2, 2, a, b)
    assert (pool.rank_capacity, pool.generation, pool.slot_rank(2)) == (2, 1, 2)
    for site in (0, 1):
        slot_a, slot_b = _slot(pool, site, 2)
        np.testing.assert_array_equal(slot_a, a[site])
        np.testing.assert_array_equal(slot_b, b[site])
        for other in (1, 3):
            slot_a, slot_b = _slot(pool, site, other)
            assert not slot_a.any() and not slot_b.any()


def test_capacity_growth_keeps_written_slots(pool):
    small, large = _ready(2), _ready(6)
    pool.write(3, 2, *small)
    pool.write(1, 6, *large)
    assert (pool.rank_capacity, pool.generation) == (6, 2)
    assert pool.size_bytes == 3 * 6 * 4 * (3 + 5 + 4 + 2)
    for site in (0, 1):
        for slot, (a, b) in ((3, small), (1, large)):
            slot_a, slot_b = _slot(pool, site, slot)
            np.testing.assert_array_equal(slot_a, _padded(a[site], 6))
            np.testing.assert_array_equal(slot_b, _padded(b[site], 6))
        assert not any(part.any() for part in _slot(pool, site, 2)), "an empty slot stays zero through growth"
    # A smaller adapter later does not shrink the capacity or move the buffers.
    pool.write(2, 1, *_ready(1))
    assert (pool.rank_capacity, pool.generation) == (6, 2)


def test_a_smaller_rank_in_a_reused_slot_leaves_no_old_rows(pool):
    pool.write(1, 6, *_ready(6))
    a, b = _ready(2)
    pool.write(1, 2, a, b)
    slot_a, slot_b = _slot(pool, 0, 1)
    np.testing.assert_array_equal(slot_a, _padded(a[0], 6))
    np.testing.assert_array_equal(slot_b, _padded(b[0], 6))


def test_stack_of_slots_is_contiguous(pool):
    first, second = _ready(4), _ready(4)
    pool.write(1, 4, *first)
    pool.write(2, 4, *second)
    stack = pool.a_view(0, 1, 2)
    assert stack.shape == (2 * 4, SITES[0][0])
    np.testing.assert_array_equal(stack[:4], first[0][0])
    np.testing.assert_array_equal(stack[4:], second[0][0])
    stack_b = pool.b_view(0, 2, 3).reshape(2, 4, SITES[0][1])
    np.testing.assert_array_equal(stack_b[0], second[1][0])
    assert not stack_b[1].any()


def test_untargeted_site_is_zeroed_when_a_slot_is_reused(pool):
    pool.write(1, 3, *_ready(3))
    a, b = _ready(3, skip=(1,))
    pool.write(1, 3, a, b)
    slot_a, slot_b = _slot(pool, 1, 1)
    assert not slot_a.any() and not slot_b.any()
    np.testing.assert_array_equal(_slot(pool, 0, 1)[0], a[0])


def test_clear_zeroes_a_slot(pool):
    pool.write(1, 2, *_ready(2))
    pool.clear(1)
    assert pool.slot_rank(1) == 0
    for site in (0, 1):
        slot_a, slot_b = _slot(pool, site, 1)
        assert not slot_a.any() and not slot_b.any()


def test_move_takes_the_adapter_to_another_slot_and_clears_the_source(pool):
    big_a, big_b = _ready(4)
    small_a, small_b = _ready(2, skip=(1,))
    pool.write(1, 4, big_a, big_b)  # the target holds a larger rank: its extra rows must not survive
    pool.write(3, 2, small_a, small_b)
    pool.move(3, 1)
    assert [pool.slot_rank(slot) for slot in (1, 2, 3)] == [2, 0, 0]
    slot_a, slot_b = _slot(pool, 0, 1)
    np.testing.assert_array_equal(slot_a, _padded(small_a[0], 4))
    np.testing.assert_array_equal(slot_b, _padded(small_b[0], 4))
    for site in (0, 1):
        assert not any(array.any() for array in _slot(pool, site, 3))
    assert not any(array.any() for array in _slot(pool, 1, 1)), "an untargeted site moves as zeros"
    with pytest.raises(ValueError, match="outside 1..3"):
        pool.move(0, 1)


def test_float16_pool(tmp_path):
    pool = native.AdapterPool(SITES, 2, 8, "float16", "cpu")
    a, b = _ready(3, np.float16)
    pool.write(1, 3, a, b)
    assert pool.a_view(0, 1, 1).dtype == np.float16
    np.testing.assert_array_equal(_slot(pool, 0, 1)[0], a[0])
    with pytest.raises(ValueError, match="float16"):
        pool.write(2, 3, *_ready(3, np.float32))


def test_views_keep_their_memory_alive():
    """A view handed to ONNX Runtime outlives the pool and a capacity growth without dangling."""
    pool = native.AdapterPool(SITES, 2, 8, "float32", "cpu")
    a, b = _ready(2)
    pool.write(1, 2, a, b)
    view = pool.a_view(0, 1, 1)
    pool.write(2, 6, *_ready(6))  # grows: the pool now uses new buffers
    del pool
    gc.collect()
    np.testing.assert_array_equal(view[:2], a[0])  # the old buffer is still there for the view


@pytest.mark.parametrize("case, message", [
    ("shape", "site 0 A^T: expected a C-contiguous float32 array [2, 3]"),
    ("half", "A without B"),
    ("count", "one entry (array or None) per LoRA site"),
    ("rank", "outside 1..8"),
    ("strided", "C-contiguous"),
])
def test_bad_arrays_raise_and_leave_the_slot(pool, case, message):
    good_a, good_b = _ready(2)
    pool.write(1, 2, good_a, good_b)
    a, b, rank = *_ready(2), 2
    if case == "shape":
        a[0] = np.ones((2, 4), np.float32)
    elif case == "half":
        b[1] = None
    elif case == "count":
        a, b = a[:1], b[:1]
    elif case == "rank":
        a, b, rank = *_ready(9), 9
    elif case == "strided":
        a[0] = np.ones((3, 2), np.float32).T
    with pytest.raises(ValueError, match=re.escape(message)):
        pool.write(1, rank, a, b)
    np.testing.assert_array_equal(_slot(pool, 0, 1)[0], good_a[0])
    assert pool.slot_rank(1) == 2


def test_slot_and_range_checks(pool):
    with pytest.raises(ValueError, match="outside 1..3"):
        pool.clear(0)
    with pytest.raises(ValueError, match="outside 1..3"):
        pool.a_view(0, 1, 4)
    with pytest.raises(ValueError, match="empty"):
        pool.b_pointer(0, 3, 2)
    with pytest.raises(ValueError, match="site index"):
        pool.a_view(2, 1, 1)


def test_bad_pool_settings():
    with pytest.raises(ValueError, match="dtype"):
        native.AdapterPool(SITES, 2, 8, "int8", "cpu")
    with pytest.raises(ValueError, match="at least one slot"):
        native.AdapterPool(SITES, 0, 8, "float32", "cpu")


@pytest.mark.skipif(native.with_cuda(), reason="the runtime has CUDA")
def test_cuda_pool_without_a_cuda_build_is_a_user_error():
    with pytest.raises(UserInputError, match="built without CUDA"):
        native.AdapterPool(SITES, 2, 8, "float32", "cuda")


def test_read_bandwidth_is_positive():
    assert native.read_bandwidth(threads=1, size_bytes=8 << 20, repeats=1) > 1e8
