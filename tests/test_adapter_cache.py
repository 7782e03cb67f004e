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

from edgelora import LLM, LoraConfig, LoRARequest, SamplingParams, contract
from edgelora.errors import AdapterError, EdgeLoraError, UserInputError
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
    with pytest.raises(EdgeLoraError, match="in use"):
        held = cache.acquire(["a1"])
        cache.remove("a1")
    cache.release(["a1"])
    cache.remove("a1")
    assert (cache.names(), cache.slot_table()) == (["a2", "a3"], {2: "a3"})
    with pytest.raises(UserInputError, match="unknown adapter 'a1'"):
        cache.activate("a1")


def test_acquire_never_evicts_what_the_same_batch_holds(qwen2):
    cache = _cache(qwen2)
    for name in ("a1", "a2", "a3"):
        cache.add(name, qwen2.processed[name])
    assert cache.acquire(["a1", "a2", "a1"]) == {"a1": 1, "a2": 2}
    with pytest.raises(UserInputError, match="a batch uses 3 adapters but max_loras is 2"):
        cache.acquire(["a1", "a2", "a3"])
    assert cache.get("a1").references == 1 and cache.get("a2").references == 1, "a refused acquire holds nothing more"


def test_name_registered_for_another_path_is_refused(qwen2):
    cache = _cache(qwen2)
    cache.add("a1", qwen2.processed["a1"])
    cache.add("a1", qwen2.processed["a1"] / contract.PROCESSED_ADAPTER)  # the same file: fine
    with pytest.raises(UserInputError, match="already registered"):
        cache.add("a1", qwen2.processed["a2"])


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
    tight = LLM(qwen2.onnx_dir, LoraConfig(max_loras=2, max_cpu_loras=2))
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
    with pytest.raises(AdapterError, match="unreadable"):
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
