"""The prefix cache: a hit prefills only the suffix, and every output equals the cache-off output,
whatever adapter, mix, tenant salt, version or chunking a request has."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from edgelora.runtime.adapter_cache import AdapterRef
from edgelora.runtime.config import EngineConfig, SchedulerConfig
from edgelora.runtime.engine import Engine
from edgelora.runtime.prefix_cache import PrefixCache, chain_keys, namespace_of
from edgelora.runtime.sampling import SamplingParams
from edgelora.runtime.scheduler import GenerationRequest, Scheduler

BLOCK = 16
SYSTEM = np.random.default_rng(5).integers(3, 400, 70).tolist()  # 4 full blocks + 6


@pytest.fixture(scope="module")
def qwen2(exported_samples):
    return exported_samples["qwen2"]


def _engine(sample) -> Engine:
    engine = Engine(sample.onnx_dir, EngineConfig(max_loras=3, max_cpu_loras=3, num_threads=1))
    for name, path in sample.processed.items():
        engine.adapters.add(name, path, read=True)
    return engine


def _scheduler(sample, cache: bool, **config) -> Scheduler:
    settings = SchedulerConfig(max_num_seqs=4, enable_prefix_caching=cache, prefix_block_tokens=BLOCK, **config)
    return Scheduler(_engine(sample), settings)


def _request(suffix_seed: int, adapter=None, mix=None, salt=None, suffix: int = 5, max_tokens: int = 8):
    prompt = SYSTEM + np.random.default_rng(suffix_seed).integers(3, 400, suffix).tolist()
    return GenerationRequest(prompt, adapter, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
                             mix, salt)


def _run(scheduler: Scheduler, request: GenerationRequest) -> tuple[list[int], int]:
    """Output ids and the prompt tokens this request prefilled (computed, not copied)."""
    before = scheduler.stats.prompt_tokens
    output = scheduler.run_to_completion([request])[0].output_ids
    return output, scheduler.stats.prompt_tokens - before


# -- the cache alone ----------------------------------------------------------------------------


def test_keys_depend_on_salt_adapter_version_and_weight_and_chain_through_blocks():
    a1, a1_new = AdapterRef("a1", "v1"), AdapterRef("a1", "v2")
    prompt = list(range(40))
    base = chain_keys(namespace_of(None, ()), prompt, BLOCK)
    assert len(base) == 2 and base == chain_keys(namespace_of(None, ()), prompt + [7], BLOCK)
    others = [namespace_of("tenant-b", ()), namespace_of(None, ((a1, 1.0),)), namespace_of(None, ((a1_new, 1.0),)),
              namespace_of(None, ((a1, 0.5),))]
    firsts = {chain_keys(namespace, prompt, BLOCK)[0] for namespace in others}
    assert len(firsts) == 4 and base[0] not in firsts
    assert chain_keys(namespace_of(None, ()), [1] + prompt[1:], BLOCK)[1] != base[1], "a block's key covers its past"


def test_lookup_leaves_the_last_token_evicts_least_recent_and_drops_a_version():
    cache = PrefixCache(block_tokens=4, max_bytes=3 * 64)
    ref = AdapterRef("a", "v")
    keys = [bytes([index]) * 32 for index in range(3)]
    for key in keys:
        cache.insert(key, np.zeros(16, np.float32), (ref,))
    assert len(cache.lookup(keys, 12)) == 2, "12 tokens: the third block would leave nothing to prefill"
    assert len(cache.lookup(keys, 13)) == 3 and cache.stats.hit_tokens == 20
    cache.insert(b"x" * 32, np.zeros(16, np.float32), ())  # over budget: the least recently used block goes
    assert cache.bytes == 3 * 64 and cache.stats.evicted_blocks == 1 and keys[2] not in cache
    assert cache.drop(ref) == 2 and len(cache) == 1 and cache.stats.dropped_blocks == 2


# -- exactness through the scheduler --------------------------------------------------------------


def test_a_hit_prefills_only_the_suffix_and_gives_the_cache_off_output(qwen2):
    on, off = _scheduler(qwen2, True), _scheduler(qwen2, False)
    first = _request(1, "a1")
    expected = _run(off, first)[0]
    assert _run(on, first) == (expected, 75), "a cold prompt prefills whole"
    second = _request(2, "a1")
    assert _run(on, second) == (_run(off, second)[0], 75 - 4 * BLOCK), "a hit prefills only the suffix"
    assert on.stats.cached_prompt_tokens == 4 * BLOCK and on.prefix.stats.hits == 1


HALF = {"a1": 0.5, "a2": 0.5}


@pytest.mark.parametrize("warm, other", [
    (dict(adapter="a1"), dict(adapter="a2")),
    (dict(adapter="a1"), dict(adapter=None)),
    (dict(adapter="a1"), dict(adapter="a1", salt="another tenant")),
    (dict(adapter="a1"), dict(mix=HALF)),
    (dict(mix=HALF), dict(mix={"a1": 0.25, "a2": 0.75})),
], ids=["other-adapter", "base", "other-tenant", "mix", "other-weights"])
def test_the_same_prefix_under_another_adapter_mix_or_tenant_misses_and_is_exact(qwen2, warm, other):
    on, off = _scheduler(qwen2, True), _scheduler(qwen2, False)
    _run(on, _request(1, **warm))
    request = _request(3, **other)
    assert _run(on, request) == (_run(off, request)[0], 75)
    assert _run(on, _request(4, **other))[1] == 75 - 4 * BLOCK, "the same namespace hits"


def test_a_new_version_of_the_name_never_hits_the_old_blocks_and_unloading_drops_them(qwen2, tmp_path):
    on, off = _scheduler(qwen2, True), _scheduler(qwen2, False)
    _run(on, _request(1, "a1"))
    stored = len(on.prefix)
    renamed = tmp_path / "a1_v2"
    shutil.copytree(qwen2.processed["a2"], renamed)  # other bytes under the name a1: a new version
    for scheduler in (on, off):
        scheduler.engine.adapters.add("a1", renamed)
    assert on.prefix.stats.dropped_blocks == stored and len(on.prefix) == 0
    request = _request(5, "a1")
    assert _run(on, request) == (_run(off, request)[0], 75)
    on.engine.adapters.remove("a1")
    assert len(on.prefix) == 0, "the removed version's blocks left with it"


def test_hits_compose_with_chunked_prefill_and_mixed_batches(qwen2):
    config = dict(max_num_batched_tokens=24)  # prompts of 75 come in chunks of 24
    on, off = _scheduler(qwen2, True, **config), _scheduler(qwen2, False, **config)
    _run(on, _request(1, "a2"))
    chunked = _request(6, "a2", suffix=40)
    assert _run(on, chunked) == (_run(off, chunked)[0], 110 - 4 * BLOCK)
    batch = [_request(7, "a1"), _request(8, "a2"), _request(9, None), _request(10, mix={"a1": 0.5, "a3": 0.5})]
    expected = [result.output_ids for result in off.run_to_completion(batch)]
    for request in batch:
        _run(on, _request(11, request.adapter, request.lora_mix))  # warm every namespace
    assert [result.output_ids for result in on.run_to_completion(batch)] == expected
    assert on.stats.cached_prompt_tokens >= 4 * 4 * BLOCK


def test_rows_with_and_without_a_hit_prefill_together_exactly(qwen2):
    """One prefill step: a row starting from its cached prefix beside a cold row (another adapter) and a cold
    short prompt (position 0, no full block)."""
    on, off = _scheduler(qwen2, True), _scheduler(qwen2, False)
    _run(on, _request(1, "a1"))
    short = GenerationRequest([5, 6, 7], "a2", SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    batch = [_request(12, "a1"), _request(13, "a3"), short]
    expected = [result.output_ids for result in off.run_to_completion(batch)]
    before = on.stats.prefill_steps
    assert [result.output_ids for result in on.run_to_completion(batch)] == expected
    assert on.stats.prefill_steps == before + 1, "the three prompts shared one prefill step"
    assert on.stats.cached_prompt_tokens == 4 * BLOCK
