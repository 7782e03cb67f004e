"""The adapter cache: registry -> host-ready copies -> slots, as a state table, plus bad adapter files.

Sizes: ``max_loras`` slots and ``max_cpu_loras`` host-ready copies; a registered adapter is never
forgotten (it is read again from its file when neither level holds it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from edgelora import LLM, LoraConfig, LoRARequest, SamplingParams
from edgelora.errors import AdapterError, EdgeLoraError, UserInputError
from edgelora.formats import contract
from edgelora.runtime import native
from edgelora.runtime.adapter_cache import AdapterCache


@pytest.fixture(scope="module")
def qwen2(exported_samples):
    return exported_samples["qwen2"]


def _cache(exported, max_loras=2, max_cpu_loras=2, dtype=np.float32) -> AdapterCache:
    pool = native.AdapterPool([(s.in_features, s.out_features) for s in exported.manifest.sites], max_loras,
                              contract.MAX_LORA_RANK, "float32" if dtype == np.float32 else "float16", "cpu")
    return AdapterCache(pool, exported.spec, exported.manifest, contract.MAX_LORA_RANK, max_cpu_loras, dtype)


def _slot_holds(cache: AdapterCache, exported, name: str) -> bool:
    """The slot of ``name`` holds that adapter's A^T for its first targeted site."""
    tensors = load_file(str(exported.processed[name] / contract.PROCESSED_ADAPTER))
    for index, site in enumerate(exported.manifest.sites):
        if site.a_name in tensors:
            a = tensors[site.a_name]
            view = cache._pool.a_view(index, cache.slot_of(name), cache.slot_of(name))
            return bool(np.array_equal(view[: a.shape[1]], a.T.astype(np.float32)))
    raise AssertionError(f"{name} targets nothing")


def test_lifecycle_state_table(qwen2):
    """add -> activate -> slot table -> evict -> pin -> release, with the state asserted after each step."""
    cache = _cache(qwen2)
    for name in ("a1", "a2", "a3"):
        cache.add(name, qwen2.processed[name])
    assert (cache.names(), cache.slot_table(), cache.host_ready()) == (["a1", "a2", "a3"], {}, [])

    assert cache.activate("a1") == 1
    assert (cache.slot_table(), cache.host_ready()) == ({1: "a1"}, ["a1"])
    assert cache.activate("a2") == 2
    assert (cache.slot_table(), cache.host_ready()) == ({1: "a1", 2: "a2"}, ["a1", "a2"])
    assert _slot_holds(cache, qwen2, "a1") and _slot_holds(cache, qwen2, "a2")

    held = cache.acquire(["a2"])  # a running batch holds a2
    assert held == {"a2": 2} and cache.get("a2").references == 1
    assert cache.activate("a3") == 1, "the least recently used idle slot (a1's) is evicted"
    assert (cache.slot_table(), cache.host_ready()) == ({1: "a3", 2: "a2"}, ["a2", "a3"])
    assert cache.slot_of("a1") == 0 and "a1" in cache, "evicted from both levels, still registered"
    assert (cache.stats.slot_evictions, cache.stats.host_evictions) == (1, 1)
    assert _slot_holds(cache, qwen2, "a3")

    cache.pin("a1")  # read again from its file, into the only idle slot
    assert cache.slot_table() == {1: "a1", 2: "a2"} and cache.get("a1").pinned
    assert cache.host_ready() == ["a3", "a1"] and cache.stats.host_misses == 4
    assert _slot_holds(cache, qwen2, "a1")
    with pytest.raises(EdgeLoraError, match="every adapter slot is held"):
        cache.activate("a3")  # a2 held by a batch, a1 pinned
    assert cache.slot_table() == {1: "a1", 2: "a2"}, "a failed activation changes nothing"

    cache.release(["a2"])
    assert cache.get("a2").references == 0
    assert cache.activate("a3") == 2, "a2 is idle now: its slot goes to a3; pinned a1 stays"
    assert cache.slot_table() == {1: "a1", 2: "a3"}
    assert cache.stats.host_hits >= 1, "a3 came from its host-ready copy"

    cache.pin("a1", False)
    ref = cache.current("a1")
    cache.acquire([ref])  # a running batch holds a1's version
    assert cache.remove("a1") is False, "held by a batch: removal waits for it"
    assert "a1" not in cache and cache.names() == ["a2", "a3"]
    assert cache.slot_table() == {1: str(ref), 2: "a3"}, "the held version keeps its slot, shown as name@version"
    with pytest.raises(UserInputError, match="unknown adapter 'a1'"):
        cache.activate("a1")
    cache.release([ref])
    assert (cache.slot_table(), ref in cache.versions()) == ({2: "a3"}, False), "freed with the last reference"
    assert cache.remove("a3") is True, "nothing holds a3: gone at once"


def test_acquire_never_evicts_what_the_same_batch_holds(qwen2):
    cache = _cache(qwen2)
    for name in ("a1", "a2", "a3"):
        cache.add(name, qwen2.processed[name])
    assert cache.acquire(["a1", "a2", "a1"]) == {"a1": 1, "a2": 2}
    with pytest.raises(UserInputError, match="a batch uses 3 adapters but the slots hold at most 2"):
        cache.acquire(["a1", "a2", "a3"])
    assert cache.get("a1").references == 1 and cache.get("a2").references == 1, "a refused acquire holds nothing more"



# -- ranks above the chunk rank: an adapter takes several pool slots in a row ----------------------


def _chunked_cache(exported, slots: int, max_loras: int, chunk_rank: int = 4) -> AdapterCache:
    pool = native.AdapterPool([(s.in_features, s.out_features) for s in exported.manifest.sites], slots, chunk_rank,
                              "float32", "cpu")
    return AdapterCache(pool, exported.spec, exported.manifest, contract.MAX_LORA_RANK, 8, max_loras=max_loras)


def _holds_all(cache: AdapterCache, exported, name: str, folder: Path | None = None) -> bool:
    """The slots of ``name`` hold all its A^T and B rows, every targeted site, chunk after chunk."""
    folder = folder or exported.processed[name.rstrip("x")]
    tensors = load_file(str(folder / contract.PROCESSED_ADAPTER))
    first, span = cache.slot_of(name), cache.get(name).span
    for index, site in enumerate(exported.manifest.sites):
        if site.a_name not in tensors:
            continue
        a, b = tensors[site.a_name], tensors[site.b_name]
        held_a = cache._pool.a_view(index, first, first + span - 1).reshape(-1, site.in_features)
        held_b = cache._pool.b_view(index, first, first + span - 1).reshape(-1, site.out_features)
        if not (np.array_equal(held_a[: a.shape[1]], a.T.astype(np.float32))
                and np.array_equal(held_b[: b.shape[0]], b.astype(np.float32))
                and not held_a[a.shape[1]:].any() and not held_b[b.shape[0]:].any()):
            return False
    return True


def test_ranks_above_the_chunk_rank_take_runs_of_slots_packed_when_fragmented(qwen2):
    """Chunk rank 4: a1 (r8) takes 2 slots, a2 (r16) 4, a3 (r4) 1; 8 slots in all."""
    cache = _chunked_cache(qwen2, slots=8, max_loras=4)
    for name in ("a1", "a2", "a3"):
        cache.add(name, qwen2.processed[name])
    cache.add("a1x", qwen2.processed["a1"])  # the same bytes under a second name: r8 again
    assert [cache.activate(name) for name in ("a1", "a3", "a2")] == [1, 3, 4]
    assert [cache.get(name).span for name in ("a1", "a3", "a2")] == [2, 1, 4]
    assert all(_holds_all(cache, qwen2, name) for name in ("a1", "a2", "a3"))

    cache.deactivate("a3")  # slots 3 and 8 free: room for two, not in a row
    cache.acquire(["a1", "a2"])
    assert cache.can_take([cache.current("a1x")])
    assert cache.activate("a1x") == 7, "the resident adapters move down; the free slots meet at the end"
    assert cache.slot_table() == {1: "a1", 3: "a2", 7: "a1x"}
    assert all(_holds_all(cache, qwen2, name) for name in ("a1", "a2", "a1x"))
    cache.acquire(["a1x"])
    assert not cache.can_take([cache.current("a3")]), "all 8 slots held by a running batch"
    with pytest.raises(EdgeLoraError, match="every adapter slot is held"):
        cache.activate("a3")
    assert cache.slot_table() == {1: "a1", 3: "a2", 7: "a1x"}, "a failed activation changes nothing"

    cache.release(["a1"])
    moves = cache.stats.slot_moves
    cache.compact(["a2", "a1x"])  # a2 (3..6) is inside 1..6 and stays; a1x moves into a1's hole, a1 leaves
    assert cache.slot_table() == {1: "a1x", 3: "a2"} and cache.stats.slot_moves == moves + 1
    assert all(_holds_all(cache, qwen2, name) for name in ("a2", "a1x"))
    assert not cache._pool.a_view(0, 7, 8).any(), "slots left behind are cleared"
    assert cache.activate("a3") == 7


def test_compaction_fills_holes_from_the_top_with_one_move_a_hole(qwen2):
    """a1, a2, a3, a1x in slots 1..4 (one slot each); a2's rows end: a1x alone moves (into slot 2), rather than
    a3 and a1x each down by one; a2, idle and in the way with no free slot past 3, leaves the slots."""
    cache = _chunked_cache(qwen2, slots=4, max_loras=4, chunk_rank=16)
    for name in ("a1", "a2", "a3"):
        cache.add(name, qwen2.processed[name])
    cache.add("a1x", qwen2.processed["a1"])
    assert [cache.activate(name) for name in ("a1", "a2", "a3", "a1x")] == [1, 2, 3, 4]
    moves = cache.stats.slot_moves
    cache.compact(["a1", "a3", "a1x"])
    assert cache.slot_table() == {1: "a1", 2: "a1x", 3: "a3"} and cache.stats.slot_moves == moves + 1
    assert cache.stats.slot_evictions == 1, "a2 had nowhere past slot 3 to go: it left the slots"
    assert all(_holds_all(cache, qwen2, name) for name in ("a1", "a3", "a1x"))
    cache.compact(["a1", "a3", "a1x"])
    assert cache.stats.slot_moves == moves + 1, "already packed: nothing moves"


def test_random_loads_and_compactions_keep_every_adapter_whole_and_running_ones_packed(qwen2, tmp_path):
    """200 random steps over six adapters (each its own bytes) of spans 2, 4 and 1 (chunk rank 4) in 12 slots:
    after each compaction the running adapters fill slots 1..k exactly and every resident adapter holds its rows."""
    folders = {}
    for source in ("a1", "a2", "a3"):
        for copy, scale in ((source, 1.0), (f"{source}_2", 2.0)):
            folders[copy] = tmp_path / copy
            shutil.copytree(qwen2.processed[source], folders[copy])
            weights = folders[copy] / contract.PROCESSED_ADAPTER
            save_file({key: value * scale for key, value in load_file(str(weights)).items()}, str(weights))
    cache = _chunked_cache(qwen2, slots=12, max_loras=6)
    for name, folder in folders.items():
        cache.add(name, folder)
    rng = np.random.default_rng(5)
    running: set[str] = set()
    for _ in range(200):
        if running and rng.random() < 0.4:
            done = str(rng.choice(sorted(running)))
            cache.release([done])
            running.discard(done)
        new = str(rng.choice([name for name in folders if name not in running]))
        if cache.is_resident(new) or cache.can_take([cache.current(new)]):
            cache.acquire([new])
            running.add(new)
        cache.compact(sorted(running))
        taken = sorted(cache.slot_of(name) + chunk for name in running for chunk in range(cache.get(name).span))
        assert taken == list(range(1, 1 + len(taken))), cache.slot_table()
        assert all(_holds_all(cache, qwen2, name, folders[name]) for name in cache.slot_table().values())
    assert cache.stats.slot_moves > 0 and cache.stats.slot_evictions > 0


def test_max_loras_bounds_adapters_in_slots_whatever_their_ranks(qwen2):
    cache = _chunked_cache(qwen2, slots=16, max_loras=2)
    for name in ("a1", "a2", "a3"):
        cache.add(name, qwen2.processed[name])
    cache.acquire(["a3", "a1"])
    assert not cache.can_take([cache.current("a2")]), "two adapters in slots, both running"
    cache.release(["a3"])
    assert cache.can_take([cache.current("a2")])
    assert cache.activate("a2") == 4 and cache.slot_table() == {2: "a1", 4: "a2"}, "a3 (idle) left; r16 needs 4 in a row"


# -- versions: a name points at the digest of its files' bytes ----------------------------------


def _slot_matches(cache: AdapterCache, exported, slot: int, source: str) -> bool:
    """Slot ``slot`` holds the A^T of processed adapter ``source`` at its first targeted site."""
    tensors = load_file(str(exported.processed[source] / contract.PROCESSED_ADAPTER))
    index, site = next((i, s) for i, s in enumerate(exported.manifest.sites) if s.a_name in tensors)
    a = tensors[site.a_name]
    return bool(np.array_equal(cache._pool.a_view(index, slot, slot)[: a.shape[1]], a.T.astype(np.float32)))


def _replace_files(folder: Path, source: Path) -> None:
    """Overwrite an adapter folder's files in place (a retrained adapter shipped to the same path)."""
    for name in (contract.PROCESSED_ADAPTER, contract.PROCESSED_CONFIG):
        shutil.copy(source / name, folder / name)


def test_same_bytes_again_are_the_same_version(qwen2, tmp_path):
    shutil.copytree(qwen2.processed["a1"], tmp_path / "copy")
    cache = _cache(qwen2)
    first = cache.add("a1", qwen2.processed["a1"])
    assert cache.add("a1", qwen2.processed["a1"] / contract.PROCESSED_ADAPTER) is first
    assert cache.add("a1", tmp_path / "copy") is first, "a copy of the same bytes is the same version"
    assert cache.versions() == [first.ref] and len(first.version) == 16


def test_new_files_under_a_name_serve_new_holders_while_old_holders_finish(qwen2):
    """add v1 -> a request holds it in a slot -> add v2 under the name -> both in slots -> v1 freed on release."""
    cache = _cache(qwen2)
    cache.add("cust", qwen2.processed["a1"])
    old = cache.hold("cust")  # a running request on v1
    cache.acquire([old])
    assert cache.slot_table() == {1: "cust"}
    new = cache.add("cust", qwen2.processed["a2"]).ref
    assert new != old and cache.current("cust") == new and cache.get(old).retired
    assert cache.hold("cust") == new, "a request from now on gets the new version"
    assert cache.acquire([new]) == {new: 2}
    assert cache.slot_table() == {1: str(old), 2: "cust"}
    assert _slot_matches(cache, qwen2, 1, "a1") and _slot_matches(cache, qwen2, 2, "a2")
    cache.release([old])
    assert old in cache.versions(), "the request still holds v1 (it may run another step)"
    cache.unhold(old)
    assert cache.versions() == [new] and cache.slot_table() == {2: "cust"} and cache.host_ready() == ["cust"]


def test_reloading_retired_bytes_while_held_makes_them_current_again(qwen2):
    cache = _cache(qwen2)
    v1 = cache.add("cust", qwen2.processed["a1"]).ref
    cache.hold(v1)
    cache.add("cust", qwen2.processed["a2"])
    assert cache.add("cust", qwen2.processed["a1"]).ref == v1 and not cache.get(v1).retired
    cache.unhold(v1)
    assert cache.current("cust") == v1 and v1 in cache.versions(), "current again: not freed"


def test_files_replaced_in_place_and_loaded_again_are_a_new_version(qwen2, tmp_path):
    folder = tmp_path / "cust"
    shutil.copytree(qwen2.processed["a1"], folder)
    cache = _cache(qwen2)
    old = cache.add("cust", folder).ref
    cache.hold(old)
    cache.activate(old)
    _replace_files(folder, qwen2.processed["a2"])
    new = cache.add("cust", folder).ref
    assert new != old
    slot = cache.activate("cust")
    assert slot != cache.slot_of(old) and _slot_matches(cache, qwen2, slot, "a2"), "no tier serves v1's bytes for v2"
    assert _slot_matches(cache, qwen2, cache.slot_of(old), "a1"), "the holder of v1 still reads v1"


def test_files_changed_on_disk_without_a_load_are_never_read_as_the_registered_version(qwen2, tmp_path):
    folder = tmp_path / "cust"
    shutil.copytree(qwen2.processed["a1"], folder)
    cache = _cache(qwen2, max_loras=1)
    ref = cache.add("cust", folder).ref
    cache.prefetch("cust")
    _replace_files(folder, qwen2.processed["a2"])
    assert cache.activate("cust") == 1 and _slot_matches(cache, qwen2, 1, "a1"), "the valid host copy serves it"
    cache.deactivate("cust")
    cache.forget_host_copy("cust")
    with pytest.raises(AdapterError, match="adapter files changed on disk since it was loaded.*load it again"):
        cache.activate("cust")
    assert (cache.slot_table(), cache.host_ready(), cache.current("cust")) == ({}, [], ref), "nothing half-loaded"
    assert cache.add("cust", folder).ref != ref and cache.activate("cust") == 1 and _slot_matches(cache, qwen2, 1, "a2")


def test_a_load_that_expects_another_version_changes_nothing(qwen2):
    ref = _cache(qwen2).add("cust", qwen2.processed["a1"]).ref  # the version an ingress checked
    replica = _cache(qwen2)  # another engine, loading what the ingress checked, but the files are others now
    with pytest.raises(AdapterError, match="changed on disk since they were checked"):
        replica.add("cust", qwen2.processed["a2"], version=ref.version)
    assert replica.versions() == [] and "cust" not in replica
    assert replica.add("cust", qwen2.processed["a1"], version=ref.version, read=True).ref == ref
    assert replica.host_ready() == ["cust"] and replica.stats.host_misses == 0, "read=True keeps the bytes it checked"


def test_generate_over_more_adapters_than_both_levels(qwen2, tmp_path):
    """max_loras=2, max_cpu_loras=2 and three adapters in one call, then a fourth: same ids as a roomy cache."""
    shutil.copytree(qwen2.processed["a1"], tmp_path / "a4")
    paths = {**{name: qwen2.processed[name] for name in ("a1", "a2", "a3")}, "a4": tmp_path / "a4"}
    prompts = ["Hello", "Write a poem", "def add(a, b):", "Translate to German"]
    params = SamplingParams(max_tokens=6, temperature=0)

    def run(llm, names):
        requests = [LoRARequest(name, index + 1, str(paths[name])) for index, name in enumerate(names)]
        return [output.token_ids for output in llm.generate(prompts[: len(names)], params, requests)]

    roomy = LLM(qwen2.onnx_dir, LoraConfig(max_loras=4, max_cpu_loras=4))
    tight = LLM(qwen2.onnx_dir, LoraConfig(max_loras=2, max_cpu_loras=2, max_lora_rank=16))
    assert run(tight, ["a1", "a2", "a3"]) == run(roomy, ["a1", "a2", "a3"])
    assert run(tight, ["a4", "a3", "a2", "a1"]) == run(roomy, ["a4", "a3", "a2", "a1"])
    assert sorted(tight.engine.adapters.names()) == ["a1", "a2", "a3", "a4"]
    assert len(tight.engine.adapters.host_ready()) <= 2 and len(tight.engine.adapters.slot_table()) <= 2


# -- processed files: read, validated and converted in Python --------------------------------


def _bad_copy(qwen2, tmp_path: Path, case: str) -> Path:
    folder = tmp_path / case
    shutil.copytree(qwen2.processed["a2"], folder)
    weights = folder / contract.PROCESSED_ADAPTER
    tensors = load_file(str(weights))
    first_a = next(name for name in tensors if name.endswith(".A"))
    first_b = first_a[:-1] + "B"
    if case == "unknown":
        tensors["lora.layers.99.q.A"] = tensors[first_a]
    elif case == "shape":
        tensors[first_a] = np.ones((tensors[first_a].shape[0] + 1, tensors[first_a].shape[1]), tensors[first_a].dtype)
    elif case == "ranks":
        tensors[first_b] = np.ones((tensors[first_b].shape[0] - 1, tensors[first_b].shape[1]), tensors[first_b].dtype)
    elif case == "half":
        del tensors[first_b]
    elif case == "empty":
        tensors = {}
    if case in ("truncated", "corrupt", "missing"):
        data = weights.read_bytes()
        if case == "truncated":
            weights.write_bytes(data[: len(data) - 7])
        elif case == "corrupt":
            weights.write_bytes(b"\x10" + bytes(7) + b"{not json}      ")
        else:
            weights.unlink()
    else:
        save_file(tensors, str(weights))
    return folder


@pytest.mark.parametrize("case, message", [
    ("unknown", "has no LoRA input"),
    ("shape", "expected"),
    ("ranks", "expected"),
    ("half", "has no matching"),
    ("empty", "holds no tensors"),
    ("truncated", "unreadable"),
    ("corrupt", "unreadable"),
    ("missing", "no processed_adapter_model.safetensors"),
])
def test_bad_adapter_files_are_refused_and_change_nothing(qwen2, tmp_path, case, message):
    cache = _cache(qwen2)
    cache.add("good", qwen2.processed["a2"])
    cache.activate("good")
    with pytest.raises(UserInputError, match=message):
        cache.add("bad", _bad_copy(qwen2, tmp_path, case))
    assert "bad" not in cache and cache.slot_table() == {1: "good"}


def test_file_damaged_after_registration_fails_activation_cleanly(qwen2, tmp_path):
    folder = tmp_path / "later"
    shutil.copytree(qwen2.processed["a1"], folder)
    cache = _cache(qwen2)
    cache.add("later", folder)
    weights = folder / contract.PROCESSED_ADAPTER
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(AdapterError, match="changed on disk"):
        cache.activate("later")
    assert cache.slot_table() == {} and cache.host_ready() == []


@pytest.mark.parametrize("storage", ["float32", "bfloat16"])
def test_processed_files_of_other_dtypes_are_converted(qwen2, tmp_path, storage):
    folder = tmp_path / storage
    shutil.copytree(qwen2.processed["a1"], folder)
    weights = folder / contract.PROCESSED_ADAPTER
    dtype = np.float32 if storage == "float32" else ml_dtypes.bfloat16
    tensors = {name: value.astype(dtype) for name, value in load_file(str(weights)).items()}
    save_file(tensors, str(weights))
    config = json.loads((folder / contract.PROCESSED_CONFIG).read_text())
    (folder / contract.PROCESSED_CONFIG).write_text(json.dumps({**config, "dtype": storage}))
    for pool_dtype in (np.float32, np.float16):
        cache = _cache(qwen2, dtype=pool_dtype)
        cache.add("x", folder)
        slot = cache.activate("x")
        index, site = next((i, s) for i, s in enumerate(qwen2.manifest.sites) if s.a_name in tensors)
        a = tensors[site.a_name]
        view = cache._pool.a_view(index, slot, slot)
        np.testing.assert_array_equal(view[: a.shape[1]], a.T.astype(np.float32).astype(pool_dtype))


def test_host_copies_keep_the_files_precision_within_a_byte_budget(qwen2):
    """float16 files stay float16 host-ready (about the file's size) and become the pool's float32 in the slot; a
    byte budget evicts the least recently used copy, and a copy over the whole budget is used once, not kept."""
    file_bytes = (qwen2.processed["a1"] / contract.PROCESSED_ADAPTER).stat().st_size
    cache = _cache(qwen2, max_loras=2, max_cpu_loras=4)
    cache.add("a1", qwen2.processed["a1"])
    cache.activate("a1")
    ready = cache._host[cache.current("a1")]
    assert {array.dtype for array in ready.a + ready.b if array is not None} == {np.dtype(np.float16)}
    assert cache.host_bytes <= 1.1 * file_bytes and _slot_holds(cache, qwen2, "a1")

    sizes = {}
    for name in ("a2", "a3"):
        cache.add(name, qwen2.processed[name])
        cache.prefetch(name)
        sizes[name] = cache._host[cache.current(name)].size_bytes
    sizes["a1"] = ready.size_bytes
    pool = native.AdapterPool([(s.in_features, s.out_features) for s in qwen2.manifest.sites], 2,
                              contract.MAX_LORA_RANK, "float32", "cpu")
    limit = sizes["a1"] + sizes["a2"] - 1  # room for either, not both
    budget = AdapterCache(pool, qwen2.spec, qwen2.manifest, contract.MAX_LORA_RANK, 4, np.float32,
                          max_cpu_lora_bytes=limit)
    for name in ("a1", "a2"):
        budget.add(name, qwen2.processed[name])
        budget.activate(name)
    assert budget.host_ready() == ["a2"] and budget.stats.host_evictions == 1 and budget.host_bytes <= limit
    assert _slot_holds(budget, qwen2, "a1") and _slot_holds(budget, qwen2, "a2")
    tiny = AdapterCache(pool, qwen2.spec, qwen2.manifest, contract.MAX_LORA_RANK, 4, np.float32,
                        max_cpu_lora_bytes=sizes["a3"] - 1)
    tiny.add("a3", qwen2.processed["a3"])
    tiny.activate("a3")
    assert tiny.host_ready() == [] and _slot_holds(tiny, qwen2, "a3")
