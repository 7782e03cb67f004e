"""The C++ adapter pool: slot layout, rank padding, capacity growth, dtype conversion, validation."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from edgelora.runtime import native

# Two LoRA sites: (a_name, b_name, in_features, out_features).
SITES = [("s0.A", "s0.B", 3, 5), ("s1.A", "s1.B", 4, 2)]
RNG = np.random.default_rng(0)


def _adapter(rank: int, sites=SITES, dtype=np.float32) -> dict[str, np.ndarray]:
    tensors = {}
    for a_name, b_name, in_features, out_features in sites:
        tensors[a_name] = RNG.standard_normal((in_features, rank)).astype(dtype)
        tensors[b_name] = RNG.standard_normal((rank, out_features)).astype(dtype)
    return tensors


def _write(tmp_path: Path, name: str, tensors: dict[str, np.ndarray]) -> str:
    path = tmp_path / f"{name}.safetensors"
    save_file(tensors, str(path))
    return str(path)


def _slot(pool, site: int, slot: int, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """The A^T [cap, in] and B [cap, out] one slot holds for one site."""
    _, _, in_features, out_features = SITES[site]
    cap = pool.rank_capacity
    a = native.host_view(pool.a_pointer(site, slot, slot), (cap, in_features), dtype)
    b = native.host_view(pool.b_pointer(site, slot, slot), (cap, out_features), dtype)
    return a.copy(), b.copy()


def _padded(tensors, site: int, cap: int) -> tuple[np.ndarray, np.ndarray]:
    a_name, b_name, in_features, out_features = SITES[site]
    a, b = tensors[a_name], tensors[b_name]
    rank = a.shape[1]
    a_pad = np.zeros((cap, in_features), np.float32)
    b_pad = np.zeros((cap, out_features), np.float32)
    a_pad[:rank] = a.T
    b_pad[:rank] = b
    return a_pad, b_pad


@pytest.fixture
def pool():
    return native.AdapterPool(SITES, 3, 8, "float32", "cpu")


def test_empty_pool_has_no_capacity(pool):
    assert (pool.rank_capacity, pool.num_slots, pool.max_rank, pool.num_sites) == (0, 3, 8, 2)
    assert (pool.dtype, pool.device, pool.size_bytes) == ("float32", "cpu", 0)
    assert [pool.slot_rank(slot) for slot in (1, 2, 3)] == [0, 0, 0]


def test_load_pads_rank_into_its_slot_only(pool, tmp_path):
    tensors = _adapter(2)
    assert pool.load(2, _write(tmp_path, "r2", tensors)) == 2
    assert (pool.rank_capacity, pool.generation, pool.slot_rank(2)) == (2, 1, 2)
    for site in (0, 1):
        a, b = _slot(pool, site, 2)
        expected_a, expected_b = _padded(tensors, site, 2)
        np.testing.assert_array_equal(a, expected_a)
        np.testing.assert_array_equal(b, expected_b)
        for other in (1, 3):
            a, b = _slot(pool, site, other)
            assert not a.any() and not b.any()


def test_capacity_growth_keeps_loaded_slots(pool, tmp_path):
    small, large = _adapter(2), _adapter(6)
    pool.load(3, _write(tmp_path, "small", small))
    pool.load(1, _write(tmp_path, "large", large))
    assert (pool.rank_capacity, pool.generation) == (6, 2)
    assert pool.size_bytes == 3 * 6 * 4 * (3 + 5 + 4 + 2)
    for site in (0, 1):
        for slot, tensors in ((3, small), (1, large)):
            a, b = _slot(pool, site, slot)
            expected_a, expected_b = _padded(tensors, site, 6)
            np.testing.assert_array_equal(a, expected_a)
            np.testing.assert_array_equal(b, expected_b)
    # A smaller adapter later does not shrink the capacity or move the buffers.
    pool.load(2, _write(tmp_path, "again", _adapter(1)))
    assert (pool.rank_capacity, pool.generation) == (6, 2)


def test_stack_of_slots_is_contiguous(pool, tmp_path):
    first, second = _adapter(4), _adapter(4)
    pool.load(1, _write(tmp_path, "x", first))
    pool.load(2, _write(tmp_path, "y", second))
    _, _, in_features, out_features = SITES[0]
    stack = native.host_view(pool.a_pointer(0, 1, 2), (2 * 4, in_features), np.float32)  # A^T rows
    np.testing.assert_array_equal(stack[:4], first["s0.A"].T)
    np.testing.assert_array_equal(stack[4:], second["s0.A"].T)
    stack_b = native.host_view(pool.b_pointer(0, 2, 3), (2, 4, out_features), np.float32)
    np.testing.assert_array_equal(stack_b[0], second["s0.B"])
    assert not stack_b[1].any()


def test_untargeted_site_is_zeroed_when_a_slot_is_reused(pool, tmp_path):
    pool.load(1, _write(tmp_path, "full", _adapter(3)))
    only_first = {k: v for k, v in _adapter(3).items() if k.startswith("s0.")}
    pool.load(1, _write(tmp_path, "partial", only_first))
    a, b = _slot(pool, 1, 1)
    assert not a.any() and not b.any()
    a, _ = _slot(pool, 0, 1)
    np.testing.assert_array_equal(a, only_first["s0.A"].T)


def test_clear_zeroes_a_slot(pool, tmp_path):
    pool.load(1, _write(tmp_path, "x", _adapter(2)))
    pool.clear(1)
    assert pool.slot_rank(1) == 0
    for site in (0, 1):
        a, b = _slot(pool, site, 1)
        assert not a.any() and not b.any()


def test_float16_pool_converts_float32_and_bfloat16(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file as save_torch

    pool = native.AdapterPool(SITES, 2, 8, "float16", "cpu")
    values = _adapter(3)
    values["s0.A"][0, 0] = 1e-6  # subnormal in half
    values["s0.A"][1, 0] = 70000.0  # overflows half
    pool.load(1, _write(tmp_path, "f32", values))
    a, b = _slot(pool, 0, 1, np.float16)
    np.testing.assert_array_equal(a, values["s0.A"].T.astype(np.float16))
    np.testing.assert_array_equal(b, values["s0.B"].astype(np.float16))

    bf16 = {name: torch.from_numpy(array).to(torch.bfloat16) for name, array in _adapter(3).items()}
    path = tmp_path / "bf16.safetensors"
    save_torch(bf16, str(path))
    pool.load(2, str(path))
    a, _ = _slot(pool, 1, 2, np.float16)
    np.testing.assert_array_equal(a, bf16["s1.A"].float().numpy().T.astype(np.float16))


def test_float16_file_into_float32_pool(pool, tmp_path):
    values = _adapter(2, dtype=np.float16)
    pool.load(1, _write(tmp_path, "f16", values))
    a, _ = _slot(pool, 1, 1)
    np.testing.assert_array_equal(a, values["s1.A"].T.astype(np.float32))


@pytest.mark.parametrize("case, message", [
    ("unknown", "has no LoRA input"),
    ("shape", "is [4, 2], expected [3, rank]"),
    ("ranks", "has rank"),
    ("too_large", "outside 1..8"),
    ("half", "has no matching"),
    ("empty", "no LoRA tensors"),
    ("truncated", "truncated file?"),
    ("corrupt", "corrupt header"),
    ("missing", "cannot open"),
])
def test_bad_files_raise_and_leave_the_slot(pool, tmp_path, case, message):
    good = _adapter(2)
    pool.load(1, _write(tmp_path, "good", good))
    before = [_slot(pool, site, 1) for site in (0, 1)]
    tensors = _adapter(2)
    if case == "unknown":
        tensors["s9.A"] = np.ones((3, 2), np.float32)
    elif case == "shape":
        tensors["s0.A"] = np.ones((4, 2), np.float32)
    elif case == "ranks":
        tensors["s1.B"] = np.ones((3, 2), np.float32)
    elif case == "too_large":
        tensors = _adapter(9)
    elif case == "half":
        del tensors["s1.B"]
    elif case == "empty":
        tensors = {}
    path = _write(tmp_path, "bad", tensors) if tensors or case == "empty" else ""
    if case == "truncated":
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) - 7])
    elif case == "corrupt":
        Path(path).write_bytes(b"\x10" + bytes(7) + b"{not json}      ")
    elif case == "missing":
        path = str(tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match=re.escape(message)):
        pool.load(1, path)
    after = [_slot(pool, site, 1) for site in (0, 1)]
    for (a0, b0), (a1, b1) in zip(before, after):
        np.testing.assert_array_equal(a0, a1)
        np.testing.assert_array_equal(b0, b1)
    assert pool.slot_rank(1) == 2


def test_slot_and_range_checks(pool):
    with pytest.raises(ValueError, match="outside 1..3"):
        pool.clear(0)
    with pytest.raises(ValueError, match="outside 1..3"):
        pool.a_pointer(0, 1, 4)
    with pytest.raises(ValueError, match="empty"):
        pool.b_pointer(0, 3, 2)
    with pytest.raises(ValueError, match="site index"):
        pool.a_pointer(2, 1, 1)


def test_bad_pool_settings():
    with pytest.raises(ValueError, match="dtype"):
        native.AdapterPool(SITES, 2, 8, "int8", "cpu")
    with pytest.raises(ValueError, match="at least one slot"):
        native.AdapterPool(SITES, 0, 8, "float32", "cpu")
    if not native.with_cuda():
        with pytest.raises(ValueError, match="without CUDA"):
            native.AdapterPool(SITES, 2, 8, "float32", "cuda")


def test_read_bandwidth_is_positive():
    assert native.read_bandwidth(threads=1, size_bytes=8 << 20, repeats=1) > 1e8
